"""Ray Data on a real local Ray cluster (ray.init(num_cpus=2)): StoreSink's single commit, its failures and
crashes (a task that fails, a worker SIGKILLed after writing, a driver SIGKILLed part way), EmbedImages and
QueryStore."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import mrlstore

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mrlstore[ray]'")
ray_data = pytest.importorskip("ray.data")
from mrlstore.ray import EmbedImages, QueryStore, StoreSink  # noqa: E402

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
DIM = 64


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    ray_data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's sink subclass, on workers
    yield
    ray.shutdown()


def rows_table(lo: int, n: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    vectors = np.random.default_rng(seed + lo).standard_normal((n, DIM)).astype(np.float32)
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(lo, lo + n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            "group": np.arange(lo, lo + n) % 5,
        }
    )
    return table, vectors


def dataset(table: pa.Table, blocks: int = 4):
    return ray_data.from_arrow(table).repartition(blocks)


@pytest.mark.parametrize("where", ["in place", "staging folder"])
def test_storesink_writes_every_row_in_one_commit(tmp_path, where):
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[16]) as store:
        store.add_vectors(np.ones((1, DIM), np.float32), ids=["before"])
    table, vectors = rows_table(0, 3000)
    staging = tmp_path / "shared" if where == "staging folder" else None
    sink = StoreSink(path, fragment_rows=500, staging=staging)
    dataset(table, 6).write_datasink(sink)
    assert sink.rows_added == 3000 and sink.rows_moved == 0
    if staging is not None:
        assert not any(staging.rglob("*.arrow"))
    with mrlstore.open(path, read_only=True) as store:
        assert len(store) == 3001
        got = store.get(["r5", "r2999"], dims=DIM)
        stored = np.stack(got.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, vectors[[5, 2999]], rtol=1e-3, atol=1e-3)
        total = store.sql('SELECT sum("group") AS s FROM items').column("s")[0].as_py()
        assert total == int((np.arange(3000) % 5).sum())
        assert store.query(vectors[123], k=1).ids == ["r123"]
        assert store.verify() == []
    assert not (path / "staging").exists(), "the fragments are removed after the commit"


def _numpy_embeddings(batch: dict) -> dict:
    """What a user's map_batches returns: a 2-D numpy array, which Ray stores as its tensor extension column."""
    rows = batch["id"].astype(np.int64)
    return {"id": np.array([f"t{i}" for i in rows]), "embedding": _tensor_rows(rows)}


def _tensor_rows(rows: np.ndarray) -> np.ndarray:
    return np.stack([np.random.default_rng(int(i)).standard_normal(DIM) for i in rows]).astype(np.float32)


def test_storesink_takes_the_tensor_column_of_a_map_batches_that_returns_numpy(tmp_path):
    path = tmp_path / "s.mrl"
    ds = ray_data.range(1200).map_batches(_numpy_embeddings, batch_size=300)
    assert "Tensor" in str(ds.schema().base_schema.field("embedding").type)  # Ray's tensor extension type
    sink = StoreSink(path, dim=DIM, index_dims=[16], fragment_rows=400)
    ds.write_datasink(sink)
    assert sink.rows_added == 1200
    with mrlstore.open(path, read_only=True) as store:
        stored = np.stack(store.get(["t0", "t777"], dims=DIM).column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, _tensor_rows(np.array([0, 777])), rtol=1e-3, atol=1e-3)
        assert store.query(_tensor_rows(np.array([42]))[0], k=1).ids == ["t42"]


def test_a_failing_task_leaves_the_store_as_it_was(tmp_path):
    path = tmp_path / "s.mrl"
    table, vectors = rows_table(0, 2000)
    with mrlstore.open(path, dim=DIM, index_dims=[16]) as store:
        store.add_vectors(vectors[:10], ids=[f"old{i}" for i in range(10)])
    bad = vectors.copy()
    bad[1700, 3] = np.nan  # one block's worker refuses its rows; the others have written theirs
    table = table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(bad.reshape(-1)), DIM))
    with pytest.raises(Exception, match="NaN"):
        dataset(table).write_datasink(StoreSink(path, fragment_rows=500))
    with mrlstore.open(path) as store:  # writable again: the sink let go of the store
        assert len(store) == 10 and store.verify() == []
        assert not any((path / "staging").rglob("*.arrow"))
        store.add_vectors(vectors[:1], ids=["after"])


def test_a_sink_closed_or_dropped_without_its_write_ending_gives_the_store_back(tmp_path):
    """Ray calls neither on_write_complete nor on_write_failed when the driver is interrupted: the sink's
    close() (or its with-block, or dropping it) releases the store's lock, and nothing becomes visible."""
    path = tmp_path / "s.mrl"
    table, vectors = rows_table(0, 600)
    with mrlstore.open(path, dim=DIM, index_dims=[16]) as store:
        store.add_vectors(vectors[:5], ids=[f"old{i}" for i in range(5)])
    with StoreSink(path, fragment_rows=100) as sink:
        with pytest.raises(mrlstore.StoreLockedError):
            mrlstore.open(path)
        sink.write([table.slice(0, 300)], None)  # a worker's rows in place, the commit never comes
    with mrlstore.open(path) as store:
        assert len(store) == 5 and store.verify() == []
    sink = StoreSink(path, staging=tmp_path / "shared")
    del sink
    gc.collect()
    with mrlstore.open(path) as store:
        assert len(store) == 5
        store.add_vectors(vectors[5:6], ids=["after"])


def test_ids_repeated_across_workers_fail_the_commit_and_change_nothing(tmp_path):
    path = tmp_path / "s.mrl"
    table, _ = rows_table(0, 1000)
    both = pa.concat_tables([table, table])  # every id twice, in different blocks
    with pytest.raises(mrlstore.DuplicateIdError):
        dataset(both).write_datasink(StoreSink(path, dim=DIM, index_dims=[16], fragment_rows=400))
    with mrlstore.open(path, read_only=True) as store:
        assert len(store) == 0


class DiesOnceAfterWriting(StoreSink):
    """A worker SIGKILLed after its fragment is on disk, before it could report it (once per write)."""

    def write(self, blocks, ctx):  # noqa: ANN001, ANN201
        written = super().write(blocks, ctx)
        marker = self.staging.parent / f"died-{self.staging.name}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return written
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_after_writing_is_retried_without_duplicates(tmp_path):
    path = tmp_path / "s.mrl"
    table, vectors = rows_table(0, 2000)
    sink = DiesOnceAfterWriting(path, dim=DIM, index_dims=[16], fragment_rows=500)
    dataset(table).write_datasink(sink)  # Ray retries the killed task; its orphan rows are never committed
    assert sink.rows_added == 2000 and sink.rows_moved <= 500  # the dead attempt's rows, when not the last
    with mrlstore.open(path, read_only=True) as store:
        assert len(store) == 2000 and store.verify() == []
        assert store.sql("SELECT count(DISTINCT id) AS n FROM items").column("n")[0].as_py() == 2000
        stored = np.stack(
            store.get(table.column("id").to_pylist(), dims=DIM).column("vector").to_numpy(zero_copy_only=False)
        )
        np.testing.assert_array_equal(stored, vectors.astype(np.float16).astype(np.float32))
        assert store.query(vectors[1999], k=1).ids == ["r1999"]


DRIVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np, pyarrow as pa, ray, ray.data
    from mrlstore.ray import StoreSink
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    n, dim = 4000, int(sys.argv[2])
    v = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    t = pa.table({"id": [f"new{i}" for i in range(n)],
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim)})
    def slow(batch):
        time.sleep(0.5)
        return batch
    ds = ray.data.from_arrow(t).repartition(40).map_batches(slow, batch_format="pyarrow")
    ds.write_datasink(StoreSink(sys.argv[1], fragment_rows=100))
    print("COMMITTED", flush=True)
    """
)


@pytest.mark.slow
def test_a_driver_killed_part_way_leaves_the_store_as_it_was(tmp_path):
    path = tmp_path / "s.mrl"
    table, vectors = rows_table(0, 300)
    with mrlstore.open(path, dim=DIM, index_dims=[16]) as store:
        store.add_vectors(vectors, ids=table.column("id").to_pylist())
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(DIM)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any((path / "staging").rglob("*.arrow")):  # workers have written part of the Dataset
            assert proc.poll() is None and time.monotonic() < deadline, "the driver ended before writing"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    assert b"COMMITTED" not in proc.stdout.read()
    with mrlstore.open(path) as store:  # the writer's open clears the dead write's fragments
        assert len(store) == 300 and store.verify() == []
        assert store.query(vectors[7], k=1).ids == ["r7"]
    deadline = time.monotonic() + 60
    while (path / "staging").exists():  # Ray workers may outlive their driver by a moment and stage more
        assert time.monotonic() < deadline, "fragments keep appearing a minute after the driver died"
        time.sleep(1)
        mrlstore.open(path).close()  # the next writer's open clears them again
    with mrlstore.open(path, read_only=True) as store:
        assert len(store) == 300


@pytest.mark.slow
def test_embed_images_then_sink_then_query_store(tmp_path):
    files = sorted(p for p in IMAGES.rglob("*.jpg"))[:12]
    assert files, "the repo ships example images"
    ds = ray_data.from_items([{"path": str(p), "bytes": p.read_bytes()} for p in files]).repartition(2)
    embedded = ds.map_batches(
        EmbedImages,
        fn_constructor_kwargs={"column": "bytes"},
        batch_size=6,
        compute=ray_data.ActorPoolStrategy(size=1),
        batch_format="pyarrow",
    ).drop_columns(["bytes"])
    path = tmp_path / "photos.mrl"
    sink = StoreSink(path, id="path")
    embedded.write_datasink(sink)
    assert sink.rows_added == len(files)
    with mrlstore.open(path, read_only=True) as store:
        direct = mrlstore.load_encoder().encode([str(p) for p in files], progress=False)
        stored = np.stack(store.get([str(p) for p in files], dims=2048).column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, direct, atol=2e-2)  # the same encoder, float16 storage
        expected = [h.ids for h in store.query(direct, k=3)]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(direct.reshape(-1)), 2048)
    queries = ray_data.from_arrow(pa.table({"id": [str(p) for p in files], "embedding": embedding})).repartition(2)
    out = queries.map_batches(
        QueryStore,
        fn_constructor_kwargs={"path": str(path), "k": 3},
        batch_size=4,
        compute=ray_data.ActorPoolStrategy(size=2),
        num_cpus=0.5,
        batch_format="pyarrow",
    ).take_all()  # half a CPU each: two actors on two CPUs would leave none for the tasks that feed them
    got = {row["id"]: list(row["hit_ids"]) for row in out}
    assert [got[str(p)] for p in files] == expected
    assert all(got[str(p)][0] == str(p) for p in files)


def test_a_relative_store_path_means_the_driver_s_folder(tmp_path, monkeypatch):
    """Workers resolved StoreSink("photos.mrl") against their own working directory (Ray's working_dir copy,
    another machine): CorruptStoreError in place, and an empty stray store made by the index catch-up."""
    monkeypatch.chdir(tmp_path)
    table, vectors = rows_table(0, 600)
    sink = StoreSink("rel.mrl", dim=DIM, index_dims=[16], staging="shared", fragment_rows=200)
    assert sink.path == tmp_path / "rel.mrl" and sink.staging.is_relative_to(tmp_path / "shared")
    monkeypatch.chdir(tmp_path.parent)  # the driver moves on; the sink's paths do not
    dataset(table, 3).write_datasink(sink)
    with mrlstore.open(tmp_path / "rel.mrl", read_only=True) as store:
        assert len(store) == 600 and store.query(vectors[7], k=1).ids == ["r7"]


def test_numpy_batches_with_image_columns_pass_through():
    """QueryStore and EmbedImages read Ray's default batches (dicts of numpy arrays): a 4-D image column, or
    one of images of several sizes, failed in pa.table ("only handle 1-dimensional arrays")."""
    from mrlstore.integrations.ray import as_table

    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 5, 3), np.uint8), np.zeros((6, 2, 3), np.uint8)
    table = as_table({"v": np.ones((2, DIM), np.float32), "thumb": np.zeros((2, 8, 8, 3), np.uint8),
                      "image": ragged, "name": np.array(["a", "b"])})  # fmt: skip
    assert table.column("v").type == pa.list_(pa.float32(), DIM) and table.column("name").to_pylist() == ["a", "b"]
    assert "Tensor" in str(table.column("thumb").type) and "Tensor" in str(table.column("image").type)
