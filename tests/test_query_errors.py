"""Errors of queries and reads: where= and sql(), dims, k, shortlist and query shapes, k larger than the
store, empty stores and unknown ids.
Fixtures: conftest.py; helpers: errors_support.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from errors_support import (
    DIM,
    IDS,
    N,
    query_vec,
    raises,
    snapshot,
    vecs,
)

import mrlstore


# -- where= and sql() ---------------------------------------------------------------------------------
def test_where_with_unknown_column(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match=r"nope.*Metadata columns: id, n, tag"):
        store.query(query_vec(), where="nope > 3")


@pytest.mark.parametrize("where", ["n >", "n > > 3", "tag = 'x", ""], ids=["dangling", "double-op", "quote", "empty"])
def test_where_with_invalid_sql(store: mrlstore.Store, where: str) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match="where="):
        store.query(query_vec(), where=where)


def test_where_with_a_second_statement_is_rejected(store: mrlstore.Store) -> None:
    before = snapshot(store)
    with raises(mrlstore.InvalidFilterError, ValueError, match="where="):
        store.query(query_vec(), where="1=1; DROP TABLE _items")
    assert snapshot(store) == before
    assert store.sql("SELECT count(*) AS c FROM _items").column("c").to_pylist() == [N]


def test_where_that_escapes_its_expression_is_rejected(store: mrlstore.Store) -> None:
    # where= is one boolean expression; closing the wrapper's parenthesis to append a UNION over another
    # table (here: the deleted rows) is not one, even though the wrapped statement is a single SELECT.
    store.delete(["v00"])
    with raises(mrlstore.InvalidFilterError, ValueError, match="where="):
        store.query(query_vec(), where="1=1) UNION (SELECT _row FROM tombstones")


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM _items",
        "DROP TABLE _items",
        "UPDATE _items SET n = 0",
        "SELECT 1; DELETE FROM _items",
        "COPY _items TO 'x.csv'",
    ],
    ids=["delete", "drop", "update", "two-statements", "copy"],
)
def test_sql_rejects_writes(store: mrlstore.Store, sql: str) -> None:
    before = snapshot(store)
    with raises(mrlstore.InvalidFilterError, ValueError, match="one read-only SELECT"):
        store.sql(sql)
    assert snapshot(store) == before


def test_sql_rejects_a_data_modifying_cte(store: mrlstore.Store) -> None:
    # DuckDB reports this statement as a SELECT, but its WITH clause deletes every row of the catalog.
    before = snapshot(store)
    with raises(mrlstore.InvalidFilterError, ValueError):
        store.sql("WITH d AS (DELETE FROM _items RETURNING id) SELECT * FROM d")
    assert snapshot(store) == before


@pytest.mark.parametrize(
    "sql,match",
    [
        ("SELEC * FROM items", "not valid SQL"),
        ("SELECT nope FROM items", "nope"),
        ("SELECT * FROM no_such_table", "no_such_table"),
    ],
    ids=["typo", "unknown-column", "unknown-table"],
)
def test_sql_with_a_mistake(store: mrlstore.Store, sql: str, match: str) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match=match):
        store.sql(sql)


# -- dims, k, shortlist, query shapes -----------------------------------------------------------------
@pytest.mark.parametrize(
    "dims,match",
    [
        ([64, 16], r"strictly increasing, got \[64, 16\]"),
        ([16, 16], r"strictly increasing, got \[16, 16\]"),
        ([16, 128], r"1\.\.64 .*got 128"),
        (65, r"1\.\.64 .*got 65"),
        ([0, 64], r"1\.\.64 .*got 0"),
        ([], "at least one prefix length"),
        ([16.0, 64], "integers, got 16.0"),
    ],
    ids=["decreasing", "repeated", "beyond-dim", "int-beyond-dim", "zero", "empty", "float"],
)
def test_invalid_dims(store: mrlstore.Store, dims: Any, match: str) -> None:
    with raises(mrlstore.InvalidDimsError, ValueError, match=match):
        store.query(query_vec(), dims=dims)


def test_get_with_dims_beyond_dim(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidDimsError, ValueError, match=r"1\.\.64 .*got 100"):
        store.get(["v01"], dims=100)


@pytest.mark.parametrize("k", [0, -1, 2.5, "3", True, None], ids=["0", "-1", "float", "str", "bool", "None"])
def test_invalid_k(store: mrlstore.Store, k: Any) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match=f"k must be a positive integer, got {k!r}"):
        store.query(query_vec(), k=k)


def test_numpy_integer_k_is_fine(store: mrlstore.Store) -> None:
    assert len(store.query(query_vec(), k=np.int64(3))) == 3


def test_shortlist_list_smaller_than_k(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="at least k=10, got 5"):
        store.query(query_vec(), k=10, dims=[16, 64], shortlist=[5])


@pytest.mark.parametrize("shortlist", [5, 0, -3], ids=["smaller-than-k", "zero", "negative"])
def test_shortlist_int_smaller_than_k(store: mrlstore.Store, shortlist: int) -> None:
    # The list form is checked; an int must be too (today it is silently clamped up to k).
    with raises(mrlstore.InvalidKError, ValueError, match="shortlist"):
        store.query(query_vec(), k=10, dims=[16, 64], shortlist=shortlist)


@pytest.mark.parametrize(
    "shortlist,match",
    [
        ([100, 50], "needs 1 sizes"),
        (2.5, "an int or a list of ints"),
        ("a", "an int or a list of ints"),
        ([12.5], "sizes must be integers"),
    ],
    ids=["too-many", "float", "str", "float-in-list"],
)
def test_shortlist_of_wrong_form(store: mrlstore.Store, shortlist: Any, match: str) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match=match):
        store.query(query_vec(), k=10, dims=[16, 64], shortlist=shortlist)


def test_invalid_ef(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="ef must be a positive integer, got 0"):
        store.query(query_vec(), ef=0)


def test_query_shorter_than_max_dims(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match=r"between max\(dims\)=64 and dim=64, got 32"):
        store.query(query_vec()[:32], dims=[16, 64])


def test_query_shorter_than_dim_is_fine_when_dims_allow_it(store: mrlstore.Store) -> None:
    assert len(store.query(query_vec()[:32], k=3, dims=[16, 32])) == 3


def test_query_longer_than_dim(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match=r"max\(dims\)=64 and dim=64, got 65"):
        store.query(np.ones(DIM + 1, np.float32))


def test_query_with_3d_input(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="1-D .*or 2-D .*got 3-D"):
        store.query(np.ones((1, 1, DIM), np.float32))


def test_query_with_empty_batch(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="empty batch"):
        store.query(np.zeros((0, DIM), np.float32))


def test_query_with_nan(store: mrlstore.Store) -> None:
    q = np.stack([query_vec(), query_vec()])
    q[1, 3] = np.nan
    with raises(mrlstore.NonFiniteError, ValueError, match="query 1 contains NaN or inf"):
        store.query(q)


def test_zero_query_under_cosine(store: mrlstore.Store) -> None:
    with raises(mrlstore.ZeroVectorError, ValueError, match="query 0 is all zeros"):
        store.query(np.zeros(DIM, np.float32))


def test_query_with_something_that_is_not_vectors_and_no_encoder(store: mrlstore.Store) -> None:
    with raises(mrlstore.EncoderUnavailableError, RuntimeError, match="no encoder"):
        store.query("a photo of a cat")


# -- k larger than the store: return what exists --------------------------------------------------------
def _prepare(store: mrlstore.Store, state: str) -> set[str]:
    """Bring the store into ``state``; returns the live ids."""
    if state == "after-delete":
        store.delete(["v00", "v01"])
        return set(IDS[2:])
    if state == "after-upsert":
        store.upsert_vectors(vecs(2, seed=7), ids=["v00", "v01"])
        return set(IDS)
    return set(IDS)


@pytest.mark.parametrize("dims", [None, [16], [64], [16, 64]], ids=["default", "16", "64", "16-64"])
@pytest.mark.parametrize("state", ["fresh", "after-delete", "after-upsert"])
def test_k_larger_than_store_returns_all_live_rows(store: mrlstore.Store, state: str, dims: Any) -> None:
    live = _prepare(store, state)
    hits = store.query(query_vec(), k=50, dims=dims)
    assert sorted(hits.ids) == sorted(live)
    assert len(hits.scores) == len(live)


@pytest.mark.parametrize("state", ["after-delete", "after-upsert"])
def test_default_query_on_a_small_store_after_a_delete(store: mrlstore.Store, state: str) -> None:
    # k=10 on 18-20 live rows: the first stage asks HNSW for its default shortlist (200), more than exist.
    _prepare(store, state)
    assert len(store.query(query_vec())) == 10


def test_k_larger_than_where_matches(store: mrlstore.Store) -> None:
    hits = store.query(query_vec(), k=10, where="n < 3")
    assert sorted(hits.ids) == ["v00", "v01", "v02"]


def test_where_matching_nothing_gives_empty_hits(store: mrlstore.Store) -> None:
    hits = store.query(query_vec(), k=10, where="n < 0")
    assert hits.ids == [] and len(hits.scores) == 0


def test_k_larger_than_store_in_a_batch_query(store: mrlstore.Store) -> None:
    out = store.query(np.stack([query_vec(1), query_vec(2)]), k=100)
    assert [sorted(h.ids) for h in out] == [sorted(IDS)] * 2


# -- empty store --------------------------------------------------------------------------------------
def test_query_on_empty_store(empty_store: mrlstore.Store) -> None:
    before = snapshot(empty_store)
    with raises(mrlstore.EmptyStoreError, LookupError, match="holds no vectors"):
        empty_store.query(query_vec())
    assert snapshot(empty_store) == before


def test_query_on_store_whose_rows_were_all_deleted(store: mrlstore.Store) -> None:
    store.delete(IDS)
    with raises(mrlstore.EmptyStoreError, LookupError, match="holds no vectors"):
        store.query(query_vec())


def test_invalid_arguments_are_reported_before_emptiness(empty_store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="k must be a positive integer"):
        empty_store.query(query_vec(), k=0)


def test_rejected_add_on_empty_store_changes_nothing(empty_store: mrlstore.Store) -> None:
    before = snapshot(empty_store)
    v = vecs(2)
    v[1, 0] = np.nan
    with raises(mrlstore.NonFiniteError, ValueError):
        empty_store.add_vectors(v)
    assert snapshot(empty_store) == before


# -- unknown ids --------------------------------------------------------------------------------------
def test_delete_unknown_ids(store: mrlstore.Store) -> None:
    before = snapshot(store)
    with raises(mrlstore.UnknownIdError, KeyError, match=r"1 id\(s\) not in the store, e\.g\. \['nope'\]") as info:
        store.delete(["v03", "nope"])
    assert isinstance(info.value, LookupError)
    assert snapshot(store) == before  # v03 was not deleted either
    assert "v03" in store.get(["v03"]).column("id").to_pylist()


def test_delete_unknown_ids_with_missing_ok(store: mrlstore.Store) -> None:
    assert store.delete(["v03", "nope"], missing_ok=True) == 1
    assert len(store) == N - 1
    assert store.delete(["nope", "v03"], missing_ok=True) == 0
    with raises(mrlstore.UnknownIdError, KeyError, match="v03"):
        store.get(["v03"])


def test_delete_twice(store: mrlstore.Store) -> None:
    store.delete(["v04"])
    with raises(mrlstore.UnknownIdError, KeyError, match="v04"):
        store.delete(["v04"])


@pytest.mark.parametrize("ids", [["nope"], ["v01", "nope"], "nope"], ids=["one", "mixed", "single-string"])
def test_get_unknown_ids(store: mrlstore.Store, ids: Any) -> None:
    with raises(mrlstore.UnknownIdError, KeyError, match=r"1 id\(s\) not in the store, e\.g\. \['nope'\]"):
        store.get(ids)


def test_one_vector_queries_are_checked_value_by_value(store: mrlstore.Store) -> None:
    """The one-vector path's checks equal the batch path's: NaN past the dims a query reads still fails,
    huge and tiny values pass (a float32 sum of squares would overflow or underflow), a strided view works."""
    q = query_vec()
    bad = q.copy()
    bad[-1] = np.inf
    with raises(mrlstore.NonFiniteError, ValueError, match="query 0 contains NaN or inf"):
        store.query(bad, dims=[16])
    for scale in (1e30, 1e-40):
        assert store.query(q * np.float32(scale), k=3, dims=[DIM]).ids == store.query(q, k=3, dims=[DIM]).ids
    assert store.query(np.stack([q, q], axis=1)[:, 0], k=3).ids == store.query(q, k=3).ids  # not contiguous
    zero_head = q.copy()
    zero_head[:16] = 0
    with raises(mrlstore.ZeroVectorError, ValueError, match="query 0 is all zeros"):
        store.query(zero_head, dims=[16])


def test_query_table_of_no_rows(store: mrlstore.Store) -> None:
    import pyarrow as pa

    empty = pa.table({"vector": pa.array([], pa.list_(pa.float32()))})
    with pytest.raises(mrlstore.ShapeError, match="no rows"):
        store.query_table(empty, k=3)


@pytest.mark.parametrize("kwargs", [{"k": 10**7}, {"k": 2**31, "dims": [DIM]}, {"k": 3, "shortlist": 10**12}])
def test_sizes_past_the_store_return_what_it_holds(store: mrlstore.Store, kwargs: dict) -> None:
    """k and shortlists are capped at the live rows: a k of 10**7 sized buffers of 20 x k per query."""
    hits = store.query(vecs(1, seed=9)[0], **kwargs)
    assert len(hits.ids) == min(kwargs["k"], N) and len(set(hits.ids)) == len(hits.ids)


@pytest.mark.parametrize("dims", [1.5, 64.0, "64", [16.0, 64]])
def test_dims_that_are_not_integers(store: mrlstore.Store, dims: Any) -> None:
    with raises(mrlstore.InvalidDimsError, ValueError, match="dims must be"):
        store.query(vecs(1)[0], dims=dims)
    with raises(mrlstore.InvalidDimsError, ValueError, match="dims must be"):
        store.get(["v01"], dims=dims)


def test_a_cosine_query_whose_first_stage_prefix_is_zero(store: mrlstore.Store) -> None:
    query = vecs(2, seed=3)
    query[1, :16] = 0  # the 16-d first stage would rank on nothing
    with raises(mrlstore.ZeroVectorError, ValueError, match="query 1's first 16 numbers are all zeros"):
        store.query(query, dims=[16, DIM])
    with raises(mrlstore.ZeroVectorError, ValueError, match="query 0's first 16 numbers"):
        store.query(query[1], dims=[16, DIM])
    assert len(store.query(query[1], k=3, dims=[DIM]).ids) == 3  # exact search on all of it is defined


def test_full_dimension_search_is_exact_even_where_that_length_is_indexed(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=32, bands=(16, 32), index_dims=(16, 32)) as s:
        s.add_vectors(x, ids=[str(i) for i in range(3000)])
        stored = np.stack(s.get([str(i) for i in range(3000)], dims=32).column("vector").to_numpy(zero_copy_only=False))
        stored /= np.linalg.norm(stored, axis=1, keepdims=True)
        for q in rng.standard_normal((20, 32)).astype(np.float32):
            want = np.argsort(-(stored @ (q / np.linalg.norm(q))))[:10]
            assert s.query(q, k=10, dims=[32]).ids == [str(i) for i in want]


def test_export_parquet_to_a_folder_or_nowhere(store: mrlstore.Store, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with raises(mrlstore.InvalidInputError, ValueError, match="is a folder"):
        store.export_parquet(tmp_path / "out", dims=16)
    with raises(mrlstore.StorageError, OSError, match="nope does not exist"):
        store.export_parquet(tmp_path / "nope" / "x.parquet", dims=16)
    (tmp_path / "afile").write_text("")  # it said "there is no folder" here too
    for under in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with raises(mrlstore.StorageError, OSError, match="afile is a file, not a folder"):
            store.export_parquet(under / "x.parquet", dims=16)
    assert store.export_parquet(tmp_path / "out" / "x.parquet", dims=16) == N
