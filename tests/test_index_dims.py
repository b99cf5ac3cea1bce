"""Changing which prefixes a store indexes (``Store.set_index_dims``): new indexes built from the stored
rows, old ones and the tuning that used them dropped, readers following, and a crash at any moment leaving
the old indexes or the new."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from killing import killed_part_way
from publishing import publish_now

import mrlstore
from mrlstore.testing import exact_search, mrl_like, recall_at_k

DIM = 256
N = 3000


def _filled(path, n: int = N) -> tuple[mrlstore.Store, np.ndarray]:
    x, _ = mrl_like(n, DIM, noise=1.0, seed=5)
    store = mrlstore.open(path, dim=DIM, bands=(16, 64, DIM), chunk_rows=1024)
    store.add_vectors(x, ids=[str(i) for i in range(n)])
    return store, x


def _index_files(path) -> set[str]:
    return {p.name for p in (path / "index").iterdir()}


def test_a_wider_index_is_built_from_the_stored_rows_and_the_dropped_one_goes(tmp_path, monkeypatch):
    from mrlstore.query import tuning

    path = tmp_path / "s"
    store, x = _filled(path)
    with store:
        # whether tune keeps the fit is a race of timings (on a busy machine the raw prefixes can win): keep it
        monkeypatch.setattr(tuning, "_keeps_fit", lambda *args: True)
        store.tune(recall=0.9, k=10, sample=100)
        monkeypatch.undo()
        assert "fit" in store.manifest  # the codes fitted to the 16- and 32-d indexes go with them
        store.set_index_dims([128, 32])
        assert store.index_dims == (32, 128) and len(store) == N
        assert store.index_status == {32: "loaded", 128: "loaded"}
        assert "tuned" not in store.manifest and "fit" not in store.manifest
        assert store.config.index_dims == (32, 128)
        assert store.manifest["hnsw_ef_construction_by_prefix"] == {"128": 200}  # a new store's for 128
        assert _index_files(path) == {f"prefix_{d:05d}.{e}" for d in (32, 128) for e in ("hnsw", "json")}
        queries = x[:50]
        found = store.query(queries, k=10, dims=[128, DIM], shortlist=40)
        truth = exact_search(x, queries, 10)
        assert recall_at_k([[int(i) for i in h.ids] for h in found], truth) >= 0.95
        # the new index tunes (which shape is fastest is a race of timings: an exact scan can win on a busy machine)
        store.tune(recall=0.9, k=10, sample=100, dims=[128, DIM])
        shape = store.manifest["tuned"]["shapes"][f"128,{DIM}"]  # measured whether or not it won
        assert shape["reached"] and shape["recall"] >= 0.9
    with pytest.raises(mrlstore.ConfigMismatchError, match="index_dims"):
        mrlstore.open(path, index_dims=(16, 32))
    with mrlstore.open(path, index_dims=(128, 32)) as store:
        assert set(store.index_status.values()) <= {"loaded", "fitted code"}  # saved: nothing rebuilt at open


def test_bad_index_dims_are_refused_and_change_nothing(tmp_path):
    store, _ = _filled(tmp_path / "s")
    with store:
        store.tune(recall=0.9, k=10, sample=100)
        before = store.manifest
        for bad in ([0, 32], [16, 300], [16, 16], "16", [16.5]):
            with pytest.raises(mrlstore.InvalidInputError, match="index_dims"):
                store.set_index_dims(bad)
        store.set_index_dims((32, 16))  # the same prefixes: nothing to do, the tuning stays
        assert store.manifest == before
    with mrlstore.open(tmp_path / "s", read_only=True) as reader:
        with pytest.raises(mrlstore.ReadOnlyError):
            reader.set_index_dims([64])


def test_rows_with_an_all_zero_prefix_refuse_a_cosine_index_of_it(tmp_path):
    """Stored while 16 was not indexed, such a row was taken into a new 16-d index; from then on every
    compaction failed (ZeroVectorError) and verify called the row lost."""
    x = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    x[5, :16] = 0
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 32, 64), index_dims=(32,)) as store:
        store.add_vectors(x, ids=[f"i{i}" for i in range(200)])
        with pytest.raises(mrlstore.ZeroVectorError, match=r"all-zero 16-d prefix, e.g. ids \['i5'\]"):
            store.set_index_dims((16, 32))
        assert store.index_dims == (32,) and store.verify() == []
        store.delete(["i5"])
        store.set_index_dims((16, 32))
        store.delete(["i0"])
        assert store.compact().rows_after == 198 and store.verify() == []


def test_a_writers_open_removes_the_index_files_of_prefixes_not_indexed(tmp_path):
    """A set_index_dims killed after saving its new indexes and before its commit left their files for good
    (12.6 MiB for a 128-d index of 20k rows): the state is the store with those files beside it."""
    import shutil

    path = tmp_path / "s"
    store, _ = _filled(path, n=2000)
    store.set_index_dims((16, 32, 128))
    store.close()
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("prefix_00128.hnsw", "prefix_00128.json"):
        shutil.copy(path / "index" / name, kept / name)
    with mrlstore.open(path) as store:
        store.set_index_dims((16, 32))
    for name in ("prefix_00128.hnsw", "prefix_00128.json"):
        shutil.copy(kept / name, path / "index" / name)  # as a build killed before its commit leaves them
    with mrlstore.open(path, read_only=True) as reader:
        assert reader.index_dims == (16, 32) and (path / "index" / "prefix_00128.hnsw").exists()
    with mrlstore.open(path) as store:
        assert store.index_dims == (16, 32) and store.verify() == []
    assert sorted(p.name for p in (path / "index").glob("prefix_*")) == [
        "prefix_00016.hnsw", "prefix_00016.json", "prefix_00032.hnsw", "prefix_00032.json"]  # fmt: skip


def test_an_explicit_default_hnsw_m_applies_to_every_index_also_of_new_prefixes(tmp_path):
    """hnsw_m=16 or ef_construction=40 given (the defaults) was taken for none: set_index_dims gave the new 8-d
    index M=8 and the 64-d one ef_construction 200; and a default store reopened with hnsw_m=16 said nothing,
    though its 16-d index uses M=8."""
    x, _ = mrl_like(500, DIM, seed=1)
    opts = {"dim": DIM, "bands": (16, 64, DIM), "index_dims": (32,)}
    with mrlstore.open(tmp_path / "s", hnsw_m=16, ef_construction=40, **opts) as store:
        store.add_vectors(x)
        store.set_index_dims((8, 32, 64))
        assert store.manifest["hnsw_M_by_prefix"] == {} and store.manifest["hnsw_ef_construction_by_prefix"] == {}
    with mrlstore.open(tmp_path / "d", **{**opts, "index_dims": (16, 32)}):
        pass
    with pytest.raises(mrlstore.ConfigMismatchError, match=r"hnsw_M_by_prefix=\{16: 8\}"):
        mrlstore.open(tmp_path / "d", hnsw_m=16)


def test_a_failed_load_after_the_commit_closes_the_handle_with_the_reason(tmp_path, monkeypatch):
    """The change is committed before the new indexes load; if they cannot (a fault injected into our own
    loading step), the handle is closed, says why, and frees the store for the next open."""
    from mrlstore.upkeep import opening

    path = tmp_path / "s"
    store, x = _filled(path)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(opening, "reload_indexes", refuse)
    with pytest.raises(OSError, match="No space left"):
        store.set_index_dims([64])
    monkeypatch.undo()
    for call in (lambda: len(store), lambda: store.query(x[0], k=5), lambda: store.add_vectors(x[:1], ids=["new"])):
        with pytest.raises(mrlstore.StoreClosedError, match="could not be loaded; open it again"):
            call()
    store.close()  # closed already: nothing to do
    with mrlstore.open(path) as again:  # the lock was released; the change was committed
        assert again.index_dims == (64,) and len(again) == N
        assert again.query(x[0], k=5).ids[0] == "0"


def test_a_scan_and_an_export_going_on_outlive_a_change_of_the_indexed_prefixes(tmp_path):
    """Only the indexes change: the catalog and bands stay open, so readers of rows in progress go on (they
    raised StoreClosedError, "a compaction or refresh replaced the store's files")."""
    path = tmp_path / "s"
    store, x = _filled(path)
    with store:
        scan = store.scan(dims=16, batch_size=500)
        first = scan.read_next_batch()
        rows = store.scan(dims=16, batch_size=500)
        store.set_index_dims([64])
        rest = [first, *scan]
        assert sum(b.num_rows for b in rest) == N
        got = np.concatenate([np.asarray(b.column("vector").values).reshape(-1, 16) for b in rest])
        np.testing.assert_allclose(got, x[:, :16], rtol=1e-3, atol=1e-3)
        assert store.export_parquet(tmp_path / "out.parquet") == N
        assert sum(b.num_rows for b in rows) == N
        assert store.index_dims == (64,) and store.query(x[0], k=5).ids[0] == "0"


def test_a_reader_refreshes_to_the_new_indexes(tmp_path):
    path = tmp_path / "s"
    store, x = _filled(path)
    with store, mrlstore.open(path, read_only=True) as reader:
        assert reader.index_dims == (16, 32)
        store.set_index_dims([64])
        publish_now(store)
        assert reader.refresh()
        assert reader.index_dims == (64,) and reader.index_status == {64: "loaded"}
        got, want = reader.query(x[:3], k=5, dims=[64, DIM]), store.query(x[:3], k=5, dims=[64, DIM])
        assert [h.ids for h in got] == [h.ids for h in want]
        assert not any(name.startswith("prefix_00016") for name in _index_files(path))


def test_readers_opening_after_the_change_get_the_new_indexes(tmp_path):
    path = tmp_path / "s"
    store, _ = _filled(path)
    with store:
        with mrlstore.open(path, read_only=True) as reader:  # a version published for readers
            assert reader.index_dims == (16, 32)
        store.set_index_dims([64])  # an untuned store: only the indexed prefixes change
    with mrlstore.open(path, read_only=True) as reader:
        assert reader.index_dims == (64,) and reader.index_status == {64: "loaded"}


SIGKILL_REINDEXER = textwrap.dedent(
    """
    import sys, mrlstore
    store = mrlstore.open(sys.argv[1])
    print("READY", flush=True)
    store.set_index_dims([32, 128])
    print("DONE", flush=True)
    """
)


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
def test_sigkill_while_indexing_other_prefixes_leaves_the_old_indexes_or_the_new(tmp_path):
    path = tmp_path / "s"
    store, x = _filled(path, n=20_000)  # a 128-d build long enough to be killed part way
    store.close()
    script = tmp_path / "reindexer.py"
    script.write_text(SIGKILL_REINDEXER)
    seen = set()
    for _ in killed_part_way(script, [str(path)], (0.05, 0.5, 1.5, 3.0, 120.0)):
        with mrlstore.open(path) as store:
            assert store.verify() == [] and len(store) == 20_000
            seen.add(store.index_dims)
            assert store.index_dims in {(16, 32), (32, 128)}
            found = store.query(x[:20], k=10, dims=[store.index_dims[-1], DIM], shortlist=50)
            truth = exact_search(x, x[:20], 10)
            assert recall_at_k([[int(i) for i in h.ids] for h in found], truth) >= 0.9
        if store.index_dims == (32, 128):  # start again from the old prefixes
            with mrlstore.open(path) as store:
                store.set_index_dims([16, 32])
    assert seen == {(16, 32), (32, 128)}  # killed before the commit, and ended (or killed) after it
