"""Pure scoring helpers of the funnel."""

from __future__ import annotations

import numpy as np
import pytest

from mrlstore import funnel


def test_top_orders_best_first_with_stable_ties():
    s = np.array([0.1, 0.9, 0.5, 0.9, -1.0])
    assert funnel.top(s, 3, "cosine").tolist() == [1, 3, 2]
    assert funnel.top(s, 2, "l2").tolist() == [4, 0]
    assert funnel.top(s, 10, "ip").tolist() == [1, 3, 2, 0, 4]
    assert funnel.top(s, 0, "ip").tolist() == []


def test_default_shortlists_follow_the_paper():
    assert funnel.default_shortlists(10, 2) == [200]
    assert funnel.default_shortlists(10, 4) == [200, 100, 50]
    assert funnel.default_shortlists(50, 3) == [1000, 500]
    assert funnel.shortlist_sizes([30, 20], 5, 3) == [30, 20]
    with pytest.raises(ValueError):
        funnel.shortlist_sizes([30], 5, 3)


@pytest.mark.parametrize("metric", funnel.METRICS)
def test_incremental_prefix_scores_equal_direct_ones(metric, rng):
    x = rng.standard_normal((50, 40)).astype(np.float32)
    q = rng.standard_normal(40).astype(np.float32)
    scorer = funnel.PrefixScorer(q, np.arange(50), metric)
    for stop in (4, 16, 40):
        scorer.extend(x[:, scorer.covered : stop], stop)
        xs, qs = x[:, :stop].astype(np.float64), q[:stop].astype(np.float64)
        direct = {
            "cosine": xs @ qs / (np.linalg.norm(xs, axis=1) * np.linalg.norm(qs)),
            "ip": xs @ qs,
            "l2": np.linalg.norm(xs - qs, axis=1),
        }[metric]
        np.testing.assert_allclose(scorer.scores(), direct, rtol=1e-5, atol=1e-5)
        block = funnel.block_scores(x[:, :stop], q[None, :stop], metric)[:, 0]
        expected = direct**2 if metric == "l2" else direct  # block scores rank by squared distance
        np.testing.assert_allclose(block, expected, rtol=1e-4, atol=1e-4)
    scorer.keep(np.array([3, 1]))
    assert scorer.rows.tolist() == [3, 1]


def test_running_top_merges_blocks(rng):
    scores = rng.standard_normal((100, 2))
    best = funnel.RunningTop(2, 5, "cosine")
    for lo in range(0, 100, 30):
        best.update(np.arange(lo, min(100, lo + 30)), scores[lo : lo + 30])
    for j in range(2):
        assert best.rows[j].tolist() == np.argsort(-scores[:, j])[:5].tolist()


def test_zero_prefix_scores_zero_under_cosine():
    scorer = funnel.PrefixScorer(np.ones(4, np.float32), np.arange(2), "cosine")
    scorer.extend(np.array([[0, 0], [1, 1]], np.float32), 2)
    assert scorer.scores().tolist() == [0.0, 1.0]


def test_zero_query_prefix_scores_zero_in_scans():
    block = np.array([[1, 0], [0, 1]], np.float32)
    scores = funnel.block_scores(block, np.zeros((1, 2), np.float32), "cosine")
    assert np.isfinite(scores).all() and (scores == 0).all()
