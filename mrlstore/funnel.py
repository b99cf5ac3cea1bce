"""Exact prefix scoring for the funnel's stages (pure numpy, no engines).

Scores are accumulated band by band, so moving from a d-prefix to a longer one only reads and multiplies
the new columns. Cosine re-normalises every prefix (as MRL requires): it divides by the norms of the same
prefix of the query and of the row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("cosine", "ip", "l2")


def higher_is_better(metric: str) -> bool:
    return metric != "l2"


def default_shortlists(k: int, stages: int) -> list[int]:
    """Survivors after each stage but the last: the paper's 200 for k=10 at the first, halving after."""
    first = max(200, 20 * k)
    return [max(k, first >> i) for i in range(stages - 1)]


def shortlist_sizes(shortlist: int | Sequence[int] | None, k: int, stages: int) -> list[int]:
    if shortlist is None:
        return default_shortlists(k, stages)
    if isinstance(shortlist, (int, np.integer)) and not isinstance(shortlist, bool):
        if shortlist < k:
            raise ValueError(f"shortlist must be at least k={k}, got {shortlist}")
        return [max(k, int(shortlist) >> i) for i in range(stages - 1)]
    sizes = [int(s) for s in shortlist]
    if len(sizes) != stages - 1:
        raise ValueError(f"shortlist needs {stages - 1} sizes (one per stage but the last), got {len(sizes)}")
    return sizes


def top(scores: np.ndarray, n: int, metric: str) -> np.ndarray:
    """Indices of the best ``n`` scores, best first (ties broken by position, for determinism)."""
    n = min(n, len(scores))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    key = -scores if higher_is_better(metric) else scores
    if n < len(key):
        part = np.argpartition(key, n - 1)[:n]
    else:
        part = np.arange(len(key))
    return part[np.lexsort((part, key[part]))]


class PrefixScorer:
    """Running per-candidate sums for one query, extended to longer prefixes as stages need them."""

    def __init__(self, query: np.ndarray, rows: np.ndarray, metric: str):
        self.q = query.astype(np.float32, copy=False)
        self.rows = rows
        self.metric = metric
        self.covered = 0
        n = len(rows)
        self.qq = 0.0
        self.dot = np.zeros(n, dtype=np.float64)
        self.xx = np.zeros(n, dtype=np.float64)  # cosine: row norms; l2: squared distances

    def extend(self, block: np.ndarray, stop: int) -> None:
        """Add columns ``covered:stop`` of the candidates (``block`` holds exactly those columns)."""
        qb = self.q[self.covered : stop]
        if self.metric == "l2":
            diff = block - qb
            self.xx += np.einsum("ij,ij->i", diff, diff)
        else:
            # einsum, not BLAS: OpenBLAS threads a matrix-vector product past ~400 rows, which stalls for
            # milliseconds when the cores are busy (concurrent queries, the batch re-rank pool).
            self.dot += np.einsum("ij,j->i", block, qb)
            if self.metric == "cosine":
                self.xx += np.einsum("ij,ij->i", block, block)
                self.qq += float(qb @ qb)
        self.covered = stop

    def scores(self) -> np.ndarray:
        if self.metric == "l2":
            return np.sqrt(self.xx)
        if self.metric == "ip":
            return self.dot.copy()
        denom = np.sqrt(self.xx * self.qq)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(denom > 0, self.dot / denom, 0.0)
        return s

    def keep(self, idx: np.ndarray) -> None:
        self.rows, self.dot, self.xx = self.rows[idx], self.dot[idx], self.xx[idx]


def block_scores(block: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """(rows x queries) scores of a block of rows against queries on the same prefix, for exact scans."""
    s = block @ queries.T
    if metric == "cosine":
        rn = np.sqrt(np.einsum("ij,ij->i", block, block))
        qn = np.sqrt(np.einsum("ij,ij->i", queries, queries))
        denom = rn[:, None] * qn[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(denom > 0, s / denom, 0.0)  # a zero prefix (row or query) scores 0, not NaN
    elif metric == "l2":
        s = np.einsum("ij,ij->i", block, block)[:, None] - 2 * s + np.einsum("ij,ij->i", queries, queries)[None, :]
    return s


class RunningTop:
    """Best ``n`` (row, score) per query across blocks of an exact scan."""

    def __init__(self, n_queries: int, n: int, metric: str):
        self.n, self.metric = n, metric
        self.rows = [np.empty(0, dtype=np.int64) for _ in range(n_queries)]
        self.scores = [np.empty(0, dtype=np.float64) for _ in range(n_queries)]

    def update(self, block_rows: np.ndarray, block_scores: np.ndarray) -> None:
        for j in range(block_scores.shape[1]):
            rows = np.concatenate([self.rows[j], block_rows])
            scores = np.concatenate([self.scores[j], block_scores[:, j]])
            keep = top(scores, self.n, self.metric)
            self.rows[j], self.scores[j] = rows[keep], scores[keep]
