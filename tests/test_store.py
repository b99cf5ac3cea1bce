"""The public API end to end: ids, metadata, upsert/delete, get, sql, filters, persistence, threads."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pytest

import mrlstore
from mrlstore.query.plan import shortlist_sizes
from mrlstore.testing import exact_funnel, mrl_like


def _f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def test_add_query_get_round_trip(small_store, rng):
    x = rng.standard_normal((100, 64)).astype(np.float32)
    ids = small_store.add_vectors(
        x,
        ids=[f"v{i}" for i in range(100)],
        metadata=[{"label": "cat" if i % 3 else "dog", "n": i} for i in range(100)],
    )
    assert ids[:2] == ["v0", "v1"] and len(small_store) == 100
    hits = small_store.query(x[17], k=5, dims=[8, 64])
    assert isinstance(hits, mrlstore.Hits)
    assert hits.ids[0] == "v17" and hits.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert hits.metadata[0] == {"label": "cat", "n": 17}
    t = hits.to_arrow()
    assert t.column_names == ["id", "score", "label", "n"] and t.num_rows == 5
    assert list(hits.to_pandas()["id"]) == hits.ids
    table = small_store.get(["v5", "v2"], dims=16)
    assert table.column("id").to_pylist() == ["v5", "v2"]
    assert table.column("n").to_pylist() == [5, 2]
    vec = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(vec, _f16(x[[5, 2], :16]))


def test_generated_ids_are_unique_strings(small_store, rng):
    ids = small_store.add_vectors(rng.standard_normal((50, 64)))
    assert len(set(ids)) == 50 and all(isinstance(i, str) and i for i in ids)


def test_batch_queries_return_lists(small_store, rng):
    x = rng.standard_normal((60, 64)).astype(np.float32)
    small_store.add_vectors(x, ids=[str(i) for i in range(60)])
    many = small_store.query(x[:7], k=3, dims=[8, 16, 64])
    assert isinstance(many, list) and len(many) == 7
    assert [h.ids[0] for h in many] == [str(i) for i in range(7)]
    # a query longer than max(dims) is cut to the prefix it needs
    assert small_store.query(x[3], k=1, dims=[8, 16]).ids == small_store.query(x[3, :16], k=1, dims=[8, 16]).ids


def test_metadata_forms_and_new_columns(small_store, rng):
    import pandas as pd

    x = rng.standard_normal((9, 64))
    small_store.add_vectors(x[:3], ids=["a", "b", "c"], metadata=[{"label": "cat"}, {"label": "dog"}, {}])
    small_store.add_vectors(x[3:6], ids=["d", "e", "f"], metadata=pa.table({"label": ["x"] * 3, "w": [1.5, 2, 3]}))
    small_store.add_vectors(
        x[6:], ids=["g", "h", "i"], metadata=pd.DataFrame({"when": pd.to_datetime(["2024-01-01"] * 3)})
    )
    types = dict(
        small_store.sql(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'items'"
        ).to_pylist()
        and [
            (r["column_name"], r["data_type"])
            for r in small_store.sql(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'items'"
            ).to_pylist()
        ]
    )
    assert types["label"] == "VARCHAR" and types["w"] == "DOUBLE" and types["when"].startswith("TIMESTAMP")
    assert small_store.sql("SELECT count(*) AS n FROM items WHERE label IS NULL").column("n")[0].as_py() == 4
    assert small_store.query(x[4], k=1, where="w > 1.9").ids == ["e"]


def test_where_filters_are_exact_and_fill_k(tmp_path, rng):
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64)) as store:
        store.add_vectors(
            x, ids=[str(i) for i in range(3000)], metadata=[{"g": i % 100, "half": i % 2} for i in range(3000)]
        )
        for where, expected in [("g = 42", 30), ("half = 1", 1500), ("g < 3", 90)]:
            rows = np.array([int(r) for r in store.sql(f"SELECT id FROM items WHERE {where}").column("id").to_pylist()])
            hits = store.query(x[:4], k=25, dims=[16, 64], where=where)
            truth = exact_funnel(_f16(x[rows]), x[:4], [16, 64], shortlist_sizes(None, 25, 2), 25)
            for h, t in zip(hits, truth):
                assert len(h.ids) == min(25, expected)
                assert {int(i) for i in h.ids} <= set(rows.tolist())
                assert h.ids == [str(r) for r in rows[t]]
        assert store.query(x[0], k=5, where="g = 1000").ids == []


def test_filtered_hnsw_path_over_fetches(tmp_path, rng, monkeypatch):
    from mrlstore.query import funnel as search

    monkeypatch.setattr(search, "FILTER_EXACT_ROWS", 10)
    monkeypatch.setattr(search, "FILTER_EXACT_SHARE", 0.0)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(2000)], metadata=[{"g": i % 10} for i in range(2000)])
        hits = store.query(x[:5], k=10, dims=[16, 64], where="g = 3")
        for h in hits:
            assert len(h.ids) == 10 and all(int(i) % 10 == 3 for i in h.ids)


def test_upsert_replaces_and_delete_hides(small_store, rng):
    x = rng.standard_normal((40, 64)).astype(np.float32)
    small_store.add_vectors(x, ids=[str(i) for i in range(40)], metadata=[{"v": 1}] * 40)
    y = rng.standard_normal((2, 64)).astype(np.float32)
    small_store.upsert_vectors(y, ids=["3", "new"], metadata=[{"v": 2}, {"v": 2}])
    assert len(small_store) == 41
    got = small_store.get(["3", "new"])
    np.testing.assert_array_equal(np.stack(got.column("vector").to_numpy(zero_copy_only=False)), _f16(y))
    assert got.column("v").to_pylist() == [2, 2]
    assert small_store.query(x[3], k=1, dims=[8, 64]).ids != ["3"]
    assert small_store.query(y[0], k=1, dims=[8, 64]).ids == ["3"]
    assert small_store.delete(["5", "6"]) == 2 and len(small_store) == 39
    assert "5" not in small_store.query(x[5], k=39, dims=[64]).ids
    assert "6" not in small_store.query(x[6], k=5, dims=[8, 64]).ids
    small_store.add_vectors(x[5:6], ids=["5"])  # a deleted id may be used again
    assert small_store.query(x[5], k=1, dims=[8, 64]).ids == ["5"]


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_metrics_score_exactly(tmp_path, rng, metric):
    x = rng.standard_normal((200, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / metric, dim=64, bands=(16, 64), metric=metric) as store:
        store.add_vectors(x, ids=[str(i) for i in range(200)])
        q = rng.standard_normal(64).astype(np.float32)
        hits = store.query(q, k=5, dims=[16, 64], shortlist=200)
        xs = _f16(x)
        if metric == "cosine":
            s = xs @ q / (np.linalg.norm(xs, axis=1) * np.linalg.norm(q))
            order = np.argsort(-s)
        elif metric == "ip":
            s = xs @ q
            order = np.argsort(-s)
        else:
            s = np.linalg.norm(xs - q, axis=1)
            order = np.argsort(s)
        assert hits.ids == [str(i) for i in order[:5]]
        np.testing.assert_allclose(hits.scores, s[order[:5]], rtol=1e-4)


def test_reopen_keeps_everything(tmp_path, rng):
    x = rng.standard_normal((120, 64)).astype(np.float32)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=64, bands=(8, 64), index_dims=(8,), metric="ip", chunk_rows=16) as store:
        store.add_vectors(x[:100], ids=[str(i) for i in range(100)], metadata=[{"n": i} for i in range(100)])
        store.delete(["7"])
    with mrlstore.open(path) as store:
        assert store.info()["index_status"] == {8: "loaded"}
        assert (store.metric, store.dim, store.bands, len(store)) == ("ip", 64, (8, 64), 99)
        store.add_vectors(x[100:], ids=[str(i) for i in range(100, 120)])
        assert store.query(x[110], k=1, dims=[8, 64]).ids == ["110"]
    with mrlstore.open(path, read_only=True) as store:
        assert len(store) == 119 and "7" not in store.query(x[7], k=119, dims=[8, 64]).ids
        with pytest.raises(mrlstore.ReadOnlyError):
            store.add_vectors(x[:1])


@pytest.mark.parametrize("hnsw_m", [None, 12])
def test_hnsw_m_is_8_on_coarse_prefixes_by_default_and_a_given_m_everywhere(tmp_path, rng, hnsw_m):
    x = rng.standard_normal((80, 64)).astype(np.float32)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=64, index_dims=(8, 16, 32), hnsw_m=hnsw_m) as store:
        store.add_vectors(x, ids=[str(i) for i in range(80)])
        by_prefix = store.manifest["hnsw_M_by_prefix"]
    built = {d: json.loads((path / "index" / f"prefix_{d:05d}.json").read_text())["M"] for d in (8, 16, 32)}
    if hnsw_m is None:
        assert (built, by_prefix) == ({8: 8, 16: 8, 32: 16}, {"8": 8, "16": 8})
    else:
        assert (built, by_prefix) == ({8: 12, 16: 12, 32: 12}, {})
    with mrlstore.open(path, hnsw_m=hnsw_m) as store:  # the sidecars match what the manifest says: no rebuild
        assert store.info()["index_status"] == {8: "loaded", 16: "loaded", 32: "loaded"}
        assert store.query(x[5], k=1, dims=[32, 64]).ids == ["5"]


@pytest.mark.parametrize("ef_construction", [None, 64])
def test_wide_prefixes_get_a_better_built_graph_by_default_and_a_given_ef_construction_everywhere(
    tmp_path, rng, ef_construction
):
    x = rng.standard_normal((80, 128)).astype(np.float32)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=128, index_dims=(16, 32, 64), ef_construction=ef_construction) as store:
        store.add_vectors(x, ids=[str(i) for i in range(80)])
        by_prefix = store.manifest.get("hnsw_ef_construction_by_prefix")
        config = store.config
    sidecars = {d: json.loads((path / "index" / f"prefix_{d:05d}.json").read_text()) for d in (16, 32, 64)}
    built = {d: side["ef_construction"] for d, side in sidecars.items()}
    if ef_construction is None:
        assert (built, by_prefix, config.ef_construction) == ({16: 40, 32: 40, 64: 200}, {"64": 200}, None)
    else:
        assert (built, by_prefix, config.ef_construction) == ({16: 64, 32: 64, 64: 64}, {}, 64)
    with mrlstore.open(path, ef_construction=ef_construction) as store:  # no rebuild on reopen
        assert store.info()["index_status"] == {16: "loaded", 32: "loaded", 64: "loaded"}
        assert store.query(x[5], k=1, dims=[64, 128]).ids == ["5"]
    with mrlstore.open(tmp_path / "copy", config=config) as copy:  # a store's config makes a store like it
        assert copy.manifest.get("hnsw_ef_construction_by_prefix") == by_prefix


def test_index_rows_past_saved_cache_are_added_on_open(tmp_path, rng):
    x = rng.standard_normal((60, 64)).astype(np.float32)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:30], ids=[str(i) for i in range(30)])
    saved = {p.name: p.read_bytes() for p in (path / "index").iterdir()}
    with mrlstore.open(path) as store:
        store.add_vectors(x[30:], ids=[str(i) for i in range(30, 60)])
        store.delete(["1"])
    for name, data in saved.items():  # put the older cache back: it covers only 30 rows
        (path / "index" / name).write_bytes(data)
    with mrlstore.open(path) as store:
        assert store.info()["index_status"] == {8: "extended"}
        assert store.query(x[45], k=1, dims=[8, 64]).ids == ["45"]
        assert "1" not in store.query(x[1], k=10, dims=[8, 64]).ids


def test_queries_from_threads_while_adding(tmp_path, rng):
    x = rng.standard_normal((4000, 64)).astype(np.float32)
    errors: list[BaseException] = []
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 16, 64), index_dims=(8,), chunk_rows=64) as store:
        store.add_vectors(x[:500], ids=[str(i) for i in range(500)])
        stop = threading.Event()

        def reader(seed: int) -> None:
            r = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    i = int(r.integers(0, 500))
                    h = store.query(x[i], k=3, dims=[8, 64], where="true" if r.random() < 0.2 else None)
                    assert h.ids[0] == str(i), (i, h)
                    store.query(x[r.integers(0, 500, 3)], k=2, dims=[64])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for lo in range(500, 4000, 250):
            store.add_vectors(x[lo : lo + 250], ids=[str(i) for i in range(lo, lo + 250)])
            store.delete([str(lo + 1)])
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert len(store) == 4000 - 14


def test_add_images_goes_through_the_encoder(tmp_path, rng):
    from PIL import Image

    class ToyEncoder:  # gets decoded uint8 HxWx3 arrays from the store
        dim = 32
        nesting = (8, 16, 32)

        def encode(self, images, batch_size=64):
            return np.stack([np.resize(im[::4, ::4].astype(np.float32).ravel(), 32) + 1 for im in images])

    for name in ["a.jpg", "bb.png", "ccc.png"]:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
    names = [str(tmp_path / n) for n in ("a.jpg", "bb.png", "ccc.png")]
    with mrlstore.open(tmp_path / "s", encoder=ToyEncoder(), bands=(8, 32), index_dims=(8,)) as store:
        assert store.dim == 32
        store.add(names, metadata=[{"k": 1}, {"k": 2}, {"k": 3}])
        hits = store.query(names[1], k=1, dims=[8, 32])
        assert hits.metadata[0] == {"k": 2, "path": names[1]}
    with mrlstore.open(tmp_path / "s") as store, pytest.raises(mrlstore.EncoderUnavailableError):
        store.add(names[:1])


def test_import_does_not_import_torch():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, mrlstore; print(*(m in sys.modules for m in ('torch', 'zarr', 'ray')))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "False", "False"]


def test_each_engine_is_imported_by_one_module_only():
    import ast
    from pathlib import Path

    engines = {"zarr", "hnswlib", "duckdb", "torch", "ray"}
    importers: dict[str, set[str]] = {e: set() for e in engines}
    package = Path(mrlstore.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in engines:
                    importers[name.split(".")[0]].add(path.relative_to(package).as_posix())
    assert importers == {
        "zarr": {"tiers/bands.py"}, "hnswlib": {"tiers/hnsw.py"}, "duckdb": {"tiers/catalog.py"},
        "torch": {"encoder/model.py"}, "ray": {"integrations/ray.py"},
    }  # fmt: skip
    client = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if "pyarrow.fs" in p.read_text()]
    assert client == ["tiers/objectstore.py"]


def test_snapshot_is_readable_by_another_process_while_writing(tmp_path, rng):
    import subprocess
    import sys

    x = rng.standard_normal((80, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(x[:60], ids=[str(i) for i in range(60)], metadata=[{"n": i} for i in range(60)])
        store.snapshot(tmp_path / "snap")
        store.add_vectors(x[60:], ids=[str(i) for i in range(60, 80)])
        code = (
            "import sys, numpy as np, mrlstore\n"
            f"s = mrlstore.open({str(tmp_path / 'snap')!r}, read_only=True)\n"
            "v = np.array(s.get(['42'])['vector'][0].as_py())\n"
            "print(len(s), s.query(v, k=1, dims=[8, 64]).ids[0], s.info()['index_status'][8])\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["60", "42", "loaded"], out.stderr
        with pytest.raises(mrlstore.InvalidInputError, match="exists"):
            store.snapshot(tmp_path / "snap")


def test_writer_open_removes_temporaries_of_killed_writers(tmp_path, rng):
    path = tmp_path / "s"
    with mrlstore.open(path, dim=64, bands=(8, 64), index_dims=(8,)) as store:
        store.add_vectors(rng.standard_normal((10, 64)))
    stale = [
        path / "vectors" / "band_00000_00008" / ".zarr.json.tmp-999",
        path / "index" / ".prefix_00008.hnsw.tmp-999",
    ]
    for f in stale:
        f.write_bytes(b"half-written")
    with mrlstore.open(path, read_only=True) as store:
        assert all(f.exists() for f in stale)  # readers change nothing
    with mrlstore.open(path) as store:
        assert len(store) == 10 and not any(f.exists() for f in stale)


def test_add_vectors_streams_a_memory_mapped_float16_array(tmp_path):
    import tracemalloc

    n, dim = 20_000, 512
    x, _ = mrl_like(n, dim, seed=5)
    path = tmp_path / "x.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    mm[:] = x
    mm.flush()
    del mm
    source = np.load(path, mmap_mode="r")
    with mrlstore.open(tmp_path / "s", dim=dim, bands=(16, 128, dim), chunk_rows=4096) as store:
        tracemalloc.start()
        ids = store.add_vectors(source, ids=[str(i) for i in range(n)])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # A whole float32 copy of the batch would be n * dim * 4 bytes; the write path converts per chunk.
        assert peak < 0.5 * n * dim * 4, peak
        got = store.get(ids[-3:], dims=dim).column("vector").to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(np.stack(got), source[-3:].astype(np.float32))
        # an exact first stage (128 is not indexed): HNSW's multi-threaded build is not deterministic
        assert store.query(source[7].astype(np.float32), k=1, dims=[128, dim]).ids == ["7"]


def test_snapshots_and_exports_inside_the_stores_folder_are_refused(tmp_path):
    """They were written there, and the next compaction, which replaces the folder whole, deleted them."""
    path = tmp_path / "s"
    with mrlstore.open(path, dim=16) as store:
        store.add_vectors(np.ones((5, 16), np.float32))
        before = sorted(p.name for p in path.iterdir())
        with pytest.raises(mrlstore.InvalidInputError, match="inside the store's folder") as refused:
            store.snapshot(path / "backup")
        assert isinstance(refused.value, ValueError)
        with pytest.raises(mrlstore.InvalidInputError, match="inside the store's folder"):
            store.export_parquet(path / "rows.parquet")
        assert sorted(p.name for p in path.iterdir()) == before
        assert store.export_parquet(path / ".." / "rows.parquet") == 5  # beside it: fine


@pytest.mark.parametrize("read_only", [False, True])
def test_a_closed_store_is_freed_when_dropped(tmp_path, read_only):
    """Store and its maintenance component (bound methods), and a reader's deferred index and its index set
    (a closure), referred to each other: every closed handle kept its indexes until a full garbage
    collection (+16.5 MiB per open, query and close of a 50k-row store with the collector off)."""
    import gc
    import time
    import weakref

    with mrlstore.open(tmp_path / "s", dim=64, index_dims=(16, 32)) as writer:
        writer.add_vectors(np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32))
    gc.disable()
    try:
        store = mrlstore.open(tmp_path / "s", read_only=read_only)
        store.query(np.ones(64, np.float32), k=5)
        handle, indexes = weakref.ref(store), weakref.ref(store._state.indexes)
        store.close()
        del store
        for _ in range(100):  # a writer's cancelled publishing timer holds them until its thread ends
            if handle() is None and indexes() is None:
                break
            time.sleep(0.02)
        assert handle() is None and indexes() is None
    finally:
        gc.enable()


def test_a_closed_store_kept_referenced_lets_go_of_its_indexes(tmp_path):
    """Six closed handles an application kept (a dict of stores, say) held 77 MiB of indexes."""
    import weakref

    with mrlstore.open(tmp_path / "s", dim=64, index_dims=(16, 32)) as store:
        store.add_vectors(np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32))
        indexes = [weakref.ref(index) for _, _, index in store._state.indexes.all_indexes()]
        assert len(indexes) == 2 and all(ref() is not None for ref in indexes)
        store.query(np.ones(64, np.float32), k=1)  # a funnel built over them holds them too
    assert all(ref() is None for ref in indexes)
    with pytest.raises(mrlstore.StoreClosedError):
        store.query(np.ones(64, np.float32), k=1)


QUERIES_BETWEEN_ADDS = """
import sys
import numpy as np
import mrlstore

x = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
store = mrlstore.open(sys.argv[1], dim=64)
store.add_vectors(x[:3000], ids=[f"a{i}" for i in range(3000)], metadata=[{"n": i} for i in range(3000)])
store.query(x[5], k=5)  # the native kernels' chunk addresses cached
for step in range(20):  # each add grows the last chunk's file: its map is replaced
    rows = slice(3000 + 100 * step, 3100 + 100 * step)
    store.add_vectors(x[rows], ids=[f"b{step}_{i}" for i in range(100)], metadata=[{"n": -1}] * 100)
    assert store.query(x[5], k=5).ids[0] == "a5"  # candidates among the old rows
    assert store.query(x[7], k=1, where="n >= 0 AND n < 50").ids == ["a7"]
print("ok")
"""


INTERRUPTED_RELEASE = """
import sys
import numpy as np
import mrlstore


class ClearedThenInterrupted(list):  # Ctrl-C right after the replaced maps were dropped
    def clear(self):
        super().clear()
        raise KeyboardInterrupt


x = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
store = mrlstore.open(sys.argv[1], dim=64)
store.add_vectors(x[:3000], ids=[f"a{i}" for i in range(3000)], metadata=[{"n": i} for i in range(3000)])
store.query(x[5], k=5)
for band in store._state.vectors.arrays:
    band._retired = ClearedThenInterrupted(band._retired)
try:
    store.add_vectors(x[3000:3100], metadata=[{"n": -1}] * 100)
except KeyboardInterrupt:
    pass
assert len(store) == 3100 and store.query(x[7], k=1, where="n >= 0 AND n < 50").ids == ["a7"]
print("ok")
"""


def test_an_interrupted_release_of_replaced_maps_leaves_no_stale_address(tmp_path):
    """The maps went first and the kernels' descriptions of them second: a Ctrl-C between the two left the
    descriptions, and the next query crashed the process (a review helper's injected interrupts)."""
    import subprocess
    import sys

    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_RELEASE)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout == "ok\n", (done.returncode, done.stderr[-2000:])


def test_queries_between_adds_read_only_live_maps(tmp_path):
    """Releasing the maps a growing file replaced left their addresses in the native kernels' cached chunk
    descriptions: the next query reading old rows read unmapped memory (SIGSEGV at the 11th add)."""
    import subprocess
    import sys

    script = tmp_path / "adds.py"
    script.write_text(QUERIES_BETWEEN_ADDS)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout == "ok\n", (done.returncode, done.stderr[-2000:])


def test_update_metadata_sets_and_clears_values_and_keeps_vectors_and_other_columns(tmp_path):
    """Changing a label meant getting each vector back and upserting it, and an upsert keeps the old value
    of a key given as None, so a value could not be cleared."""
    x = np.random.default_rng(3).standard_normal((200, 64)).astype(np.float32)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=64, bands=(16, 64), index_dims=(16,)) as store:
        store.add_vectors(x, ids=[f"r{i}" for i in range(200)], metadata=[{"label": "a", "n": i} for i in range(200)])
        before = store.get(["r3", "r4"]).column("vector")
        assert store.update_metadata(["r3", "r4"], [{"label": "b"}, {"label": None, "new": 1.5}]) == 2
        assert store.update_metadata(["r5", "r6"], {"label": "c"}) == 2
        assert store.update_metadata(["r7", "r8"], [{"label": "dog"}, {"n": 99}]) == 2  # each its own keys
        with pytest.raises(mrlstore.UnknownIdError):
            store.update_metadata(["r1", "gone"], {"label": "q"})
        with pytest.raises(mrlstore.UnknownIdError):
            store.update_metadata(["gone"], {})
        assert store.get(["r3", "r4"]).column("vector").equals(before)
        assert store.query(x[4], k=1).ids == ["r4"] and len(store) == 200 and store.verify() == []
    with mrlstore.open(path, read_only=True) as store:
        rows = store.get(["r1", "r3", "r4", "r5", "r7", "r8"]).drop_columns(["vector"]).to_pylist()
        assert rows == [
            {"id": "r1", "label": "a", "n": 1, "new": None},
            {"id": "r3", "label": "b", "n": 3, "new": None},
            {"id": "r4", "label": None, "n": 4, "new": 1.5},
            {"id": "r5", "label": "c", "n": 5, "new": None},
            {"id": "r7", "label": "dog", "n": 7, "new": None},
            {"id": "r8", "label": "a", "n": 99, "new": None},
        ]
        assert store.query(x[4], k=1).metadata == [{"label": None, "n": 4, "new": 1.5}]
        with pytest.raises(mrlstore.ReadOnlyError):
            store.update_metadata(["r1"], {"label": "x"})
