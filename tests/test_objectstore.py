"""Stores on object storage, against a real S3 protocol server: moto in server mode on 127.0.0.1, started
here in its own process. Publish, open from "another machine" (a fresh cache), lazy ranged reads, and the
bad cases: missing bucket, wrong credentials, endpoint down, a publish killed part way, corrupted objects."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import mrlstore

pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install -e '.[test]'")
pafs = pytest.importorskip("pyarrow.fs")
from errors_support import ctrl_c_while_closing  # noqa: E402
from moto_server import free_port as _free_port  # noqa: E402
from moto_server import start_moto as _start_moto  # noqa: E402

from mrlstore.errors import UnknownIdError  # noqa: E402
from mrlstore.testing import mrl_like  # noqa: E402
from mrlstore.tiers import catalog as catalog_module  # noqa: E402
from mrlstore.tiers import id_index, objectstore  # noqa: E402
from mrlstore.tiers.objectstore import filesystem  # noqa: E402

DIM = 256


@pytest.fixture
def endpoint(s3_endpoint):
    return s3_endpoint


@pytest.fixture
def options(endpoint):
    return {"key": "testing", "secret": "testing", "endpoint_url": endpoint}


def _bucket(options: dict, name: str) -> str:
    fs, _ = filesystem(f"s3://{name}", {**options, "allow_bucket_creation": True})
    fs.create_dir(name)
    return name


_counter = iter(range(10**6))


@pytest.fixture
def bucket(options):
    return _bucket(options, f"b{next(_counter)}-{os.getpid()}")


def _local_store(path: Path, n: int, seed: int = 0, index_dims=(16,)) -> tuple[mrlstore.Store, np.ndarray]:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    store = mrlstore.open(path, dim=DIM, bands=(16, 64, DIM), index_dims=index_dims, chunk_rows=1024)
    meta = [{"group": i % 4} for i in range(n)]
    store.add_vectors(vectors, ids=[f"r{i}" for i in range(n)], metadata=meta)
    return store, vectors


@contextlib.contextmanager
def _published_and_read(tmp_path, options, bucket, n: int, **store_options):
    """A local store of ``n`` rows published to ``bucket``, and a reader of it caching in ``tmp_path/"c"``:
    (store, its vectors, reader); the store stays open through the block, to publish again."""
    store, vectors = _local_store(tmp_path / "local.mrl", n, **store_options)
    try:
        url = f"s3://{bucket}/s.mrl"
        store.publish(url, storage_options=options)
        with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
            yield store, vectors, remote
    finally:
        store.close()


def test_a_published_store_answers_like_the_local_one_reading_only_what_queries_need(tmp_path, options, bucket):
    url = f"s3://{bucket}/photos.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 3000)
    head = store.publish(url, storage_options=options)
    assert head["version"] == 1 and head["committed_rows"] == 3000
    remote = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "cache")
    try:
        assert remote._versions.remote.requests == 0, "opening downloads the small parts only"
        with pytest.raises(mrlstore.UnsupportedStorageError, match="report"):  # exact scans of remote rows
            remote.report()
        assert len(remote) == 3000 and remote.info()["version"] == 1
        for dims, where in [
            ([16, DIM], None),
            ([16, 64, DIM], None),
            (None, None),
            ([DIM], None),
            ([16, DIM], '"group" = 2'),
        ]:
            want = store.query(vectors[:5], k=5, dims=dims, where=where)
            got = remote.query(vectors[:5], k=5, dims=dims, where=where)
            assert [h.ids for h in got] == [h.ids for h in want]
            np.testing.assert_allclose([h.scores for h in got], [h.scores for h in want], rtol=1e-6)
            assert [h.metadata for h in got] == [h.metadata for h in want]
        assert (
            remote.get(["r42"], dims=DIM).column("vector")[0].as_py()
            == store.get(["r42"], dims=DIM).column("vector")[0].as_py()
        )
        assert remote.sql('SELECT count(*) AS n FROM items WHERE "group" = 1').column("n")[0].as_py() == 750
        before = remote._versions.remote.bytes
        remote.query(vectors[7], k=10, dims=[16, DIM])
        assert 0 < remote._versions.remote.bytes - before < 1000 * DIM * 2, "a funnel query reads shortlisted rows only"
        with pytest.raises(mrlstore.ReadOnlyError, match=f"{url} is on object storage.*publish"):
            remote.add_vectors(vectors[:1], ids=["x"])
        assert url in repr(remote) and remote.info()["path"] == url and remote.location == url
    finally:
        remote.close()
        store.close()


def test_publish_is_incremental_and_readers_refresh_to_new_versions(tmp_path, options, bucket):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 2500)
    first = store.publish(url, storage_options=options)
    remote = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "cache")
    more = np.random.default_rng(9).standard_normal((600, DIM)).astype(np.float32)
    store.add_vectors(more, ids=[f"n{i}" for i in range(600)])
    second = store.publish(url, storage_options=options)
    # chunks 0 and 1 (rows 0-2047) were full and unchanged: only chunk 2 (grown) and chunk 3 (new) go up
    assert second["uploaded_chunk_bytes"] == (1024 + 28) * DIM * 2  # rows 2048-3071 and 3072-3099
    assert first["uploaded_chunk_bytes"] == 2500 * DIM * 2
    assert len(remote) == 2500 and remote.refresh() is True and len(remote) == 3100
    assert remote.query(more[5], k=1).ids == ["n5"]
    assert remote.refresh() is False
    remote.close()
    store.close()


def test_a_refresh_interrupted_while_it_closes_the_old_version_moves_to_the_new_one(tmp_path, options, bucket):
    """Ctrl-C after the old version's catalog closed left the reader on it, its catalog closed: refresh()
    said False, len() was stale and get() or sql() failed as corruption."""
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 500)
    store.publish(url, storage_options=options)
    remote = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "cache")
    store.add_vectors(vectors[:5] + 1, ids=[f"n{i}" for i in range(5)])
    store.publish(url, storage_options=options)
    store.close()
    with ctrl_c_while_closing(remote), pytest.raises(KeyboardInterrupt):
        remote.refresh()
    assert len(remote) == 505 and remote.info()["version"] == 2
    assert remote.get(["n3"]).num_rows == 1 and remote.sql("SELECT count(*) AS n FROM items")["n"][0].as_py() == 505
    assert remote.refresh() is False
    remote.close()


@pytest.mark.parametrize("case", ["missing bucket", "no store there", "endpoint down"])
def test_bad_places_are_typed_errors(tmp_path, options, case):
    if case == "endpoint down":
        options = {**options, "endpoint_url": f"http://127.0.0.1:{_free_port()}"}
        error = mrlstore.ObjectStorageError
        url = "s3://anything/s.mrl"
    else:
        url = "s3://no-such-bucket/s.mrl" if case == "missing bucket" else f"s3://{_bucket(options, 'empty')}/s.mrl"
        error = mrlstore.StoreNotFoundError
    with pytest.raises(error):
        mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "cache")
    store, _ = _local_store(tmp_path / "local.mrl", 100)
    with store:
        if case != "no store there":
            with pytest.raises(error):
                store.publish(url, storage_options=options)
        assert len(store) == 100
    assert not any((tmp_path / "cache").rglob("catalog.duckdb")), "nothing half-downloaded is kept"


def test_urls_open_read_only_only(options):
    with pytest.raises(mrlstore.UnsupportedStorageError, match="read_only"):
        mrlstore.open("s3://bucket/s.mrl", dim=8, storage_options=options)


def _user_allowed(endpoint: str, statements: list[dict]) -> dict:
    """storage_options of a new IAM user of the moto server at ``endpoint`` with a policy of ``statements``."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
    iam.create_user(UserName="writer")
    policy = json.dumps({"Version": "2012-10-17", "Statement": statements})
    iam.put_user_policy(UserName="writer", PolicyName="s3", PolicyDocument=policy)
    key = iam.create_access_key(UserName="writer")["AccessKey"]
    return {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "endpoint_url": endpoint}


def test_wrong_credentials_are_refused(tmp_path):
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})  # then every request is checked
    try:
        good = _user_allowed(endpoint, [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}])
        _bucket(good, "private")
        store, _ = _local_store(tmp_path / "local.mrl", 100)
        with store:
            store.publish("s3://private/s.mrl", storage_options=good)
            bad = {**good, "secret": "wrong"}
            with pytest.raises(mrlstore.StoreAccessError):
                store.publish("s3://private/s.mrl", storage_options=bad)
        with pytest.raises(mrlstore.StoreAccessError):
            mrlstore.open("s3://private/s.mrl", read_only=True, storage_options=bad, cache_dir=tmp_path / "c")
        with mrlstore.open("s3://private/s.mrl", read_only=True, storage_options=good, cache_dir=tmp_path / "c") as r:
            assert len(r) == 100
    finally:
        proc.terminate()
        proc.wait()


PUBLISHER = textwrap.dedent(
    """
    import sys, numpy as np, mrlstore
    store = mrlstore.open(sys.argv[1])
    rng = np.random.default_rng(5)
    for b in range(8):
        store.add_vectors(rng.standard_normal((4096, 256)).astype(np.float32), ids=[f"x{b}-{i}" for i in range(4096)])
    print("publishing", flush=True)
    store.publish(sys.argv[2], storage_options={"key": "testing", "secret": "testing", "endpoint_url": sys.argv[3]})
    print("published", flush=True)
    """
)


@pytest.mark.slow
def test_a_publish_killed_part_way_leaves_the_previous_version(tmp_path, options, bucket):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1000)
    store.publish(url, storage_options=options)
    store.close()
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "local.mrl"), url, options["endpoint_url"]],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "publishing"
    fs, _ = filesystem(url, options)
    deadline = time.monotonic() + 60
    chunks = pafs.FileSelector(f"{bucket}/s.mrl/chunks", recursive=True)
    while sum(e.type == pafs.FileType.File for e in fs.get_file_info(chunks)) <= 3:  # new chunks are going up
        assert proc.poll() is None and time.monotonic() < deadline, "the publish ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "cache") as remote:
        assert len(remote) == 1000 and remote.info()["version"] == 1
        assert remote.query(vectors[3], k=1).ids == ["r3"]
    with mrlstore.open(tmp_path / "local.mrl") as store:  # and the next publish completes
        assert store.publish(url, storage_options=options)["version"] == 2


class _InterruptedStream:
    """An output stream Ctrl-C interrupts after it opened, before anything is written."""

    def __init__(self, stream):
        self._stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()  # as pyarrow's own stream does when an exception leaves it

    def write(self, data):
        raise KeyboardInterrupt


class _InterruptingFilesystem:
    """An S3 filesystem on which Ctrl-C lands in the first write of HEAD (or of the call ``method``)."""

    def __init__(self, fs, method: str):
        self._fs, self._method, self.fired = fs, method, False

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_output_stream(self, key, *args, **kwargs):
        stream = self._fs.open_output_stream(key, *args, **kwargs)
        if self._method == "HEAD stream" and key.endswith("/HEAD") and not self.fired:
            self.fired = True
            return _InterruptedStream(stream)
        return stream

    def copy_file(self, source, dest):
        if self._method == "HEAD copy" and dest.endswith("/HEAD") and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return self._fs.copy_file(source, dest)


@pytest.mark.parametrize("method", ["HEAD stream", "HEAD copy"])
def test_ctrl_c_while_head_is_written_leaves_the_previous_version(tmp_path, options, bucket, monkeypatch, method):
    """HEAD was written through a stream, and a Ctrl-C after it opened completed the PUT empty (pyarrow
    closes a stream an exception leaves): the published store could no longer be opened or published to."""
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1000)
    store.publish(url, storage_options=options)
    store.add_vectors(vectors[:5] + 1, ids=[f"n{i}" for i in range(5)])
    made: list[_InterruptingFilesystem] = []
    real = objectstore.filesystem
    monkeypatch.setattr(
        objectstore,
        "filesystem",
        lambda *a: made.append(_InterruptingFilesystem(real(*a)[0], method)) or (made[-1], real(*a)[1]),
    )
    try:
        store.publish(url, storage_options=options)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        assert (remote.info()["version"], len(remote)) in ((1, 1000), (2, 1005))
        assert remote.info()["version"] == 1 or not any(m.fired for m in made)  # interrupted: not published
    assert store.publish(url, storage_options=options)["version"] == (2 if any(m.fired for m in made) else 3)
    store.close()


def _published_with_a_short_chunk(tmp_path, options, bucket, chunk: str):
    """A 1,500-row store published to the bucket, then its chunk object ``chunk`` cut to a third."""
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1500)
    head = store.publish(url, storage_options=options)
    store.close()
    fs, _ = filesystem(url, options)
    key = f"{bucket}/s.mrl/{head['chunks'][chunk]}"
    with fs.open_input_stream(key) as f:
        data = f.read()
    with fs.open_output_stream(key) as f:
        f.write(data[: len(data) // 3])
    return url, fs, vectors


def test_corrupted_objects_are_typed_errors(tmp_path, options, bucket):
    url, fs, vectors = _published_with_a_short_chunk(tmp_path, options, bucket, "band_00064_00256/1")
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c1") as remote:
        with pytest.raises(mrlstore.CorruptStoreError, match="truncated"):
            remote.query(vectors[1400], k=5, dims=[16, DIM], shortlist=200)
    with fs.open_output_stream(f"{bucket}/s.mrl/versions/1/catalog.duckdb") as f:
        f.write(b"not a database")
    with pytest.raises(mrlstore.CorruptStoreError, match="corrupted"):
        mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c2")
    assert not any((tmp_path / "c2").rglob("catalog.duckdb"))


def test_a_near_band_that_fails_to_download_fails_the_open(tmp_path, options, bucket):
    # a near chunk: downloaded while the indexes load
    url, _, _ = _published_with_a_short_chunk(tmp_path, options, bucket, "band_00016_00064/1")
    with pytest.raises(mrlstore.CorruptStoreError, match="truncated"):
        mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").rglob("band_00016_00064/c/1/0"))  # no partial chunk left to trust


def test_indexes_just_downloaded_are_not_hashed_again_but_cached_ones_are(tmp_path, options, bucket, monkeypatch):
    from mrlstore.tiers import hnsw

    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1500)
    store.publish(url, storage_options=options)
    want = store.query(vectors[:3], k=5)
    store.close()
    hashed: list[Path] = []
    digest = hnsw._digest
    monkeypatch.setattr(hnsw, "_digest", lambda path: hashed.append(path) or digest(path))
    cache = tmp_path / "c"
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as remote:
        assert remote.index_status == {16: "loaded"}
        assert hashed == []  # checked against HEAD's digest as it arrived
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as remote:
        assert [p.name for p in hashed] == ["prefix_00016.hnsw"]  # the cached copy: checked at load
    (index_file,) = cache.rglob("prefix_00016.hnsw")
    with open(index_file, "r+b") as f:
        f.seek(100)
        f.write(b"damage")
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as remote:
        assert remote.index_status == {16: "rebuilt"}  # damage in the cache is still found
        assert [h.ids for h in remote.query(vectors[:3], k=5)] == [h.ids for h in want]


def test_short_bands_kept_local_leave_only_the_last_stage_remote(tmp_path, options, bucket):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 2000)
    store.publish(url, storage_options=options)
    want = store.query(vectors[:5], k=5, dims=[16, 64, DIM])
    store.close()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c", local_dims=64) as remote:
        got = remote.query(vectors[:5], k=5, dims=[16, 64, DIM])
        assert [h.ids for h in got] == [h.ids for h in want]
        opened = list(remote._versions.remote._files)  # the objects read from: the 64-256 band's only
        assert opened and all("/band_00064_00256/" in key for key in opened)
        assert remote._versions.remote.bytes <= 2000 * (DIM - 64) * 2


def test_a_reader_keeps_every_band_but_the_widest_near_by_default(tmp_path, options, bucket, monkeypatch):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 2000)
    store.publish(url, storage_options=options)
    want = store.query(vectors[:5], k=5, dims=[16, 64, DIM])
    store.close()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        got = remote.query(vectors[:5], k=5, dims=[16, 64, DIM])
        assert [h.ids for h in got] == [h.ids for h in want]
        opened = list(remote._versions.remote._files)
        assert opened and all("/band_00064_00256/" in key for key in opened)
    from mrlstore.tiers import bands

    monkeypatch.setattr(bands, "_resident_budget", lambda: 2000 * 16 * 2)  # the 16-d band only
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c2") as remote:
        got = remote.query(vectors[:5], k=5, dims=[16, 64, DIM])
        assert [h.ids for h in got] == [h.ids for h in want]
        opened = list(remote._versions.remote._files)
        assert any("/band_00016_00064/" in key for key in opened)
        assert not any("/band_00000_00016/" in key for key in opened)


def test_a_remote_funnel_reranks_its_near_bands_natively(tmp_path, options, bucket, monkeypatch):
    from mrlstore import kernels

    if not kernels.NATIVE:
        pytest.skip("the native kernels are not built here")
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 3000)  # 3 chunks per band
    store.publish(url, storage_options=options)
    want = store.query(vectors[:4], k=10, dims=[16, 64, DIM], shortlist=300)
    store.close()
    native_stages = []
    refine_native = kernels._refine_native
    monkeypatch.setattr(
        kernels, "_refine_native", lambda *a, **kw: native_stages.append(tuple(a[4])) or refine_native(*a, **kw)
    )
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        assert remote._versions.remote.local_dims == 64  # the 16- and 64-wide bands near, the widest remote
        got = remote.query(vectors[:4], k=10, dims=[16, 64, DIM], shortlist=300)
        assert native_stages == [(64,)]  # the near stage natively, the remote one through the numpy twins
        for g, w in zip(got, want):
            assert g.ids == w.ids
            np.testing.assert_allclose(g.scores, w.scores, rtol=1e-6)
        native_stages.clear()
        assert remote.query(vectors[0], k=10, dims=[16, DIM], shortlist=300).ids == want[0].ids
        assert native_stages == []  # nothing near to re-rank before the remote stage


def test_rows_past_a_full_row_cache_are_read_chunk_by_chunk(tmp_path, options, bucket, monkeypatch):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 3000)
    store.publish(url, storage_options=options)
    want = store.query(vectors[:4], k=10, dims=[16, DIM], shortlist=300)
    store.close()
    monkeypatch.setattr(objectstore, "ROW_CACHE_BYTES", 20 * (DIM - 64) * 2)  # 20 rows of the remote band
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        for _ in range(2):  # the second time some rows are cached, others not
            got = remote.query(vectors[:4], k=10, dims=[16, DIM], shortlist=300)
            for g, w in zip(got, want):
                assert g.ids == w.ids
                np.testing.assert_allclose(g.scores, w.scores, rtol=1e-6)
        assert remote._versions.remote.cached_bytes <= objectstore.ROW_CACHE_BYTES


def test_objects_larger_than_a_range_download_whole_in_parallel_ranges(tmp_path, options, bucket, monkeypatch):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 2000)
    store.publish(url, storage_options=options)
    want = store.query(vectors[:5], k=5, dims=[16, 64, DIM])
    store_vectors = store.get(["r0", "r1999"])
    store.close()
    monkeypatch.setattr(objectstore, "RANGE_BYTES", 1000)  # every part and near chunk comes in many ranges
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        got = remote.query(vectors[:5], k=5, dims=[16, 64, DIM])
        assert [h.ids for h in got] == [h.ids for h in want]
        got_vectors = np.array(remote.get(["r0", "r1999"]).column("vector").to_pylist(), dtype=np.float32)
        want_vectors = np.array(store_vectors.column("vector").to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(got_vectors, want_vectors)  # widest band remote, the others near


def test_a_stage_reads_every_chunk_it_needs_in_one_round(tmp_path, options, bucket):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 3000)  # 3 chunks of 1024 rows per band
    store.publish(url, storage_options=options)
    want = store.query(vectors[:3], k=10, dims=[16, DIM], shortlist=40)  # 40 rows fall in all three chunks
    store.close()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c", local_dims=0) as remote:
        source = remote._versions.remote
        for i, hits in enumerate(want):
            rounds, requests = source.rounds, source.requests
            got = remote.query(vectors[i], k=10, dims=[16, DIM], shortlist=40)
            assert got.ids == hits.ids
            np.testing.assert_allclose(got.scores, hits.scores, rtol=1e-6)
            assert source.rounds - rounds == 1  # two bands, three chunks each: one round of requests
            assert source.requests - requests > 3


def test_another_store_is_never_published_over_one(tmp_path, options, bucket):
    url = f"s3://{bucket}/s.mrl"
    first, vectors = _local_store(tmp_path / "a.mrl", 1500)
    with first:
        first.publish(url, storage_options=options)
    other, _ = _local_store(tmp_path / "b.mrl", 1500, seed=1)  # same shape and chunk keys, other vectors
    with other, pytest.raises(mrlstore.InvalidInputError, match="another store"):
        other.publish(url, storage_options=options)
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        assert remote.info()["version"] == 1 and remote.query(vectors[9], k=1).ids == ["r9"]


def test_a_compacted_store_publishes_to_its_url_as_a_new_generation(tmp_path, options, bucket):
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "a.mrl", 1500)
    with store:
        store.publish(url, storage_options=options)
        store.delete([f"r{i}" for i in range(0, 1500, 2)])
        store.compact()  # rows renumbered: the same store (store_id), a new generation
        head = store.publish(url, storage_options=options)
    assert head["version"] == 2 and head["generation"] == 1
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        assert len(remote) == 750 and remote.query(vectors[9], k=1).ids == ["r9"]


def test_a_published_store_keeps_its_fitted_codes(tmp_path, options, bucket):
    """Codes fitted by tune are part of the version: a reader shortlists on them, like the writer."""
    rotation = np.linalg.qr(np.random.default_rng(2).standard_normal((DIM, DIM)))[0].astype(np.float32)
    vectors = np.ascontiguousarray(mrl_like(3000, DIM, noise=1.0, seed=4)[0] @ rotation)  # no prefix structure
    queries = np.ascontiguousarray(mrl_like(20, DIM, noise=1.0, seed=4, sample=1)[0] @ rotation)
    url = f"s3://{bucket}/fitted.mrl"
    with mrlstore.open(tmp_path / "local.mrl", dim=DIM, bands=(16, 64, DIM), index_dims=[16]) as store:
        store.add_vectors(vectors, ids=[f"r{i}" for i in range(len(vectors))])
        store.tune(recall=0.9, k=10, sample=100)
        assert store.info().prefixes == "fitted"
        local = [list(h.ids) for h in store.query(queries, k=10, dims=[16, DIM], shortlist=50)]
        head = store.publish(url, storage_options=options)
    # the raw 16-prefix index the codes replaced stays local: no reader loads it, so none downloads it
    published = {p for p in head["parts"] if p.startswith("index/")}
    assert published == {"index/fitted_00016.hnsw", "index/fitted_00016.json"}
    remote = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "cache")
    try:
        assert remote.info().prefixes == "fitted"
        assert [list(h.ids) for h in remote.query(queries, k=10, dims=[16, DIM], shortlist=50)] == local
        raw = [list(h.ids) for h in remote.query(queries, k=10, dims=[16, DIM], shortlist=50, prefixes="raw")]
        assert raw != local
    finally:
        remote.close()


def test_indexes_a_default_query_does_not_search_download_on_first_use(tmp_path, options, bucket):
    """HEAD names them ``deferred``: a fresh reader's open leaves them remote, its first query that needs one
    downloads it (checked against HEAD's digest), and a damaged object is rebuilt from the vectors."""
    url = f"s3://{bucket}/s.mrl"
    vectors = np.random.default_rng(0).standard_normal((1500, DIM)).astype(np.float32)
    with mrlstore.open(tmp_path / "local.mrl", dim=DIM, bands=(16, 64, DIM), index_dims=[16, 32]) as store:
        store.add_vectors(vectors, ids=[f"r{i}" for i in range(len(vectors))])
        want = {str(d): [h.ids for h in store.query(vectors[:3], k=5, dims=d)] for d in ([16, DIM], [32, DIM])}
        head = store.publish(url, storage_options=options)
    assert head["deferred"] == ["index/prefix_00032.hnsw"]  # untuned: a default query starts at 16
    cache = tmp_path / "c"
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as remote:
        assert [p.name for p in cache.rglob("*.hnsw")] == ["prefix_00016.hnsw"]
        assert [h.ids for h in remote.query(vectors[:3], k=5)] == want[str([16, DIM])]
        assert [h.ids for h in remote.query(vectors[:3], k=5, dims=[32, DIM])] == want[str([32, DIM])]
        assert sorted(p.name for p in cache.rglob("*.hnsw")) == ["prefix_00016.hnsw", "prefix_00032.hnsw"]
    fs, root = filesystem(url, options)
    with fs.open_output_stream(f"{root}/versions/{head['version']}/index/prefix_00032.hnsw") as out:
        out.write(b"not an index")
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c2") as remote:
        with pytest.warns(UserWarning, match="corrupted.*rebuilding the index from the vectors"):
            got = [h.ids for h in remote.query(vectors[:3], k=5, dims=[32, DIM])]
        same = [len(set(a) & set(b)) for a, b in zip(got, want[str([32, DIM])])]
        assert sum(same) >= 12, same  # a new graph over the same rows


def test_a_deferred_index_of_a_version_newer_publishes_removed_is_rebuilt(tmp_path, options, bucket):
    """Publishes keep the 3 newest versions: a reader still on an older one finds its deferred index gone
    and builds it from the vectors (with a warning) instead of failing every query that needs it."""
    with _published_and_read(tmp_path, options, bucket, 1500, seed=1, index_dims=(16, 32)) as (store, vectors, remote):
        want = [h.ids for h in store.query(vectors[:3], k=5, dims=[32, DIM])]
        for i in range(3):
            store.add_vectors(vectors[:1] + i + 1, ids=[f"new{i}"])
            store.publish(f"s3://{bucket}/s.mrl", storage_options=options)  # version 1's folder goes with the third
        with pytest.warns(UserWarning, match="not found.*rebuilding the index from the vectors"):
            got = [h.ids for h in remote.query(vectors[:3], k=5, dims=[32, DIM])]
        same = [len(set(a) & set(b)) for a, b in zip(got, want)]
        assert sum(same) >= 12, same  # a new graph over the same rows


def test_a_reader_finds_ids_through_the_published_id_runs_downloaded_on_first_lookup(
    tmp_path, options, bucket, monkeypatch
):
    """Publish uploads the id cache's runs and HEAD defers them: a fresh reader's open and its queries leave
    them remote, its first lookup by id downloads them (checked against HEAD's digests) and finds ids through
    them instead of a join over every id of the catalog; a refresh does the same for the new version; a
    corrupted run is not kept, and the catalog joins instead (the runs are a cache)."""
    monkeypatch.setattr(id_index, "TAIL_ROWS", 64)  # runs at test sizes
    monkeypatch.setattr(id_index, "BUILD_ROWS", 128)
    monkeypatch.setattr(id_index, "READER_TAIL_ROWS", 100)  # past 100 rows without runs a reader would join
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1500)
    head = store.publish(url, storage_options=options)
    runs = [part for part in head["deferred"] if part.startswith("ids/")]
    assert runs and all(part in head["parts"] for part in runs)
    cache = tmp_path / "c"
    joined = []
    real_join = catalog_module.Catalog._join_ids
    monkeypatch.setattr(catalog_module.Catalog, "_join_ids", lambda *a: joined.append(a[1:]) or real_join(*a))
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as remote:
        remote.query(vectors[:2], k=3)
        assert not list(cache.rglob("*.run"))  # queries never look ids up
        wanted = ["r7", "r1499", "r640"]
        got = remote.get(wanted)
        assert got.column("id").to_pylist() == wanted
        np.testing.assert_allclose(np.stack(got.column("vector").to_numpy(zero_copy_only=False)),
                                   vectors[[7, 1499, 640]], atol=2e-2)  # fmt: skip
        assert sorted(p.name for p in cache.rglob("*.run")) == sorted(Path(part).name for part in runs)
        with pytest.raises(UnknownIdError):
            remote.get(["r3", "nowhere"])
        more = np.random.default_rng(5).standard_normal((300, DIM)).astype(np.float32)
        store.add_vectors(more, ids=[f"n{i}" for i in range(300)])
        newer = store.publish(url, storage_options=options)
        assert remote.refresh() is True
        assert remote.get(["n299", "r0"]).column("id").to_pylist() == ["n299", "r0"]
        newer_runs = [part for part in newer["deferred"] if part.startswith("ids/")]
        assert len(list(cache.rglob("*.run"))) == len(runs) + len(newer_runs)
    assert joined == []  # every lookup went through the runs
    fs, root = filesystem(url, options)
    with fs.open_output_stream(f"{root}/versions/{newer['version']}/{newer_runs[0]}") as out:
        out.write(b"not a run")
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c2") as remote:
        with pytest.warns(RuntimeWarning, match="corrupted; looking ids up in the catalog instead"):
            assert remote.get(["r7", "n3"]).column("id").to_pylist() == ["r7", "n3"]
        assert joined and Path(newer_runs[0]).name not in {p.name for p in (tmp_path / "c2").rglob("*.run")}
    store.close()


def test_a_reader_of_a_version_whose_id_runs_were_removed_joins_ids_in_its_catalog(
    tmp_path, options, bucket, monkeypatch
):
    """Publishes keep the 3 newest versions: a reader still on an older one finds its id runs gone, and its
    lookups by id go through its catalog instead of failing."""
    monkeypatch.setattr(id_index, "TAIL_ROWS", 64)
    monkeypatch.setattr(id_index, "READER_TAIL_ROWS", 100)
    joined, fetched = [], []
    real_join = catalog_module.Catalog._join_ids
    monkeypatch.setattr(catalog_module.Catalog, "_join_ids", lambda *a: joined.append(a[1:]) or real_join(*a))
    real_fetch = objectstore.RemoteSource.fetch_parts
    monkeypatch.setattr(objectstore.RemoteSource, "fetch_parts", lambda *a: fetched.append(a[2]) or real_fetch(*a))
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1500, seed=2)
    with store:
        head = store.publish(url, storage_options=options)
        runs = [part for part in head["deferred"] if part.startswith("ids/")]
        with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
            for i in range(3):
                store.add_vectors(vectors[:1] + i + 1, ids=[f"new{i}"])
                store.publish(url, storage_options=options)  # version 1's folder goes with the third
            assert remote.get(["r1400", "r2"]).column("id").to_pylist() == ["r1400", "r2"]
    assert runs and fetched == [runs]  # the version had runs, and the reader tried to fetch them
    assert joined and not list((tmp_path / "c").rglob("*.run"))


def test_the_first_lookup_by_id_downloads_its_runs_without_holding_up_other_threads(
    tmp_path, options, bucket, monkeypatch
):
    """The id runs come before the catalog's lock is taken: a filter or sql() in another thread runs during
    the download, and a second lookup waits for the same download instead of starting another."""
    monkeypatch.setattr(id_index, "TAIL_ROWS", 64)
    monkeypatch.setattr(id_index, "READER_TAIL_ROWS", 100)
    started, release, fetched = threading.Event(), threading.Event(), []
    real_fetch = objectstore.RemoteSource.fetch_parts

    def slow_fetch(*args):
        fetched.append(args[2])
        started.set()
        assert release.wait(30)
        return real_fetch(*args)

    monkeypatch.setattr(objectstore.RemoteSource, "fetch_parts", slow_fetch)
    url = f"s3://{bucket}/s.mrl"
    store, _ = _local_store(tmp_path / "local.mrl", 1500, seed=3)
    with store:
        store.publish(url, storage_options=options)
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as remote:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(remote.get, ["r10", "r1200"])
            assert started.wait(30)
            second = pool.submit(remote.get, ["r11"])
            counted = pool.submit(remote.sql, "SELECT count(*) AS n FROM items")
            assert counted.result(timeout=20).column("n").to_pylist() == [1500]  # during the download
            assert not first.done() and not second.done()
            release.set()
            assert first.result(timeout=30).column("id").to_pylist() == ["r10", "r1200"]
            assert second.result(timeout=30).column("id").to_pylist() == ["r11"]
    assert len(fetched) == 1


def _copies(cache: Path) -> dict[str, Path]:
    return {p.name.rsplit("-", 1)[0]: p for p in cache.glob("*/g*-v*")}  # named g0-v1-<digest of its parts>


def test_a_refreshed_reader_downloads_only_the_near_chunks_that_changed(tmp_path, options, bucket):
    """Near chunks are kept by object key and linked into each version's copy: a full chunk comes once."""
    with _published_and_read(tmp_path, options, bucket, 3000) as (store, vectors, remote):
        store.add_vectors(vectors[:100] + 1, ids=[f"n{i}" for i in range(100)])
        store.publish(f"s3://{bucket}/s.mrl", storage_options=options)
        assert remote.refresh() is True and len(remote) == 3100
        assert remote.query(vectors[5] + 1, k=1, dims=[16, 64]).ids == ["n5"]
    v1, v2 = (_copies(tmp_path / "c")[name] for name in ("g0-v1", "g0-v2"))
    band = "vectors/band_00000_00016/c"
    full, grown = f"{band}/0/0", f"{band}/2/0"  # 1024-row chunks: the third one filled up (952 rows, then 1024)
    assert (v1 / full).stat().st_ino == (v2 / full).stat().st_ino, "a full chunk is downloaded once"
    assert (v1 / grown).stat().st_ino != (v2 / grown).stat().st_ino


def test_a_refreshed_away_version_is_freed_at_once(tmp_path, options, bucket):
    """Its chunks and source referred to each other, so each old version (its S3 client's descriptors, its
    row cache of up to 256 MiB) stayed until a full garbage collection: 9 of 12 alive after 12 refreshes."""
    with _published_and_read(tmp_path, options, bucket, 3000) as (store, vectors, remote):
        remote.query(vectors[5], k=1, dims=[16, DIM])  # rows in the row cache
        old = weakref.ref(remote._versions.remote)
        store.add_vectors(vectors[:10] + 1, ids=[f"n{i}" for i in range(10)])
        store.publish(f"s3://{bucket}/s.mrl", storage_options=options)
        gc.disable()
        try:
            assert remote.refresh() and remote.query(vectors[5] + 1, k=1, dims=[16, DIM]).ids == ["n5"]
            assert old() is None
        finally:
            gc.enable()


def test_a_remote_scan_ended_by_a_refresh_says_so(tmp_path, options, bucket):
    """It raised a bare KeyError (the closed tier's chunk maps were gone)."""
    with _published_and_read(tmp_path, options, bucket, 3000) as (store, vectors, remote):
        batches = remote.scan(dims=DIM, batch_size=1000)
        assert batches.read_next_batch().num_rows == 1000
        store.add_vectors(vectors[:10] + 1, ids=[f"n{i}" for i in range(10)])
        store.publish(f"s3://{bucket}/s.mrl", storage_options=options)
        assert remote.refresh()
        with pytest.raises(mrlstore.StoreClosedError, match="read again"):
            batches.read_next_batch()
        assert remote.to_arrow(dims=DIM).num_rows == 3010


def test_old_version_copies_and_abandoned_downloads_leave_the_cache(tmp_path, options, bucket):
    url, cache = f"s3://{bucket}/s.mrl", tmp_path / "c"
    with _published_and_read(tmp_path, options, bucket, 2100) as (store, vectors, remote):
        for i in range(4):
            store.add_vectors(vectors[:1] + i + 1, ids=[f"n{i}"])
            store.publish(url, storage_options=options)
            remote.refresh()
        assert sorted(_copies(cache)) == [f"g0-v{v}" for v in range(1, 6)], "none idle for an hour yet"
        (root,) = {p.parent for p in _copies(cache).values()}
        abandoned, fresh = root / ".download-dead", root / ".download-live"
        abandoned.mkdir()
        fresh.mkdir()
        stale_chunks = [p for p in (root / "chunks").rglob("*") if p.is_file() and p.stat().st_nlink == 2]
        hour_ago = time.time() - 2 * 3600
        for old in [*(_copies(cache)[f"g0-v{v}"] for v in (1, 2, 3)), abandoned, *stale_chunks]:
            os.utime(old, (hour_ago, hour_ago))
        store.add_vectors(vectors[:1] + 9, ids=["n9"])
        store.publish(url, storage_options=options)
        assert remote.refresh() is True  # the newest copy is the one open: the oldest idle ones go
        assert remote.query(vectors[0] + 9, k=1, dims=[16, 64]).ids == ["n9"]
    # before v6 came: v1 and v2 were beyond the 3 newest and idle; v3 idle but among them
    assert sorted(_copies(cache)) == ["g0-v3", "g0-v4", "g0-v5", "g0-v6"]
    assert not abandoned.exists() and fresh.exists()
    assert [c for c in stale_chunks if not c.exists()], "v1's last chunk (52 rows) went with v1"
    for chunk in (root / "chunks").rglob("*"):
        if chunk.is_file():  # linked into a copy, or recent
            assert chunk.stat().st_nlink > 1 or time.time() - chunk.stat().st_mtime < 3600


def test_a_kept_chunk_is_copied_with_its_holes_where_hard_links_fail(tmp_path, monkeypatch):
    kept, link = tmp_path / "kept", tmp_path / "link"
    with open(kept, "wb") as f:
        f.write(b"rows")
        f.truncate(64 << 20)  # a full-size chunk file, mostly a hole

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(objectstore.os, "link", no_links)
    objectstore._link(kept, link)
    assert link.read_bytes() == kept.read_bytes() and link.stat().st_ino != kept.stat().st_ino
    assert link.stat().st_blocks * 512 < 1 << 20, "the hole stays a hole"


# -- versions, garbage and the cache when several parties meet at one URL ----------------------------------
def test_a_cache_never_serves_another_store_published_at_the_same_url(tmp_path, options, bucket):
    """The cache keeps copies by store (and endpoint), not by URL alone: a store deleted and another published
    at its URL is downloaded afresh, by new readers and by a refresh of an old one."""
    url, cache = f"s3://{bucket}/s.mrl", tmp_path / "c"
    first, _ = _local_store(tmp_path / "a.mrl", 300, seed=1)
    with first:
        first.publish(url, storage_options=options)
    old_reader = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache)
    assert len(old_reader) == 300
    fs, root = filesystem(url, options)
    fs.delete_dir(root)
    second, vectors = _local_store(tmp_path / "b.mrl", 200, seed=2)  # the same ids, other vectors
    with second:
        second.publish(url, storage_options=options)
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as reader:
        assert len(reader) == 200
        np.testing.assert_allclose(reader.get(["r3"]).column("vector")[0].as_py(), vectors[3], atol=2e-2)
    with old_reader:
        assert old_reader.refresh() is True and len(old_reader) == 200
        assert old_reader.query(vectors[7], k=1).ids == ["r7"]


def test_a_store_published_again_after_its_objects_were_deleted_is_never_served_from_the_old_copy(
    tmp_path, options, bucket
):
    """Its objects deleted, the same store published again is numbered from 1 again: a reader with the cache
    of the first version 1 opened that copy (300 rows, where 250 were published), and an old reader's
    refresh saw nothing new."""
    url, cache = f"s3://{bucket}/s.mrl", tmp_path / "c"
    store, vectors = _local_store(tmp_path / "a.mrl", 300)
    with store:
        assert store.publish(url, storage_options=options)["version"] == 1
        old_reader = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache)
        fs, root = filesystem(url, options)
        fs.delete_dir(root)
        store.delete([f"r{i}" for i in range(50)])
        assert store.publish(url, storage_options=options)["version"] == 1
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as reader:
        assert len(reader) == 250 and reader.verify() == []
        with pytest.raises(UnknownIdError):
            reader.get(["r3"])
    with old_reader:
        assert len(old_reader) == 300
        assert old_reader.refresh() is True and len(old_reader) == 250
        assert old_reader.query(vectors[70], k=1).ids == ["r70"]


def test_the_cache_keeps_the_copies_downloaded_last_not_the_highest_numbers(tmp_path):
    """Copies were ranked by version number: after a store was published again from version 1, the copies of
    its deleted numbering (never served again) were kept and the live one's evicted."""

    def head(version: int, at: float) -> dict:
        return {"generation": 0, "version": version, "published_at": at, "parts": {"catalog.duckdb": f"{at}"}}

    heads = [head(v, 1000.0 + v) for v in range(1, 6)] + [head(1, 2001.0), head(2, 2002.0)]
    hour_ago = time.time() - 7200
    for n, h in enumerate(heads):  # downloaded in this order; none used for an hour
        copy = tmp_path / objectstore._copy_name(h)
        (copy / "catalog.duckdb").parent.mkdir()
        (copy / "catalog.duckdb").touch()
        os.utime(copy / "catalog.duckdb", (hour_ago + n, hour_ago + n))
        os.utime(copy, (hour_ago, hour_ago))
    objectstore._evict_old_copies(tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(objectstore._copy_name(h) for h in heads[-objectstore.KEEP_VERSIONS :])


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
def test_readers_opening_one_url_at_once_share_one_download(tmp_path, options, bucket):
    """The first opens of a version race to put its copy in the shared cache: one wins, the others use it."""
    url = f"s3://{bucket}/s.mrl"
    store, vectors = _local_store(tmp_path / "local.mrl", 1200)
    with store:
        store.publish(url, storage_options=options)

    def open_and_query(cache: Path) -> list[str]:
        start.wait()
        with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as reader:
            return reader.query(vectors[9], k=1).ids

    for trial in range(3):
        start = threading.Barrier(4)
        with ThreadPoolExecutor(4) as pool:
            found = list(pool.map(open_and_query, [tmp_path / f"c{trial}"] * 4))
        assert found == [["r9"]] * 4
        assert len(list((tmp_path / f"c{trial}").glob("*/g0-v1-*"))) == 1


def test_garbage_collection_keeps_every_chunk_a_kept_version_names(tmp_path, options, bucket, monkeypatch):
    """A chunk that grew gets a new key; the old key goes only when no kept version (3) names it, however
    long ago it was uploaded: a reader of an older kept version goes on reading its rows."""
    monkeypatch.setattr(objectstore, "_older_than", lambda entry, seconds: True)  # every object long uploaded
    url = f"s3://{bucket}/s.mrl"
    with _published_and_read(tmp_path, options, bucket, 1500) as (store, vectors, remote):
        first = remote._versions.remote.head["chunks"]
        grown = [key for name, key in first.items() if name.endswith("/1")]  # rows 1024-1499 of each band
        fs, root = filesystem(url, options)
        for i in range(3):
            store.add_vectors(vectors[:1] + i + 1, ids=[f"n{i}"])  # chunk 1 grows each time
            store.publish(url, storage_options=options)
            kept = i < 2  # versions 1-3 are kept, then versions 2-4
            assert all((fs.get_file_info(f"{root}/{key}").type == pafs.FileType.File) == kept for key in grown)
            if kept:
                assert remote.get(["r1400"], dims=DIM).num_rows == 1
                assert remote.query(vectors[1450], k=1).ids == ["r1450"]


def test_a_publish_that_cannot_delete_old_objects_still_publishes(tmp_path):
    """Garbage collection runs after HEAD, the commit point: a bucket policy that refuses deletes costs
    storage, with a warning, and every publish returns its version."""
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        refused = {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "*"}
        writer = _user_allowed(endpoint, [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}, refused])
        url = f"s3://{_bucket(writer, 'nodelete')}/s.mrl"
        store, vectors = _local_store(tmp_path / "local.mrl", 100)
        with store:
            for version in range(1, 6):
                store.add_vectors(vectors[:1] + version, ids=[f"n{version}"])
                if version <= KEEP:
                    assert store.publish(url, storage_options=writer)["version"] == version
                else:
                    with pytest.warns(RuntimeWarning, match=f"published version {version}, but could not delete"):
                        assert store.publish(url, storage_options=writer)["version"] == version
        with mrlstore.open(url, read_only=True, storage_options=writer, cache_dir=tmp_path / "c") as reader:
            assert len(reader) == 105 and reader.info()["version"] == 5
    finally:
        proc.terminate()
        proc.wait()


KEEP = objectstore.KEEP_VERSIONS


def test_a_refresh_that_fails_leaves_the_reader_on_its_version(tmp_path, options, bucket, monkeypatch):
    url = f"s3://{bucket}/s.mrl"
    with _published_and_read(tmp_path, options, bucket, 1100) as (store, vectors, remote):
        store.add_vectors(vectors[:100] + 1, ids=[f"n{i}" for i in range(100)])
        store.publish(url, storage_options=options)
        download = objectstore._download_chunk

        def fails_once(source, key, *args):
            monkeypatch.setattr(objectstore, "_download_chunk", download)
            raise mrlstore.ObjectStorageError(f"{source.url}: download {key} failed: connection reset")

        monkeypatch.setattr(objectstore, "_download_chunk", fails_once)
        with pytest.raises(mrlstore.ObjectStorageError, match="connection reset"):
            remote.refresh()
        assert len(remote) == 1100 and remote.info()["version"] == 1
        assert remote.query(vectors[3], k=1).ids == ["r3"] and remote.get(["r1000"], dims=DIM).num_rows == 1
        assert remote.refresh() is True and len(remote) == 1200 and remote.query(vectors[5] + 1, k=1).ids == ["n5"]


def test_overlapping_publishes_of_one_url_take_turns(tmp_path, options, bucket, monkeypatch):
    """Two publishes at once would both write the next version's parts: they take turns, each a version."""
    url = f"s3://{bucket}/s.mrl"
    upload = objectstore._upload_part

    def slow_upload(*args):
        time.sleep(0.2)  # a slow link: the other publish starts meanwhile
        return upload(*args)

    monkeypatch.setattr(objectstore, "_upload_part", slow_upload)
    store, vectors = _local_store(tmp_path / "local.mrl", 500)
    with store, ThreadPoolExecutor(2) as pool:
        heads = list(pool.map(lambda _: store.publish(url, storage_options=options), range(2)))
        assert sorted(h["version"] for h in heads) == [1, 2]
        with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c") as reader:
            assert reader.info()["version"] == 2 and reader.query(vectors[4], k=1).ids == ["r4"]


@pytest.mark.parametrize(
    "head", [[1, 2], {"format": 1}, "version-as-text", "no-chunks"], ids=["list", "bare", "version", "chunks"]
)
def test_a_damaged_head_is_a_typed_error_for_readers_and_publishers(tmp_path, options, bucket, head):
    url = f"s3://{bucket}/s.mrl"
    store, _ = _local_store(tmp_path / "local.mrl", 100)
    with store:
        good = store.publish(url, storage_options=options)
        if head == "version-as-text":
            head = {**good, "version": "2"}
        elif head == "no-chunks":
            head = {k: v for k, v in good.items() if k != "chunks"}
        fs, root = filesystem(url, options)
        objectstore.write_bytes(fs, f"{root}/HEAD", json.dumps(head).encode())
        with pytest.raises(mrlstore.CorruptStoreError, match="HEAD"):
            mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp_path / "c")
        with pytest.raises(mrlstore.CorruptStoreError, match="HEAD"):
            store.publish(url, storage_options=options)


def test_storage_options_must_be_a_mapping(tmp_path, bucket):
    with pytest.raises(mrlstore.InvalidInputError, match="storage_options must be a dict"):
        mrlstore.open(f"s3://{bucket}/s.mrl", read_only=True, storage_options=["key"], cache_dir=tmp_path / "c")
