"""Prefix scoring in numpy: the one definition of a score that the kernels, the exact references of
``testing`` and the prefix heads of ``benchmarks/adaptive.py`` share (no engines).

Every score comes from three sums over the prefix: dot = x.q, sq = x.x and qq = q.q. Cosine re-normalises
the prefix (as MRL requires) and scores an all-zero prefix 0; l2 is the Euclidean distance (lower is
better).
"""

from __future__ import annotations

import numpy as np

METRICS = ("cosine", "ip", "l2")


def higher_is_better(metric: str) -> bool:
    return metric != "l2"


def scores_from_sums(dot: np.ndarray, sq: np.ndarray, qq: float | np.ndarray, metric: str) -> np.ndarray:
    """Scores from the prefix sums (float64)."""
    dot = np.asarray(dot, dtype=np.float64)
    if metric == "ip":
        return dot.copy()
    if metric == "l2":
        return np.sqrt(np.maximum(sq - 2.0 * dot + qq, 0.0))
    denom = np.sqrt(sq * qq)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)


def prefix_scores(rows: np.ndarray, queries: np.ndarray, d: int, metric: str) -> np.ndarray:
    """Exact (rows x queries) scores on the ``d``-prefix, in float64."""
    x = np.asarray(rows)[:, :d].astype(np.float64)
    q = np.atleast_2d(queries)[:, :d].astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)[:, None]
    qq = np.einsum("ij,ij->i", q, q)[None, :]
    return scores_from_sums(x @ q.T, sq, qq, metric)


def normalize_prefix(x: np.ndarray, d: int) -> np.ndarray:
    """The first ``d`` numbers of each row scaled to unit length (all-zero prefixes stay zero), float32. The
    norms are summed in float64, where no float32's square overflows or underflows (a query of tiny or huge
    values keeps its direction)."""
    p = np.asarray(x)[:, :d].astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", p, p, dtype=np.float64)).astype(np.float32)[:, None]
    return p / np.where(norms > 0, norms, np.float32(1.0))


def top(scores: np.ndarray, n: int, metric: str) -> np.ndarray:
    """Indices of the best ``n`` scores, best first (ties broken by position, for determinism)."""
    n = min(n, len(scores))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    key = -scores if higher_is_better(metric) else scores
    if n < len(key):
        cut = np.partition(key, n - 1)[n - 1]
        part = np.flatnonzero(key <= cut)  # every tie at the cut: the position tie-break decides among them
    else:
        part = np.arange(len(key))
    return part[np.lexsort((part, key[part]))][:n]
