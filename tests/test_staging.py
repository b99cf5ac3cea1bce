"""Staged writes without Ray: fragments checked when written, committed as one, refused whole when any is bad."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import mrlstore
from mrlstore.inputs.staging import write_fragment
from mrlstore.tiers.layout import STAGING_DIR

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


def stage(store, *tables: pa.Table) -> list[str]:
    where = store.path / STAGING_DIR / "w"
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
