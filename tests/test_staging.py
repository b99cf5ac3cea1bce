"""Staged writes without Ray: fragments checked when written, committed as one, refused whole when any is bad."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import mrlstore
from mrlstore.inputs.staging import write_fragment
from mrlstore.options import StoreConfig
from mrlstore.tiers.layout import STAGING_DIR
from mrlstore.upkeep.staged import StagedWriter

DIM = 32


def rows(lo: int, n: int, **extra: list) -> pa.Table:
    vectors = np.random.default_rng(lo).standard_normal((n, DIM)).astype(np.float32)
    columns = {"id": [f"r{i}" for i in range(lo, lo + n)], "embedding": list(vectors), **extra}
    return pa.table(columns)


@pytest.fixture
def store(tmp_path):
    with mrlstore.open(tmp_path / "s.mrl", dim=DIM, index_dims=[8]) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        yield s


def stage(store, *tables: pa.Table, where: Path | None = None) -> list[str]:
    where = where or store.path / STAGING_DIR / "w"
    return [write_fragment(where, t, "embedding", "id", store.staging_shape())["path"] for t in tables]


def test_fragments_commit_as_one_with_their_metadata(store):
    paths = stage(store, rows(0, 40, color=["red"] * 40), rows(40, 25, size=list(range(25))))
    assert store.commit_staged(paths) == 65
    assert len(store) == 66
    got = store.get(["r3", "r50"]).to_pylist()
    assert (got[0]["color"], got[0]["size"]) == ("red", None)
    assert (got[1]["color"], got[1]["size"]) == (None, 10)


def test_a_bad_vector_is_refused_where_the_worker_writes_it(store):
    bad = rows(0, 5).to_pydict()
    bad["embedding"][2] = [0.0] * DIM
    with pytest.raises(mrlstore.ZeroVectorError):
        stage(store, pa.table(bad))
    with pytest.raises(mrlstore.ShapeError):
        stage(store, pa.table({"id": ["a"], "embedding": [[1.0] * (DIM - 1)]}))


@pytest.mark.parametrize("damage", ["truncated", "other store", "metadata types"])
def test_any_bad_fragment_refuses_the_whole_commit(store, tmp_path, damage):
    paths = stage(store, rows(0, 30), rows(30, 30, num=list(range(30))))
    if damage == "truncated":
        data = open(paths[1], "rb").read()
        open(paths[1], "wb").write(data[: len(data) // 2])
        error = mrlstore.InvalidInputError
    elif damage == "other store":
        with mrlstore.open(tmp_path / "other.mrl", dim=DIM + 8) as other:
            paths += stage(other, pa.table({"id": ["x"], "embedding": [[1.0] * (DIM + 8)]}))
        error = mrlstore.InvalidInputError
    else:
        paths += stage(store, rows(60, 3, num=["a", "b", "c"]))
        error = mrlstore.MetadataError
    with pytest.raises(error):
        store.commit_staged(paths)
    assert len(store) == 1 and store.verify() == []
    assert store.commit_staged(paths[:1]) == 30  # the store takes writes again


def test_a_writer_that_opens_the_store_clears_fragments_never_committed(tmp_path):
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as s:
        stage(s, rows(0, 10))
    assert any((path / STAGING_DIR).rglob("*.arrow"))
    with mrlstore.open(path, read_only=True) as reader:  # a reader leaves them: a writer may be using them
        assert len(reader) == 0
    assert any((path / STAGING_DIR).rglob("*.arrow"))
    with mrlstore.open(path) as s:
        assert len(s) == 0
    assert not (path / STAGING_DIR).exists()


# -- the staged writer: a Ray driver's commit, without the store's ids or indexes in memory ---------------
def staged_store(tmp_path) -> tuple[Path, list[str]]:
    """A store with one row, and fragments of 65 new rows staged beside it."""
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        frags = tmp_path / "fragments"  # beside the store: a writer's open clears the store's own staging
        paths = stage(s, rows(0, 40, color=["red"] * 40), rows(40, 25, size=list(range(25))), where=frags)
    return path, paths


def test_the_staged_writer_commits_as_one_and_the_next_open_extends_the_indexes(tmp_path):
    path, paths = staged_store(tmp_path)
    writer = StagedWriter(path, StoreConfig())
    try:
        with pytest.raises(mrlstore.StoreLockedError):
            mrlstore.open(path)  # it is the store's writer
        assert writer.commit_staged(paths) == 65
        with pytest.raises(mrlstore.StoreLockedError):
            StagedWriter(path, StoreConfig())
    finally:
        writer.close()
    with mrlstore.open(path) as s:
        assert len(s) == 66 and s.verify() == []
        got = s.get(["r3", "r50"]).to_pylist()
        assert (got[0]["color"], got[0]["size"], got[1]["color"], got[1]["size"]) == ("red", None, None, 10)
        hits = s.query(np.asarray(got[1]["vector"], np.float32), k=1, dims=[8, DIM])  # via the 8-d HNSW
        assert hits.ids == ["r50"]


@pytest.mark.parametrize("problem", ["repeated across fragments", "already in the store", "metadata types"])
def test_a_staged_commit_that_fails_changes_nothing(tmp_path, problem):
    path, paths = staged_store(tmp_path)
    with mrlstore.open(path) as s:
        extra = {
            "repeated across fragments": rows(30, 3),
            "already in the store": pa.table({"id": ["old"], "embedding": [[2.0] * DIM]}),
            "metadata types": rows(70, 3, size=["a", "b", "c"]),
        }[problem]
        paths += stage(s, extra, where=tmp_path / "fragments")
    error = mrlstore.MetadataError if problem == "metadata types" else mrlstore.DuplicateIdError
    writer = StagedWriter(path, StoreConfig())
    try:
        with pytest.raises(error):
            writer.commit_staged(paths)
        assert writer.commit_staged(paths[:1]) == 40  # it takes writes again
    finally:
        writer.close()
    with mrlstore.open(path) as s:
        assert len(s) == 41 and s.verify() == [] and "size" not in s.sql("SELECT * FROM items").column_names


KILLED_COMMITS = """
import sys
from mrlstore.options import StoreConfig
from mrlstore.upkeep.staged import StagedWriter
writer = StagedWriter(sys.argv[1], StoreConfig())
for path in sys.argv[2:]:
    writer.commit_staged([path])
    print("committed", flush=True)
"""


@pytest.mark.parametrize("delay", [0.4, 0.9, 1.6])
def test_a_staged_writer_killed_mid_commit_leaves_whole_commits_only(tmp_path, delay):
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8], chunk_rows=1000) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        paths = stage(s, *(rows(i * 3000, 3000) for i in range(40)), where=tmp_path / "fragments")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COMMITS, str(path), *paths], stdout=subprocess.PIPE)
    time.sleep(delay)
    proc.kill()
    done = proc.communicate()[0].count(b"committed")
    with mrlstore.open(path) as s:
        assert len(s) - 1 in (3000 * done, 3000 * (done + 1)) and s.verify() == []
        if len(s) > 1:
            assert s.get(["r0"]).num_rows == 1
