"""One contract for every way a store's bands are read: the local memory-mapped tier, a version on object
storage read with ranged GETs (a moto server), and one with its short bands downloaded (``local_dims``).
Each reader must return the stored values exactly and the same answers as numpy on them."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mrlstore

DIM = 128
BANDS = (16, 64, DIM)
N = 1500
GROUPS = 3
KINDS = ["local", "remote", "remote-local-16"]


@pytest.fixture(scope="module")
def published(tmp_path_factory, s3_endpoint):
    """A local store (two appends, some deletes) and its published copy: (path, url, options, stored values)."""
    from mrlstore.tiers.objectstore import filesystem

    root = tmp_path_factory.mktemp("contract")
    x = np.random.default_rng(7).standard_normal((N, DIM)).astype(np.float32)
    path = root / "s.mrl"
    with mrlstore.open(path, dim=DIM, bands=BANDS, index_dims=(16,), chunk_rows=512) as store:
        meta = [{"group": i % GROUPS, "name": f"n{i}"} for i in range(N)]
        store.add_vectors(x[:900], ids=[f"r{i}" for i in range(900)], metadata=meta[:900])
        store.add_vectors(x[900:], ids=[f"r{i}" for i in range(900, N)], metadata=meta[900:])
        store.delete([f"r{i}" for i in range(0, N, 50)])
        options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
        bucket = f"contract-{os.getpid()}"
        fs, _ = filesystem(f"s3://{bucket}", {**options, "allow_bucket_creation": True})
        fs.create_dir(bucket)
        store.publish(f"s3://{bucket}/s.mrl", storage_options=options)
    live = np.array([i for i in range(N) if i % 50], dtype=np.int64)
    return path, f"s3://{bucket}/s.mrl", options, x.astype(np.float16).astype(np.float32), live, root


@pytest.fixture(params=KINDS)
def reader(request, published):
    path, url, options, _, _, root = published
    if request.param == "local":
        store = mrlstore.open(path, read_only=True)
    else:
        local_dims = 16 if request.param == "remote-local-16" else 0
        cache = root / f"cache-{request.param}"
        store = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache, local_dims=local_dims)
    yield store
    store.close()


def _exact(values: np.ndarray, rows: np.ndarray, query: np.ndarray, d: int, k: int) -> list[str]:
    """Cosine top-k of ``query`` over ``rows`` on the first ``d`` stored numbers (numpy, float64)."""
    a = values[rows, :d].astype(np.float64)
    q = query[:d].astype(np.float64)
    scores = a @ q / (np.linalg.norm(a, axis=1) * np.linalg.norm(q))
    order = np.lexsort((rows, -scores))[:k]
    return [f"r{r}" for r in rows[order]]


def test_get_returns_the_stored_values(reader, published):
    _, _, _, values, live, _ = published
    ids = [f"r{i}" for i in live[::97]]
    for d in (16, 64, DIM):
        got = np.stack(reader.get(ids, dims=d).column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got, values[live[::97], :d])
    with pytest.raises(mrlstore.UnknownIdError):
        reader.get(["r0"])  # deleted


def test_exact_search_equals_numpy(reader, published):
    _, _, _, values, live, _ = published
    queries = np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32)
    for d in (16, 64, DIM):
        got = reader.query(queries, k=7, dims=[d], metadata=False)
        assert [h.ids for h in got] == [_exact(values, live, q, d, 7) for q in queries]


def test_a_funnel_re_ranks_its_shortlist_exactly(reader, published):
    _, _, _, values, live, _ = published
    queries = values[live[[3, 300, 800]]] + 0.05
    for dims in ([16, DIM], [16, 64, DIM]):
        got = reader.query(queries, k=5, dims=dims, shortlist=len(live))  # a shortlist of every row: exact
        assert [h.ids for h in got] == [_exact(values, live, q, DIM, 5) for q in queries]
        short = reader.query(queries[0], k=5, dims=dims)
        assert short.ids[0] == f"r{live[3]}" and short.dims == tuple(dims)


def test_filters_and_metadata_agree(reader, published):
    _, _, _, values, live, _ = published
    query = values[live[10]]
    hits = reader.query(query, k=6, dims=[DIM], where='"group" = 1')
    rows = live[live % GROUPS == 1]
    assert hits.ids == _exact(values, rows, query, DIM, 6)
    assert all(m["group"] == 1 and m["name"] == i.replace("r", "n") for i, m in zip(hits.ids, hits.metadata))
    count = reader.sql('SELECT count(*) AS n FROM items WHERE "group" = 1').column("n")[0].as_py()
    assert count == len(rows)


def test_scans_and_tables_read_every_live_row(reader, published):
    _, _, _, values, live, _ = published
    table = reader.to_arrow(dims=64, where='"group" = 2')
    rows = live[live % GROUPS == 2]
    assert table.column("id").to_pylist() == [f"r{r}" for r in rows]
    np.testing.assert_array_equal(np.stack(table.column("vector").to_numpy(zero_copy_only=False)), values[rows, :64])
    assert sum(b.num_rows for b in reader.scan(batch_size=100)) == len(live)


def test_state_and_checks(reader, published):
    _, _, _, _, live, _ = published
    info = reader.info()
    assert (info.live, info.rows, info.deleted) == (len(live), N, N - len(live)) and len(reader) == len(live)
    assert reader.verify() == []
    with pytest.raises(mrlstore.ReadOnlyError):
        reader.delete(["r1"])
