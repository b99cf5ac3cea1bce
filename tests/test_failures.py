"""Failures between the commit point and the in-memory update must never lose or damage committed rows."""

from __future__ import annotations

import json
import os
import threading

import duckdb
import numpy as np
import pytest

import mrlstore
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.hnsw import PrefixIndex


def _vectors(store, ids):
    return np.stack(store.get(ids).column("vector").to_numpy(zero_copy_only=False))


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


def test_index_failure_before_the_commit_changes_nothing(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((30, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"a{i}" for i in range(10)])

        def failing_add(self, *args, **kwargs):
            raise MemoryError("simulated failure while updating the index")

        with monkeypatch.context() as m:
            m.setattr(PrefixIndex, "add", failing_add)
            with pytest.raises(MemoryError):
                store.add_vectors(x[10:20], ids=[f"b{i}" for i in range(10)])
        assert len(store) == 10 and store.info()["rows"] == 10
        store.add_vectors(x[20:], ids=[f"c{i}" for i in range(10)])  # reuses the rows the failed write had
        assert store.query(x[25], k=1, dims=[8, 64]).ids == ["c5"]
        assert "b0" not in store.sql("SELECT id FROM items").column("id").to_pylist()


def test_failure_after_the_commit_keeps_the_write_and_the_store_usable(tmp_path, rng, monkeypatch):
    from mrlstore.write.writer import Writer

    x = rng.standard_normal((30, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"a{i}" for i in range(10)])

        def failing_publish(self, *args, **kwargs):
            raise MemoryError("simulated failure while publishing a committed write")

        with monkeypatch.context() as m:
            m.setattr(Writer, "_show", failing_publish)
            with pytest.raises(MemoryError):
                store.add_vectors(x[10:20], ids=[f"b{i}" for i in range(10)])
        assert len(store) == 20  # committed before the failure: durable and visible after the resync
        store.add_vectors(x[20:], ids=[f"c{i}" for i in range(10)])  # later writes still work
        np.testing.assert_array_equal(_vectors(store, ["a0", "b0", "c9"]), _f16(x[[0, 10, 29]]))
        assert store.query(x[15], k=1, dims=[8, 64]).ids == ["b5"]
    with mrlstore.open(tmp_path / "s") as store:
        assert len(store) == 30
        np.testing.assert_array_equal(_vectors(store, ["b0"]), _f16(x[[10]]))


def test_interrupt_right_after_the_commit_does_not_truncate(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((20, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"a{i}" for i in range(10)])
        original = Catalog.commit_rows

        def commit_then_interrupt(self, *args, **kwargs):
            original(self, *args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(Catalog, "commit_rows", commit_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            store.add_vectors(x[10:], ids=[f"b{i}" for i in range(10)])
        monkeypatch.setattr(Catalog, "commit_rows", original)
        assert len(store) == 20
        np.testing.assert_array_equal(_vectors(store, ["b3"]), _f16(x[[13]]))
        store.add_vectors(x[:1] + 1, ids=["later"])
    with mrlstore.open(tmp_path / "s") as store:
        assert len(store) == 21
        np.testing.assert_array_equal(_vectors(store, ["b3", "a3"]), _f16(x[[13, 3]]))


class _InterruptOnce:
    """A DuckDB connection whose ``method`` runs, then raises KeyboardInterrupt once (Ctrl-C landing there);
    with ``sql``, only a statement containing it, and ``raised`` instead of running it if given (DuckDB's own
    reports of an interrupt)."""

    def __init__(self, con, method: str, sql: str = "", raised: Exception | None = None):
        self._con, self._method, self._armed, self._sql, self._raised = con, method, True, sql, raised

    def __getattr__(self, name):
        real = getattr(self._con, name)
        if name != self._method or not self._armed:
            return real

        def interrupted(*args, **kwargs):
            if self._sql not in str(args[:1]):
                return real(*args, **kwargs)
            self._armed = False
            if self._raised is not None:
                raise self._raised
            real(*args, **kwargs)
            raise KeyboardInterrupt

        return interrupted


@pytest.mark.parametrize("where", ["begin", "commit"])
def test_a_delete_interrupted_around_its_transaction_leaves_the_handle_as_the_catalog_is(tmp_path, rng, where):
    """Ctrl-C right after BEGIN left the transaction open (every later call said CorruptStoreError, 'Current
    transaction is aborted'); right after COMMIT the handle still counted and found the deleted row."""
    x = rng.standard_normal((100, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x, ids=[f"r{i}" for i in range(100)])
        catalog = store._state.catalog
        catalog._con = _InterruptOnce(catalog._con, where)
        with pytest.raises(KeyboardInterrupt):
            store.delete(["r7"])
        gone = where == "commit"
        assert len(store) == 100 - gone and store.sql("SELECT count(*) AS n FROM items")["n"][0].as_py() == 100 - gone
        assert (store.query(x[7], k=1, dims=[64]).ids == ["r7"]) is not gone
        store.delete(["r8"])
        assert len(store) == 99 - gone and store.verify() == []
    with mrlstore.open(tmp_path / "s") as store:
        assert len(store) == 99 - gone and store.verify() == []


INTERRUPTS = {
    "between execute and fetch": None,
    "DuckDB stopped the statement": RuntimeError("Query interrupted"),
    "DuckDB was reading an Arrow table": duckdb.InvalidInputException(
        "Invalid Input Error: reading the schema of the object registered as '_meta_check' failed: KeyboardInterrupt: "
    ),
}


@pytest.mark.parametrize("sql", ["information_schema.columns", "DESCRIBE SELECT", "hash("])
@pytest.mark.parametrize("how", INTERRUPTS)
def test_ctrl_c_in_a_catalog_statement_of_an_add_is_a_keyboard_interrupt_and_adds_go_on(tmp_path, rng, sql, how):
    """Between DuckDB's execute and its fetch, the connection kept an unfinished result, and every later add
    failed ('Resource In Use Error', called corruption) until a reopen; DuckDB's own words for an interrupt
    came out as CorruptStoreError, MetadataError or RuntimeError."""
    x = rng.standard_normal((30, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"r{i}" for i in range(10)], metadata=[{"n": i} for i in range(10)])
        catalog = store._state.catalog
        catalog._columns = None  # read again: the add's first statement
        catalog._con = _InterruptOnce(catalog._con, "execute", sql, INTERRUPTS[how])
        with pytest.raises(KeyboardInterrupt):
            store.add_vectors(x[10:20], ids=[f"r{i}" for i in range(10, 20)], metadata=[{"n": 1}] * 10)
        assert not catalog._con._armed  # the statement was reached
        store.add_vectors(x[20:], ids=[f"r{i}" for i in range(20, 30)], metadata=[{"n": 2}] * 10)
        assert len(store) == 20 and store.verify() == []
    with mrlstore.open(tmp_path / "s") as store:
        assert len(store) == 20 and store.get(["r25"])["n"].to_pylist() == [2] and store.verify(full=True) == []


def test_errors_naming_an_interrupt_or_raised_while_one_is_handled_stay_what_they_are(tmp_path, rng):
    """Only this call's own Ctrl-C is given back as KeyboardInterrupt: a query whose text says
    'KeyboardInterrupt', or a bad query run in an `except KeyboardInterrupt:` cleanup, is the error it was."""
    x = rng.standard_normal((10, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x, ids=[f"r{i}" for i in range(10)], metadata=[{"n": i} for i in range(10)])
        bad = [
            lambda: store.sql("SELECT 'KeyboardInterrupt'::INT"),
            lambda: store.sql("SELECT KeyboardInterrupt FROM items"),
            lambda: store.query(x[0], k=1, where="KeyboardInterrupt > 1"),
        ]
        for call in bad:
            with pytest.raises(mrlstore.InvalidFilterError):
                call()
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                with pytest.raises(mrlstore.InvalidFilterError):
                    call()
        assert len(store) == 10


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "DuckDB stopped the statement"])
@pytest.mark.parametrize("call", ["sql", "filtered query"])
def test_ctrl_c_in_the_rollback_of_a_read_leaves_no_transaction_open(tmp_path, rng, call, how):
    """sql() and where= filters read in a transaction they roll back; a Ctrl-C landing in the rollback left it
    open, and the next add failed ('cannot start a transaction within a transaction', untyped)."""
    x = rng.standard_normal((30, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"r{i}" for i in range(10)], metadata=[{"n": i} for i in range(10)])
        catalog = store._state.catalog
        raised = KeyboardInterrupt() if how == "KeyboardInterrupt" else RuntimeError("Query interrupted")
        catalog._con = _InterruptOnce(catalog._con, "rollback", raised=raised)
        with pytest.raises(KeyboardInterrupt):
            if call == "sql":
                store.sql("SELECT count(*) FROM items")
            else:
                store.query(x[3], k=2, where="n < 5")
        assert not catalog._con._armed
        store.add_vectors(x[10:], ids=[f"r{i}" for i in range(10, 30)])
        assert len(store) == 30 and store.verify() == []


@pytest.mark.parametrize("read_only", [False, True])
def test_ctrl_c_while_the_catalog_opens_is_a_keyboard_interrupt(tmp_path, rng, monkeypatch, read_only):
    """DuckDB's RuntimeError('Query interrupted') came out of open() and a reader's refresh."""
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(rng.standard_normal((10, 64)).astype(np.float32))
    from mrlstore.tiers import catalog

    real = catalog.duckdb.connect
    interrupted = RuntimeError("Query interrupted")
    monkeypatch.setattr(
        catalog.duckdb, "connect", lambda *a, **k: _InterruptOnce(real(*a, **k), "execute", "SET", interrupted)
    )
    with pytest.raises(KeyboardInterrupt):
        mrlstore.open(tmp_path / "s", read_only=read_only)
    monkeypatch.undo()
    with mrlstore.open(tmp_path / "s", read_only=read_only) as store:
        assert len(store) == 10


def test_zarr_shorter_than_the_commit_is_corruption(tmp_path, rng):
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64)) as store:
        store.add_vectors(rng.standard_normal((10, 64)))
    meta_path = tmp_path / "s" / "vectors" / "band_00008_00064" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(mrlstore.CorruptStoreError, match="committed 10"):
        mrlstore.open(tmp_path / "s")


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe not json", b'{"zarr_format": 3, "node_type": "array"}'])
def test_verify_names_group_metadata_zarr_readers_cannot_open(tmp_path, rng, garbage):
    """The store reads its arrays without the group's zarr.json, so damage there went unseen by verify()
    while Zarr readers, which the README says open the bands, could not."""
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64)) as store:
        store.add_vectors(rng.standard_normal((10, 64)))
        assert store.verify() == []
    (tmp_path / "s" / "vectors" / "zarr.json").write_bytes(garbage)
    with mrlstore.open(tmp_path / "s") as store:
        found = store.verify()
        assert len(found) == 1 and "Zarr readers cannot open" in found[0] and len(store) == 10


def test_unsorted_index_dims_create_a_store(tmp_path):
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), index_dims=(32, 16)) as store:
        assert store.index_dims == (16, 32)
    with mrlstore.open(tmp_path / "s", index_dims=(32, 16)) as store:
        assert store.index_dims == (16, 32)


def test_tune_saves_nothing_when_the_target_is_out_of_reach(tmp_path, rng):
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(rng.standard_normal((300, 64)))  # random data: an 8-d prefix says little
        with pytest.raises(mrlstore.InvalidInputError, match="nothing was saved"):
            store.tune(recall=1.0, dims=[8, 16])
        assert "tuned" not in store.manifest
        assert "tuned" not in store.sql("SELECT key FROM manifest").column("key").to_pylist()


def test_writers_are_not_starved_by_searches(rng):
    index = PrefixIndex(8, "cosine", M=8, ef_construction=50, capacity=16)
    index.add(rng.standard_normal((2000, 8)).astype(np.float32), np.arange(2000), covered_rows=2000)
    stop = threading.Event()

    def searcher():
        q = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
        while not stop.is_set():
            index.search(q, k=50, ef=200)

    threads = [threading.Thread(target=searcher) for _ in range(6)]
    for t in threads:
        t.start()
    writer = threading.Thread(
        target=index.add,
        args=(rng.standard_normal((10, 8)).astype(np.float32), np.arange(2000, 2010)),
        kwargs={"covered_rows": 2010},
    )
    writer.start()
    writer.join(timeout=120)  # liveness, not speed: before the fix the writer never got the lock
    finished = not writer.is_alive()
    stop.set()
    for t in threads:
        t.join()
    writer.join()
    assert finished, "a writer starved behind continuous searches"
    assert index.covered_rows == 2010


def test_a_query_during_a_commit_sees_one_point_in_time(tmp_path, rng, monkeypatch):
    from mrlstore.write.writer import Writer

    x = rng.standard_normal((50, 64)).astype(np.float32)
    new = rng.standard_normal((1, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x, ids=[f"a{i}" for i in range(50)], metadata=[{"g": i % 2} for i in range(50)])
        publishing = threading.Event()
        original = Writer._show

        def slow_publish(self, *args, **kwargs):
            publishing.set()
            threading.Event().wait(0.3)  # hold the commit/publish window open
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Writer, "_show", slow_publish)
        writer = threading.Thread(target=store.upsert_vectors, args=(new, ["a0"]), kwargs={"metadata": [{"g": 0}]})
        writer.start()
        assert publishing.wait(30)
        hits = store.query(new[0], k=1, dims=[8, 64], where="g = 0")  # waits for the publish to finish
        writer.join()
        assert hits.ids == ["a0"] and hits.scores[0] == pytest.approx(1.0, abs=1e-3)
        assert hits.metadata == [{"g": 0}]
        old = store.query(x[0], k=1, dims=[64])
        assert old.ids != ["a0"] or old.scores[0] < 0.99  # the replaced vector is gone


def test_rows_of_a_failed_commit_are_overwritten_in_the_index(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((30, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"a{i}" for i in range(10)])

        def failing_commit(self, *args, **kwargs):
            raise RuntimeError("simulated catalog failure before COMMIT")

        with monkeypatch.context() as m:
            m.setattr(Catalog, "commit_rows", failing_commit)
            with pytest.raises(RuntimeError):
                store.add_vectors(x[10:20], ids=[f"b{i}" for i in range(10)])  # reached the index, not the catalog
        assert len(store) == 10
        ghost = store.query(x[15], k=1, dims=[8, 64])
        assert ghost.ids != ["b5"] and ghost.scores[0] < 0.99  # uncommitted rows stay invisible
        store.add_vectors(x[20:], ids=[f"c{i}" for i in range(10)])  # same row numbers, new vectors
        assert store.query(x[25], k=1, dims=[8, 64]).ids == ["c5"]
        assert store.query(x[15], k=1, dims=[8, 64]).scores[0] < 0.99
    with mrlstore.open(tmp_path / "s") as store:
        assert store.query(x[25], k=1, dims=[8, 64]).ids == ["c5"] and len(store) == 20


def test_short_pwrites_are_completed_not_lost(tmp_path, rng, monkeypatch):
    """pwrite may write less than asked and say so only in its return value: every byte still lands."""
    import os

    from mrlstore import _fsutil

    real_pwrite, calls = os.pwrite, []

    def short_pwrite(fd, data, offset):  # noqa: ANN001, ANN202
        calls.append(len(data))
        return real_pwrite(fd, memoryview(data).cast("B")[:1000], offset)  # at most 1000 bytes a call

    monkeypatch.setattr(_fsutil.os, "pwrite", short_pwrite)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,), chunk_rows=128) as store:
        store.add_vectors(x[:200], ids=[f"a{i}" for i in range(200)])
        store.add_vectors(x[200:], ids=[f"a{i}" for i in range(200, 300)])
    monkeypatch.undo()
    assert max(calls) > 1000  # the writes were cut short
    with mrlstore.open(tmp_path / "s") as store:
        assert store.verify() == []
        np.testing.assert_array_equal(_vectors(store, [f"a{i}" for i in range(300)]), _f16(x))


def _duckdb_memory_limit(monkeypatch, limit: str) -> None:
    """Catalogs connected from now on get a DuckDB memory limit (a real one: the engine itself refuses)."""
    from mrlstore.tiers import catalog

    monkeypatch.setattr(catalog, "_SANDBOX_CONFIG", {**catalog._SANDBOX_CONFIG, "memory_limit": limit})


@pytest.mark.parametrize("step_rows", [None, 20_000], ids=["one-transaction", "in-steps"])
def test_duckdb_out_of_memory_is_typed_and_changes_nothing(tmp_path, rng, monkeypatch, step_rows):
    if step_rows:
        monkeypatch.setattr("mrlstore.tiers.catalog.APPEND_STEP_ROWS", step_rows)
    _duckdb_memory_limit(monkeypatch, "8MB")
    n = 150_000
    x = rng.standard_normal((n, 16)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=16, bands=(8, 16), index_dims=(8,)) as store:
        store.add_vectors(x[:10], ids=[f"a{i}" for i in range(10)])
        with pytest.raises(mrlstore.OutOfMemoryError, match="ran out of memory writing .*nothing was changed"):
            store.add_vectors(x, ids=[f"b{i}" for i in range(n)], metadata=[{"t": "x" * 200} for _ in range(n)])
        assert len(store) == 10 and store.sql("SELECT count(*) AS n FROM items").column("n").to_pylist() == [10]
        store.add_vectors(x[10:20], ids=[f"c{i}" for i in range(10)])  # the store stays usable
    with mrlstore.open(tmp_path / "s") as store:
        assert len(store) == 20 and store.query(x[15], k=1, dims=[8, 16]).ids == ["c5"]


def test_duckdb_out_of_memory_reading_is_not_corruption_or_a_bad_query(tmp_path, rng, monkeypatch):
    n = 100_000
    x = rng.standard_normal((n, 16)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=16, bands=(8, 16), index_dims=(8,)) as store:
        store.add_vectors(x, ids=[f"id{i}" for i in range(n)], metadata=[{"t": f"{i:0>200}"} for i in range(n)])
    _duckdb_memory_limit(monkeypatch, "8MB")  # below the ids and metadata an open loads
    with pytest.raises(mrlstore.OutOfMemoryError, match="reading"):
        mrlstore.open(tmp_path / "s")
    _duckdb_memory_limit(monkeypatch, "48MB")
    with mrlstore.open(tmp_path / "s") as store:
        heavy = "SELECT t || t || t || t AS long FROM items ORDER BY long DESC"
        with pytest.raises(mrlstore.OutOfMemoryError, match="running sql"):
            store.sql(heavy)
        assert store.sql("SELECT count(*) AS n FROM items").column("n").to_pylist() == [n]
        assert store.query(x[7], k=1, dims=[8, 16]).ids == ["id7"]


def test_failed_adds_leave_no_descriptors_or_maps_behind(tmp_path):
    """Each add refused inside its commit kept the four chunk maps its truncation replaced, each with a
    descriptor, until the store closed: 400 failures held 1,600 descriptors, and at the process's limit even
    valid adds and queries failed ('too many open files')."""
    rng = np.random.default_rng(0)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64)) as store:
        store.add_vectors(rng.standard_normal((1000, 64)).astype(np.float32), metadata=[{"tag": "a"}] * 1000)

        def refused() -> None:  # "Tag" clashes with the column "tag": found inside the commit
            with pytest.raises(mrlstore.MetadataError):
                store.add_vectors(rng.standard_normal((2, 64)).astype(np.float32), metadata=[{"Tag": "x"}] * 2)
            store.query(rng.standard_normal(64).astype(np.float32), k=1, dims=[64])  # maps the chunks again

        refused()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(30):
            refused()
        assert len(os.listdir("/proc/self/fd")) == before
        assert len(store) == 1000
