"""A reader loads at open only the prefix index a default query searches first; the others load from their
files on first use (for a store on object storage, they download then: tests/test_objectstore.py), with
the deletions made meanwhile, and a file found damaged then is rebuilt from the vectors."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

import mrlstore
from mrlstore.testing import mrl_like

DIM = 64
N = 1500
INDEX_DIMS = (16, 32)


def _vectors(n: int = N, sample: int = 0, rotated: bool = False) -> np.ndarray:
    x, _ = mrl_like(n, DIM, noise=1.0, seed=5, sample=sample)
    if rotated:  # the same neighbours without prefix structure: tune fits codes
        q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((DIM, DIM)))
        x = x @ q.astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def _writer(path, **kw) -> mrlstore.Store:
    return mrlstore.open(path, dim=DIM, bands=(16, 32, DIM), index_dims=INDEX_DIMS, chunk_rows=512, **kw)


def _loaded(store: mrlstore.Store) -> dict[tuple[str, int], bool]:
    return {(family, d): index.loaded for family, d, index in store._state.indexes.all_indexes()}


def _ids(hits) -> list[list[str]]:
    return [list(h.ids) for h in hits]


SHAPES = [None, [16, DIM], [32, DIM]]


@pytest.mark.parametrize(
    "kind, n",
    [("untuned", N), ("tuned raw", 8 * N), ("tuned", 8 * N), ("tuned rotated", 8 * N), ("tuned small", N)],
)
def test_a_reader_loads_the_default_querys_index_at_open_and_the_others_on_first_use(tmp_path, kind, n):
    """Whatever the planner chose. ``tune`` picks the fastest shape it measures, so its choice may vary with
    the machine's load: on 1,500 rows it is usually an exact scan (no index at open), on 30,000 an index."""
    path, rotated = tmp_path / "s.mrl", kind == "tuned rotated"
    queries = _vectors(10, sample=1, rotated=rotated)
    with _writer(path, **({"prefixes": "raw"} if kind == "tuned raw" else {})) as writer:
        writer.add_vectors(_vectors(n, rotated=rotated), ids=[str(i) for i in range(n)])
        if kind != "untuned":
            writer.tune(recall=0.9, k=10, sample=100)
            if kind == "tuned raw":
                assert writer.info().prefixes == "raw"  # created so: tune fits no codes
        first = (writer.info().tuned or {"dims": INDEX_DIMS})["dims"][0]  # the default query's first prefix
        want = {str(dims): _ids(writer.query(queries, k=10, dims=dims)) for dims in SHAPES}
        assert all(_loaded(writer).values()), "a writer keeps every index in memory"
    with mrlstore.open(path, read_only=True) as reader:
        at_open = _loaded(reader)
        assert list(at_open.values()).count(True) == (first < DIM) and len(at_open) >= 2, at_open
        assert _ids(reader.query(queries, k=10)) == want["None"]
        assert _loaded(reader) == at_open, "the index loaded at open is the one the planner chose"
        for dims in SHAPES[1:]:
            assert _ids(reader.query(queries, k=10, dims=dims)) == want[str(dims)]
        assert all(_loaded(reader).values())


def test_concurrent_first_queries_load_a_deferred_index_once(tmp_path):
    path = tmp_path / "s.mrl"
    queries = _vectors(8, sample=1)
    with _writer(path) as writer:
        writer.add_vectors(_vectors(), ids=[str(i) for i in range(N)])
        want = _ids(writer.query(queries, k=10, dims=[32, DIM]))
    with mrlstore.open(path, read_only=True) as reader:
        assert _loaded(reader) == {("prefix", 16): True, ("prefix", 32): False}
        got: list[list[list[str]]] = []
        first_use = lambda: got.append(_ids(reader.query(queries, k=10, dims=[32, DIM])))  # noqa: E731
        threads = [threading.Thread(target=first_use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [want] * 4


def test_rows_deleted_before_a_deferred_index_loads_stay_hidden(tmp_path):
    path = tmp_path / "s.mrl"
    vectors = _vectors()
    with _writer(path) as writer:
        writer.add_vectors(vectors, ids=[str(i) for i in range(N)])
    writer = _writer(path)  # the saved index files hold every row
    try:
        writer.delete(["3", "4"])
        with mrlstore.open(path, read_only=True) as reader:  # waits for the writer to publish the deletes
            assert len(reader) == N - 2 and _loaded(reader)[("prefix", 32)] is False
            writer.delete(["5", "6"])
            writer.close()  # publishes for the reader
            assert reader.refresh() is True  # deletions reach the deferred index as it waits
            assert _loaded(reader)[("prefix", 32)] is False
            for row in range(3, 8):
                hits = reader.query(vectors[row], k=5, dims=[32, DIM], shortlist=20)
                assert (str(row) in hits.ids) == (row == 7), (row, hits.ids)
            assert _loaded(reader)[("prefix", 32)] is True
            assert reader._state.indexes.by_dim[32].live_count == N - 4
    finally:
        writer.close()


@pytest.mark.parametrize("when", ["before the open", "after the open"])
def test_a_deferred_index_found_damaged_on_first_use_is_rebuilt(tmp_path, when):
    path = tmp_path / "s.mrl"
    vectors, queries = _vectors(), _vectors(10, sample=1)
    with _writer(path) as writer:
        writer.add_vectors(vectors, ids=[str(i) for i in range(N)])
        want = _ids(writer.query(queries, k=10, dims=[32, DIM], shortlist=100))

    def damage() -> None:
        with open(path / "index" / "prefix_00032.hnsw", "r+b") as f:
            f.seek(200)
            f.write(b"damage")  # the same size: only the checksum tells

    if when == "before the open":
        damage()
    with mrlstore.open(path, read_only=True) as reader:
        assert reader.index_status == {16: "loaded", 32: "loaded"}  # the sidecar and size: checked at open
        if when == "after the open":
            damage()
        with pytest.warns(UserWarning, match="does not match its checksum.*rebuilding the index from the vectors"):
            got = _ids(reader.query(queries, k=10, dims=[32, DIM], shortlist=100))
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
        assert overlap >= 0.9, overlap  # a new graph over the same rows
        assert reader._state.indexes.by_dim[32].live_count == N
        assert reader.index_status == {16: "loaded", 32: "rebuilt"}


def test_a_deferred_index_its_live_writer_saved_again_loads_without_a_rebuild(tmp_path):
    """A reader beside a live writer reads the index files the writer keeps saving: a file saved after the
    reader opened, with more rows than the reader's version, is used as it is (rows past the version stay
    invisible) and the refresh that brings them adds nothing twice."""
    path = tmp_path / "s.mrl"
    vectors = _vectors(N + 200)
    writer = _writer(path)
    try:
        writer.add_vectors(vectors[:N], ids=[str(i) for i in range(N)])
        writer.checkpoint()
        with mrlstore.open(path, read_only=True) as reader:
            assert len(reader) == N and _loaded(reader)[("prefix", 32)] is False
            writer.add_vectors(vectors[N:], ids=[str(i) for i in range(N, N + 200)])
            writer.checkpoint()  # the 32-d file now holds rows the reader's version does not
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no rebuild
                hits = reader.query(vectors[N + 5], k=5, dims=[32, DIM], shortlist=20)
                assert str(N + 5) not in hits.ids and all(int(i) < N for i in hits.ids)
                assert _loaded(reader)[("prefix", 32)] is True
                writer.close()  # publishes for the reader
                assert reader.refresh() is True
                assert reader.query(vectors[N + 5], k=5, dims=[32, DIM], shortlist=20).ids[0] == str(N + 5)
            assert reader._state.indexes.by_dim[32].live_count == N + 200
    finally:
        writer.close()
