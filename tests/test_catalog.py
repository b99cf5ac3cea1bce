"""The DuckDB catalog on its own: schema, commits, rollbacks, filters, metadata typing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mrlstore.errors import CorruptStoreError, DuplicateIdError, InvalidFilterError, MetadataError
from mrlstore.tiers.catalog import Catalog


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path, read_only=False, create=True)
    c.create_schema({"format": "mrlstore", "committed_rows": 0})
    yield c
    c.close()


def test_commit_sets_watermark_and_columns(catalog):
    stored = catalog.commit_rows(0, ["a", "b"], pa.table({"label": ["x", "y"], "n": [1, 2]}), new_watermark=2)
    assert stored.to_pylist() == [{"id": "a", "label": "x", "n": 1}, {"id": "b", "label": "y", "n": 2}]  # no _row
    assert catalog.manifest()["committed_rows"] == 2
    assert catalog.columns() == {"label": "VARCHAR", "n": "BIGINT"}
    rows, items = catalog.live_items()
    assert rows.tolist() == [0, 1] and items.column("id").to_pylist() == ["a", "b"]
    stored = catalog.commit_rows(2, ["c"], pa.table({"w": [0.5]}), new_watermark=3, replace_rows=np.array([0]))
    assert stored.to_pylist() == [{"id": "c", "label": None, "n": None, "w": 0.5}]  # every column of the table
    assert catalog.rows_of(["a", "b", "c"]) == {"b": 1, "c": 2}
    assert catalog.tombstones().tolist() == [0]
    rows, items = catalog.live_items()
    assert rows.tolist() == [1, 2]
    assert items.to_pylist() == [
        {"id": "b", "label": "y", "n": 2, "w": None},
        {"id": "c", "label": None, "n": None, "w": 0.5},
    ]


def test_failed_commit_rolls_back_everything(catalog):
    catalog.commit_rows(0, ["a"], None, new_watermark=1)
    with pytest.raises(DuplicateIdError):
        catalog.commit_rows(1, ["a"], pa.table({"z": [1]}), new_watermark=2)  # id "a" is UNIQUE
    assert catalog.manifest()["committed_rows"] == 1
    assert catalog.columns() == {}
    assert catalog.live_items()[1].column("id").to_pylist() == ["a"]


def test_filters_and_sql_are_read_only(catalog):
    catalog.commit_rows(0, ["a", "b", "c"], pa.table({"n": [1, 2, 3]}), new_watermark=3)
    assert catalog.filter_rows("n >= 2").tolist() == [1, 2]
    with pytest.raises(InvalidFilterError, match="Metadata columns: id, n"):
        catalog.filter_rows("colour = 'red'")
    for bad in ["n = 1; DELETE FROM _items", "n = ", "n = 1) UNION SELECT 5 --"]:
        with pytest.raises(InvalidFilterError):
            catalog.filter_rows(bad)
    with pytest.raises(InvalidFilterError, match="read-only SELECT"):
        catalog.sql("DROP TABLE _items")
    assert catalog.sql("SELECT count(*) AS c FROM items").column("c")[0].as_py() == 3


def test_metadata_check_names_the_offending_value(catalog):
    catalog.commit_rows(0, ["a"], pa.table({"n": [1]}), new_watermark=1)
    catalog.check_metadata(pa.table({"n": ["7"], "new": ["ok"]}))  # castable, and new columns are fine
    with pytest.raises(MetadataError, match=r"metadata\[1\]\['n'\] = 'seven'"):
        catalog.check_metadata(pa.table({"n": ["7", "seven"]}))


def test_items_for_ids_keeps_request_order(catalog):
    catalog.commit_rows(0, ["a", "b", "c"], None, new_watermark=3)
    t = catalog.items_for_ids(["c", "zz", "a"])
    assert t.column("id").to_pylist() == ["c", "a"] and t.column("_row").to_pylist() == [2, 0]


def test_a_trailing_comment_cannot_escape_the_filter(catalog):
    catalog.commit_rows(0, ["a", "b"], pa.table({"n": [1, 2]}), new_watermark=2)
    assert catalog.filter_rows("n = 1 -- the parenthesis after this stays in force").tolist() == [0]


def test_memory_held_is_duckdbs_own_account_by_tag(catalog):
    tables = (pa.table({"id": pa.array(np.arange(lo, lo + 1000).astype(str))}) for lo in range(0, 5000, 1000))
    catalog.append_tables(0, tables, 5000, step_rows=2000)
    held = catalog.memory_held()
    assert held and all(isinstance(tag, str) and n > 0 for tag, n in held.items())
    assert catalog.live_count() == 5000


def test_a_long_write_leaves_duckdb_holding_only_its_last_steps_blocks(catalog):
    """Without a new connection between steps DuckDB keeps every block the write stored (2.75 MiB here)."""
    n = 200_000
    ids = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # 20-character ids in no order
    tables = (pa.table({"id": pa.array(ids[lo : lo + 8192]).cast(pa.string())}) for lo in range(0, n, 8192))
    catalog.append_tables(0, tables, n, step_rows=16_384)
    assert catalog.memory_held().get("BASE_TABLE", 0) < 1.5 * (1 << 20)
    assert catalog.live_count() == n and catalog.rows_of([str(ids[7]), str(ids[-1])]) == {
        str(ids[7]): 7,
        str(ids[-1]): n - 1,
    }
    with pytest.raises(DuplicateIdError):
        catalog.commit_rows(n, [str(ids[100])], None, n + 1)


def test_a_catalog_that_cannot_connect_again_between_steps_fails_the_write_and_every_later_call(
    tmp_path, catalog, monkeypatch
):
    """Another DuckDB client may take the file while the writer reconnects: a few tries, then StorageError."""
    from mrlstore.errors import StorageError, StoreLockedError
    from mrlstore.tiers import catalog as catalog_module

    tries = []

    def refused(self):
        tries.append(1)
        raise StoreLockedError("open for writing by another process")

    monkeypatch.setattr(catalog_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(Catalog, "_connect", refused)
    tables = (pa.table({"id": pa.array(np.arange(lo, lo + 100).astype(str))}) for lo in range(0, 500, 100))
    with pytest.raises(StorageError, match="reopen the store to go on"):
        catalog.append_tables(0, tables, 500, step_rows=200)
    assert len(tries) == 6
    with pytest.raises(StorageError, match="reopen the store to go on"):
        catalog.committed_rows()
    catalog.close()
    monkeypatch.undo()
    again = Catalog(tmp_path, read_only=True)
    assert again.committed_rows() == 0  # the first step's rows never count: the watermark did not move
    again.close()


def test_a_reader_refuses_an_unreadable_staged_write_mark(tmp_path, catalog):
    from mrlstore.tiers.catalog import STAGED_KEY

    catalog.set_manifest(STAGED_KEY, "not a mark")
    catalog.close()
    with pytest.raises(CorruptStoreError, match="staged write"):
        Catalog(tmp_path, read_only=True)


def test_staged_writes_check_metadata_as_adds_do(catalog):
    """append_tables (StoreSink, add_arrow in steps) refuses values that would change when stored, as
    commit_rows does: 1.7 into a BIGINT column was stored as 2."""
    catalog.commit_rows(0, ["a"], pa.table({"count": [5], "flag": [True]}), new_watermark=1)
    for given in ({"count": [1.7]}, {"flag": [2]}):
        table = pa.table({"id": ["b"], **given})
        with pytest.raises(MetadataError, match="would change when stored"):
            catalog.append_tables(1, [table], 2)
        assert catalog.manifest()["committed_rows"] == 1 and catalog.rows_of(["b"]) == {}
    catalog.append_tables(1, [pa.table({"id": ["b"], "count": [2.0], "flag": [1]})], 2)
    assert catalog.live_items()[1].to_pylist()[1] == {"id": "b", "count": 2, "flag": True}
