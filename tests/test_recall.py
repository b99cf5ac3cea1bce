"""End-to-end recall of the funnel on MRL-like data, against exact numpy computations."""

from __future__ import annotations

import numpy as np
import pytest

import mrlstore
from mrlstore.query.plan import shortlist_sizes
from mrlstore.testing import exact_funnel, exact_search, mrl_like_split, recall_at_k


@pytest.fixture(scope="module", params=[0.6, 1.0], ids=["noise0.6", "noise1.0"])
def loaded(request, tmp_path_factory):
    base, queries = mrl_like_split(8000, 60, 2048, seed=7, noise=request.param)
    store = mrlstore.open(tmp_path_factory.mktemp("recall") / "s", dim=2048)
    store.add_vectors(base[:5000], ids=[str(i) for i in range(5000)])
    store.add_vectors(base[5000:], ids=[str(i) for i in range(5000, len(base))])  # two batches, two commits
    yield store, base.astype(np.float16).astype(np.float32), queries
    store.close()


@pytest.mark.parametrize("dims", [[16, 2048], [16, 64, 256, 2048], [24, 2048], [2048], [16]])
def test_funnel_matches_exact_funnel(loaded, dims):
    store, stored, queries = loaded
    k = 10
    sizes = shortlist_sizes(None, k, len(dims))
    hits = store.query(queries, k=k, dims=dims, metadata=False)
    found = [h.ids for h in hits]
    truth = exact_funnel(stored, queries, dims, sizes, k)
    recall = recall_at_k(found, truth)
    full = recall_at_k(found, exact_search(stored, queries, k))
    print(f"dims={dims} recall vs exact funnel {recall:.4f}, vs exact full-dim {full:.4f}")
    assert recall >= 0.99
    if dims == [2048]:
        assert recall == 1.0  # no index involved: exact search
    for h in hits:
        assert len(h.ids) == k
        assert np.all(np.diff(h.scores) <= 1e-6)  # best first


def test_scores_are_exact_cosine_on_last_prefix(loaded):
    store, stored, queries = loaded
    q = queries[0]
    hits = store.query(q, k=5, dims=[16, 256], metadata=False)
    rows = [int(i) for i in hits.ids]
    x = stored[rows, :256].astype(np.float64)
    expected = x @ q[:256] / (np.linalg.norm(x, axis=1) * np.linalg.norm(q[:256]))
    np.testing.assert_allclose(hits.scores, expected, rtol=1e-5, atol=1e-6)


def test_custom_shortlist_and_ef(loaded):
    store, stored, queries = loaded
    dims = [16, 64, 2048]
    hits = store.query(queries[:10], k=5, dims=dims, shortlist=[400, 50], ef=500, metadata=False)
    truth = exact_funnel(stored, queries[:10], dims, [400, 50], 5)
    assert recall_at_k([h.ids for h in hits], truth) >= 0.99
    assert shortlist_sizes(300, 5, 4) == [300, 150, 75]
