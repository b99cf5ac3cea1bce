"""The id cache (mrlstore/tiers/id_index.py): stores of format 4 find ids through it, and it never misses one."""

import os
import signal
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pytest

import mrlstore
from mrlstore.tiers import catalog as catalog_module
from mrlstore.tiers import id_index
from mrlstore.tiers.id_index import ID_DIR, IdIndex

DIM = 16


class PairSource:
    """Pairs by row, as a catalog gives them (rows lo..hi that hold one)."""

    def __init__(self):
        self.hashes: dict[int, int] = {}

    def put(self, rows, hashes):
        self.hashes.update(zip(rows.tolist(), hashes.tolist()))

    def read(self, lo, hi):
        rows = np.array(sorted(r for r in self.hashes if lo <= r < hi), dtype=np.int64)
        return np.array([self.hashes[r] for r in rows.tolist()], dtype=np.uint64), rows

    def expected(self, wanted):
        return sorted((int(p), r) for p, h in enumerate(wanted.tolist()) for r, v in self.hashes.items() if v == h)


def found(index, wanted):
    positions, rows = index.candidates(wanted)
    return sorted(zip(positions.tolist(), rows.tolist()))


@pytest.fixture
def small_runs(monkeypatch):
    monkeypatch.setattr(id_index, "TAIL_ROWS", 8)
    monkeypatch.setattr(id_index, "BUILD_ROWS", 16)
    monkeypatch.setattr(id_index, "MERGE_BLOCK", 5)


def test_every_pair_is_found_through_flushes_merges_and_a_reload(tmp_path, small_runs):
    rng = np.random.default_rng(0)
    source = PairSource()
    index = IdIndex(tmp_path / ID_DIR, 7, source.read, writable=True)
    index.load(0)
    row = 0
    for _ in range(40):
        n = int(rng.integers(1, 12))
        rows = np.arange(row, row + n, dtype=np.int64)
        hashes = rng.integers(0, 60, n).astype(np.uint64)  # equal hashes at several rows, as collisions are
        index.add(hashes, rows)
        source.put(rows, hashes)
        index.flush()
        row += n
    runs = sorted((tmp_path / ID_DIR).glob("*.run"))
    assert 2 <= len(runs) <= 8 and index.covered > row - 8  # merged like a binary counter
    wanted = np.arange(0, 70, dtype=np.uint64)
    assert found(index, wanted) == source.expected(wanted)
    reloaded = IdIndex(tmp_path / ID_DIR, 7, source.read, writable=False)
    reloaded.load(row)
    assert found(reloaded, wanted) == source.expected(wanted)


def test_copied_runs_read_back_the_same_pairs_even_after_their_files_were_merged_away(tmp_path, small_runs):
    source = PairSource()
    index = IdIndex(tmp_path / ID_DIR, 7, source.read, writable=True)
    index.load(0)
    for lo in range(0, 40, 10):
        rows = np.arange(lo, lo + 10, dtype=np.int64)
        index.add(rows.astype(np.uint64) % 13, rows)
        source.put(rows, rows.astype(np.uint64) % 13)
        index.flush()
    reader = IdIndex(tmp_path / ID_DIR, 7, source.read, writable=False)
    reader.load(40)
    assert reader.covered == index.covered and reader.covered >= 32
    for path in (tmp_path / ID_DIR).glob("*.run"):
        path.unlink()  # as a writer's merge would: the reader's maps still hold them
    copied = reader.copy_runs(tmp_path / "copy", watermark=40)
    assert sorted(p.name for p in copied) == sorted(run.path.name for run in reader._runs)
    assert reader.copy_runs(tmp_path / "short", watermark=reader._runs[0].hi - 1) == []  # none past it
    again = IdIndex(tmp_path / "copy", 7, source.read, writable=False)
    again.load(40)
    wanted = np.arange(0, 15, dtype=np.uint64)
    assert again.covered == reader.covered and found(again, wanted) == source.expected(wanted)


def test_a_writers_load_drops_runs_past_its_watermark_and_damaged_or_foreign_files(tmp_path, small_runs):
    source = PairSource()
    folder = tmp_path / ID_DIR
    index = IdIndex(folder, 7, source.read, writable=True)
    index.load(0)
    for lo in range(0, 48, 12):
        rows = np.arange(lo, lo + 12, dtype=np.int64)
        index.add(rows.astype(np.uint64) * 3, rows)
        source.put(rows, rows.astype(np.uint64) * 3)
        index.flush()
    (folder / "0000000000000-0000000000004.run").write_bytes(b"MRLIDS01 cut short")
    other_hash = IdIndex(folder, 8, source.read, writable=True)
    other_hash._write_run(0, 60, [(np.array([1], np.uint64), np.array([99], np.int64))], 1)
    reader = IdIndex(folder, 7, source.read, writable=False)
    reader.load(48)
    assert reader.covered == 48 and found(reader, np.array([3 * 47], np.uint64)) == [(0, 47)]
    assert (folder / "0000000000000-0000000000004.run").exists()  # a reader deletes nothing
    # the rows 30.. of a write that died: a writer keeps only what the catalog committed, and rereads the rest
    source.hashes = {r: h for r, h in source.hashes.items() if r < 30}
    writer = IdIndex(folder, 7, source.read, writable=True)
    writer.load(30)
    assert writer.covered <= 30 and found(writer, np.array([3 * 29, 3 * 31], np.uint64)) == [(0, 29)]
    assert all(int(p.stem.split("-")[1]) <= 30 for p in folder.iterdir())


@pytest.fixture
def store_path(tmp_path, small_runs):
    return tmp_path / "s.mrl"


def add(store, ids, **kwargs):
    vectors = np.random.default_rng(len(store)).standard_normal((len(ids), DIM)).astype(np.float32)
    return store.add_vectors(vectors, ids=ids, **kwargs)


def test_a_new_store_keeps_no_duckdb_index_on_ids_and_refuses_every_repeat(store_path):
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        for i in range(0, 60, 6):
            add(s, [f"id{j}" for j in range(i, i + 6)], metadata=[{"n": j} for j in range(i, i + 6)])
        assert len(list((store_path / ID_DIR).glob("*.run"))) >= 1
        with pytest.raises(mrlstore.DuplicateIdError, match="id3"):
            add(s, ["new", "id3"])
        assert len(s) == 60 and not s.sql("SELECT id FROM items WHERE id = 'new'").num_rows
        add(s, ["id4", "more"], on_conflict="skip")
        assert len(s) == 61
        s.delete(["id10", "id11"])
        add(s, ["id10"])  # a deleted id is free again
        with pytest.raises(mrlstore.UnknownIdError):
            s.get(["id11"])
    with mrlstore.open(store_path) as s:  # after a reopen, found through the runs on disk
        assert s.manifest["format_version"] == 4
        assert s.get(["id59", "id0", "id10"]).column("id").to_pylist() == ["id59", "id0", "id10"]
        assert s.get(["id2"]).column("n").to_pylist() == [2]
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["id0"])
        add(s, ["id1"], on_conflict="replace", metadata=[{"n": 100}])
        assert len(s) == 60 and s.get(["id1"]).column("n").to_pylist() == [100]
        assert s.verify() == []
    assert id_constraints(store_path) == [("NOT NULL",)]


def id_constraints(path):
    with duckdb.connect(str(path / catalog_module.DB_FILE), read_only=True) as con:
        return con.execute(
            "SELECT constraint_type FROM duckdb_constraints() WHERE table_name = '_items' "
            "AND 'id' = ANY(constraint_column_names) ORDER BY constraint_type"
        ).fetchall()


def make_version_3(path):
    """The catalog as releases before format 4 made it: DuckDB's unique index on id."""
    with duckdb.connect(str(path / catalog_module.DB_FILE)) as con:
        extra = "".join(f", {n} {t}" for n, t in con.execute("SELECT column_name, data_type FROM duckdb_columns() "
                        "WHERE table_name = '_items' AND column_name NOT IN ('_row', 'id')").fetchall())  # fmt: skip
        con.execute(f"CREATE TABLE _old (_row BIGINT PRIMARY KEY, id VARCHAR NOT NULL UNIQUE{extra})")
        con.execute("INSERT INTO _old SELECT * FROM _items")
        con.execute("DROP VIEW items")
        con.execute("DROP TABLE _items")
        con.execute("ALTER TABLE _old RENAME TO _items")
        con.execute("CREATE VIEW items AS SELECT * EXCLUDE (_row) FROM _items")
        con.execute("UPDATE manifest SET value = '3' WHERE key = 'format_version'")


@pytest.fixture
def version_3_store(store_path):
    """A store of ids v0..v29 made as format 3 made it (DuckDB's unique index on id)."""
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"v{j}" for j in range(30)])
    make_version_3(store_path)
    return store_path


def test_a_version_3_store_refuses_repeats_and_compacts_to_version_4(version_3_store):
    store_path = version_3_store
    assert id_constraints(store_path) == [("NOT NULL",), ("UNIQUE",)]
    chunks = {p: p.stat().st_ino for p in (store_path / "vectors").rglob("c/*/*")}
    with mrlstore.open(store_path) as s:
        assert s.manifest["format_version"] == 3
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["w", "v7"])
        add(s, ["w"], metadata=[{"tag": "new"}])
        assert s.compact().rows_after == 31  # nothing deleted: the catalog alone is made again
        assert s.manifest["format_version"] == 4 and len(s) == 31
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["v7"])
        assert s.get(["v29", "w"]).column("id").to_pylist() == ["v29", "w"] and s.verify() == []
        assert s.get(["w"]).column("tag").to_pylist() == ["new"]
    assert id_constraints(store_path) == [("NOT NULL",)]
    assert all(p.stat().st_ino == ino for p, ino in chunks.items())  # the vectors were not rewritten
    with mrlstore.open(store_path, read_only=True) as reader:
        assert reader.manifest["format_version"] == 4 and reader.get(["v3"]).column("id").to_pylist() == ["v3"]


def test_readers_of_a_version_3_store_published_before_its_upgrade_see_version_4_after_it(version_3_store):
    """The catalog-only upgrade changes no row: the published version must still count as behind it."""
    store_path = version_3_store
    with mrlstore.open(store_path, read_only=True) as reader:  # publishes the version-3 catalog for readers
        assert reader.manifest["format_version"] == 3
    with mrlstore.open(store_path) as s:
        s.compact()
    with mrlstore.open(store_path, read_only=True) as reader:
        assert reader.manifest["format_version"] == 4 and reader.get(["v3"]).column("id").to_pylist() == ["v3"]


def test_a_version_3_store_with_deleted_rows_is_rewritten_as_version_4(version_3_store):
    store_path = version_3_store
    with mrlstore.open(store_path) as s:
        s.delete(["v3"])
        assert s.compact().rows_after == 29 and s.manifest["format_version"] == 4
        add(s, ["v3"])
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["v4"])
        assert s.verify() == []
    assert id_constraints(store_path) == [("NOT NULL",)]


KILLED_IN_UPGRADE = """
import os, signal, sys
import mrlstore
from mrlstore.tiers import catalog

original = catalog.Catalog._put_manifest
def put_manifest(self, key, value):
    if key == "format_version":  # inside the upgrade's transaction, its new table filled
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, key, value)
catalog.Catalog._put_manifest = put_manifest
with mrlstore.open(sys.argv[1]) as s:
    s.compact()
"""


def test_a_writer_killed_while_upgrading_a_catalog_leaves_it_as_it_was(store_path):
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"v{j}" for j in range(30)], metadata=[{"n": j} for j in range(30)])
    make_version_3(store_path)
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_UPGRADE, str(store_path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert id_constraints(store_path) == [("NOT NULL",), ("UNIQUE",)]
    with mrlstore.open(store_path) as s:
        assert s.manifest["format_version"] == 3 and len(s) == 30 and s.verify() == []
        s.compact()
        assert s.manifest["format_version"] == 4 and s.get(["v9"]).column("n").to_pylist() == [9]


def test_ids_whose_hashes_collide_are_told_apart_by_the_catalog(store_path, monkeypatch):
    monkeypatch.setattr(catalog_module, "_ID_HASH", "hash(id) % 3")  # every id shares its hash with a third
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        for i in range(0, 40, 10):
            add(s, [f"c{j}" for j in range(i, i + 10)])
        assert s.get(["c7", "c33", "c0"]).column("id").to_pylist() == ["c7", "c33", "c0"]
        with pytest.raises(mrlstore.DuplicateIdError, match="c21"):
            add(s, ["fresh", "c21"])
        add(s, ["c5", "fresh"], on_conflict="skip")
        assert len(s) == 41
        s.delete(["c8"])
        with pytest.raises(mrlstore.UnknownIdError):
            s.get(["c8"])
        add(s, ["c8"])
        assert len(s) == 41 and s.verify() == []


def test_a_lost_or_damaged_id_cache_is_rebuilt_by_the_next_writer(store_path):
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        for i in range(0, 100, 20):
            add(s, [f"x{j}" for j in range(i, i + 20)])
    runs = sorted((store_path / ID_DIR).glob("*.run"))
    with open(runs[0], "r+b") as f:
        f.truncate(100)  # a run cut short (by a full disk, say) is not used
    with mrlstore.open(store_path) as s:
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["x0"])
        assert s.get(["x1"]).column("id").to_pylist() == ["x1"]
    for run in (store_path / ID_DIR).glob("*.run"):
        run.unlink()
    with mrlstore.open(store_path, read_only=True) as reader:  # a reader looks up what no run holds
        assert reader.get(["x99", "x50"]).column("id").to_pylist() == ["x99", "x50"]
    with mrlstore.open(store_path) as s:
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["x42"])
        assert list((store_path / ID_DIR).glob("*.run"))  # built again from the catalog


@pytest.mark.parametrize("part", ["hashes", "rows", "legacy hashes", "legacy rows"])
def test_a_run_whose_pairs_changed_is_not_used(store_path, part):
    """32 bytes flipped behind a good header: get() of the ids there said UnknownIdError, an add of one of them
    stored it twice, and verify() saw nothing until then. Runs written before their digest are checked for
    order and range."""
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"x{j}" for j in range(64)])
    run = max((store_path / ID_DIR).glob("*.run"), key=lambda p: p.stat().st_size)
    raw = bytearray(run.read_bytes())
    n = (len(raw) - 64) // 16
    if part.startswith("legacy"):
        raw[40:56] = bytes(16)  # no digest, as runs were written before it
    at = 64 + (8 * n if part.endswith("rows") else 0) + 8 * (n // 2)
    raw[at : at + 8] = (~np.frombuffer(bytes(raw[at : at + 8]), np.uint64)).tobytes()  # one pair's value flipped
    run.write_bytes(bytes(raw))
    with mrlstore.open(store_path, read_only=True) as reader:
        assert reader.get([f"x{j}" for j in range(64)]).num_rows == 64
    with mrlstore.open(store_path) as s:
        assert s.get([f"x{j}" for j in range(64)]).num_rows == 64
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, [f"x{j}" for j in range(64)])
        assert len(s) == 64 and s.verify() == []


def test_a_folder_where_a_run_was_is_left_and_the_ids_still_found(store_path):
    """A writer's load unlinked it: IsADirectoryError from every get and add, at every open."""
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"x{j}" for j in range(64)])
    run = next((store_path / ID_DIR).glob("*.run"))
    run.unlink()
    run.mkdir()
    for attempt in range(2):
        with mrlstore.open(store_path) as s:
            assert s.get(["x5"]).num_rows == 1
            with pytest.raises(mrlstore.DuplicateIdError):
                add(s, ["x5"])
            s.snapshot(store_path.parent / f"copy{attempt}")  # the folder is not copied (it was StorageError)
        with mrlstore.open(store_path.parent / f"copy{attempt}") as copy:
            assert copy.get(["x5"]).num_rows == 1


def test_a_reader_past_many_rows_without_runs_finds_ids_through_the_catalog(store_path, monkeypatch):
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"y{j}" for j in range(50)])
    monkeypatch.setattr(id_index, "READER_TAIL_ROWS", 10)
    for run in (store_path / ID_DIR).glob("*.run"):
        run.unlink()
    with mrlstore.open(store_path, read_only=True) as reader:
        assert reader.get(["y49", "y3"]).column("id").to_pylist() == ["y49", "y3"]
        with pytest.raises(mrlstore.UnknownIdError):
            reader.get(["nope"])


KILLED_AFTER_A_STEP = """
import os, signal, sys
import numpy as np, pyarrow as pa
from mrlstore.options import StoreConfig
from mrlstore.tiers import catalog, id_index
from mrlstore.upkeep.staged import StagedWriter

catalog.APPEND_STEP_ROWS = 30
id_index.TAIL_ROWS = 8  # the first step's 40 rows go to a run past the committed watermark
original, steps = catalog.Catalog._insert_step, []
def insert_step(self, *args):
    steps.append(1)
    if len(steps) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args)
catalog.Catalog._insert_step = insert_step
StagedWriter(sys.argv[1], StoreConfig()).commit_staged(sys.argv[2:])
"""


def test_runs_of_a_write_killed_between_steps_go_at_the_next_writers_open(tmp_path):
    from mrlstore.inputs.staging import write_fragment

    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        vectors = np.random.default_rng(0).standard_normal((40, DIM)).astype(np.float32)
        table = pa.table({"id": [f"r{i}" for i in range(40)], "embedding": list(vectors)})
        paths = [write_fragment(tmp_path / "f", t, "embedding", "id", s.staging_shape())["path"]
                 for t in (table.slice(0, 20), table.slice(20, 20))]  # fmt: skip
        more = pa.table({"id": ["r40"], "embedding": [np.ones(DIM, np.float32)]})
        paths.append(write_fragment(tmp_path / "f", more, "embedding", "id", s.staging_shape())["path"])
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_STEP, str(path), *paths], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in (path / ID_DIR).glob("*.run")]  # the dead step's run, past the watermark
    with mrlstore.open(path, read_only=True) as reader:
        with pytest.raises(mrlstore.UnknownIdError):
            reader.get(["r0"])
    with mrlstore.open(path) as s:
        add(s, ["r5", "r6"])  # the dead write's ids were never stored
        assert all(int(p.stem.split("-")[1]) <= 1 for p in (path / ID_DIR).glob("*.run"))  # loaded lazily
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["old"])
        with pytest.raises(mrlstore.DuplicateIdError):
            s.commit_staged(paths)  # r5 and r6 are stored now
        assert len(s) == 3 and s.verify() == []
    assert os.path.exists(path)


def test_an_id_cache_that_cannot_be_written_keeps_its_pairs_in_memory(store_path, monkeypatch):
    def full_disk(self, *args):
        raise OSError(28, "No space left on device")

    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"z{j}" for j in range(4)])
        with monkeypatch.context() as patched:
            patched.setattr(IdIndex, "_write_run", full_disk)
            for i in range(4, 40, 6):  # each commit past TAIL_ROWS tries to write a run
                add(s, [f"z{j}" for j in range(i, i + 6)])
            assert not list((store_path / ID_DIR).glob("*.run")) and len(s) == 40
            with pytest.raises(mrlstore.DuplicateIdError):
                add(s, ["z39"])
        add(s, ["z40"])
        assert list((store_path / ID_DIR).glob("*.run"))
    with mrlstore.open(store_path) as s:
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["z17"])
        assert s.verify() == []


def staged_fragments(store, folder, *id_lists):
    from mrlstore.inputs.staging import write_fragment

    paths = []
    for ids in id_lists:
        v = np.random.default_rng(len(paths)).standard_normal((len(ids), DIM)).astype(np.float32)
        table = pa.table({"id": ids, "embedding": list(v)})
        paths.append(write_fragment(folder, table, "embedding", "id", store.staging_shape())["path"])
    return paths


def test_an_id_repeated_within_a_write_is_refused_among_colliding_hashes(store_path, tmp_path, monkeypatch):
    from mrlstore.options import StoreConfig
    from mrlstore.upkeep.staged import StagedWriter

    monkeypatch.setattr(catalog_module, "_ID_HASH", "0")  # every id collides with every other
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, ["old"])
        paths = staged_fragments(s, tmp_path / "f", ["b", "d"], ["e", "b"])
    writer = StagedWriter(store_path, StoreConfig())
    try:
        with pytest.raises(mrlstore.DuplicateIdError, match="'b'"):
            writer.commit_staged(paths)
    finally:
        writer.close()
    with mrlstore.open(store_path) as s:
        assert len(s) == 1 and s.verify() == []


def test_a_reader_opened_before_a_compaction_finds_ids_by_its_own_row_numbers(store_path):
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        for i in range(0, 40, 5):
            add(s, [f"x{j}" for j in range(i, i + 5)])
        s.delete([f"x{j}" for j in range(1, 40, 2)])  # compaction renumbers x2k to k
        with mrlstore.open(store_path, read_only=True) as reader:
            s.compact()
            assert list((store_path / ID_DIR).glob("*.run"))  # the new store's runs, of other row numbers
            got = reader.get(["x10", "x20", "x38"]).column("id").to_pylist()
        assert got == ["x10", "x20", "x38"] and s.get(["x10"]).column("id").to_pylist() == ["x10"]


def test_a_failed_write_in_steps_keeps_the_committed_runs(store_path, tmp_path, monkeypatch):
    from mrlstore.options import StoreConfig
    from mrlstore.upkeep.staged import StagedWriter

    monkeypatch.setattr(catalog_module, "APPEND_STEP_ROWS", 8)
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        for i in range(0, 64, 16):
            add(s, [f"c{j}" for j in range(i, i + 16)])
        paths = staged_fragments(s, tmp_path / "f", *[[f"n{j}" for j in range(i, i + 8)] for i in range(0, 40, 8)])
        paths += staged_fragments(s, tmp_path / "g", ["n3"])  # a repeat in the last step
    committed = {p.name for p in (store_path / ID_DIR).glob("*.run")}
    writer = StagedWriter(store_path, StoreConfig())
    try:
        with pytest.raises(mrlstore.DuplicateIdError):
            writer.commit_staged(paths)
    finally:
        writer.close()
    assert committed <= {p.name for p in (store_path / ID_DIR).glob("*.run")}  # the write's runs merged apart
    with mrlstore.open(store_path) as s:
        add(s, ["n3"])
        with pytest.raises(mrlstore.DuplicateIdError):
            add(s, ["c63"])


def test_verify_reports_an_id_stored_twice(store_path):
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, ["a", "b"])
    with duckdb.connect(str(store_path / catalog_module.DB_FILE)) as con:
        con.execute("UPDATE _items SET id = 'a' WHERE id = 'b'")
    with mrlstore.open(store_path) as s:
        assert s.verify() == ["ids stored at more than one live row, e.g. ['a']"]


@pytest.mark.parametrize("change", ["delete", "upsert"])
def test_a_reader_on_an_older_version_finds_rows_a_later_writer_deleted(store_path, monkeypatch, change):
    """Runs a later writer builds hold the pairs of its own live rows: a row deleted (or replaced) since a
    reader's version was missing from them, and the reader's get said UnknownIdError for a row its sql saw."""
    monkeypatch.setattr(id_index, "TAIL_ROWS", 8)
    with mrlstore.open(store_path, dim=DIM, index_dims=[8]) as s:
        add(s, [f"a{j}" for j in range(6)])  # below TAIL_ROWS: no run yet
    with mrlstore.open(store_path, read_only=True) as reader:
        with mrlstore.open(store_path) as writer:
            if change == "delete":
                writer.delete(["a3"])
            else:
                writer.upsert_vectors(np.ones((1, DIM), np.float32), ids=["a3"])
        with mrlstore.open(store_path) as writer:
            add(writer, [f"b{j}" for j in range(20)])  # the runs now cover rows from 0, without a3's
        assert list((store_path / ID_DIR).glob("*.run"))
        assert reader.sql("SELECT count(*) AS n FROM items WHERE id = 'a3'").column("n").to_pylist() == [1]
        assert reader.get(["a3", "a4"]).column("id").to_pylist() == ["a3", "a4"]
        with pytest.raises(mrlstore.UnknownIdError):
            reader.get(["nope"])
