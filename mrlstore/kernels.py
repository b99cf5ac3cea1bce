"""The query path's arithmetic: native kernels (``mrlstore/_kernels.c``) when built, numpy twins otherwise.

Both return the same rows in the same order (scores agree to float rounding): a funnel stage adds the dot
products and squared norms of the columns it reads to running float64 sums, scores come from those sums,
and selection keeps the best n per query with ties broken by the lower row. ``refine`` runs every later
stage of a funnel in one native call; ``scan`` is the exact search.

    cosine = dot / sqrt(sq * qq)  (0 when a prefix is all zeros)    ip = dot    l2 = sqrt(max(sq - 2 dot + qq, 0))

Candidates of a batch of queries travel as one flat array of row numbers (sorted within each query) and
``offsets`` (query i owns ``rows[offsets[i]:offsets[i + 1]]``), so a stage is one native call for the batch.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from mrlstore.scoring import scores_from_sums, top

_native: Any  # the native module, or None
try:
    from mrlstore import _kernels as _native
except ImportError:  # built without a C compiler: the numpy twins are correct, only slower
    _native = None

NATIVE = _native is not None
NATIVE_F16C = bool(_native.HAVE_F16C) if _native is not None else False
METRIC_CODES = {"cosine": 0, "ip": 1, "l2": 2}
SCAN_BLOCK_ROWS = 16384  # numpy twin: rows widened per block (bounded memory)
_MIN_NATIVE_WIDEN = 64  # below this the call overhead beats the conversion


_CORES = os.cpu_count() or 1  # os.cpu_count() costs tens of microseconds a call


def threads() -> int:
    return _CORES


class Rows(Protocol):
    """What the kernels read: mrlstore.tiers.bands.BandedVectors (rows without memory maps, such as
    mrlstore.tiers.objectstore.RemoteBands, say ``native = False`` and go through the numpy twins, except
    for the stages within their ``native_dims``, whose bands ``kernel_bands`` describes)."""

    band_bounds: tuple[int, ...]  # band b spans columns band_bounds[b]:band_bounds[b + 1]

    def kernel_bands(self, rows_needed: int) -> list[tuple]: ...

    def kernel_norms(self, rows_needed: int) -> tuple | None: ...

    def gather_bands(self, rows: np.ndarray, col_start: int, col_stop: int) -> list[tuple[int, np.ndarray]]: ...

    def read_range(self, row_start: int, row_stop: int, col_start: int, col_stop: int) -> np.ndarray: ...

    def gather(self, rows: np.ndarray, col_start: int, col_stop: int) -> np.ndarray: ...


def as_float32(block: np.ndarray) -> np.ndarray:
    """``block`` as float32 (no copy when it already is); float16 widens with F16C when built."""
    if block.dtype == np.float32:
        return block
    if block.dtype == np.float16 and _native is not None and block.size >= _MIN_NATIVE_WIDEN:
        src = np.ascontiguousarray(block)
        out = np.empty(block.shape, dtype=np.float32)
        _native.f16_to_f32(src, out)
        return out
    return block.astype(np.float32)


def sum_squares(x: np.ndarray) -> float:
    """The sum of squares of a 1-D float32 array, accumulated in float64: finite exactly when every value is,
    positive exactly when one is non-zero (no float32 squared overflows or underflows a float64)."""
    if _native is not None and x.dtype == np.float32 and x.flags.c_contiguous:
        return float(_native.sum_squares(x))
    wide = x.astype(np.float64)
    return float(np.dot(wide, wide))


def project(x: np.ndarray, rows: np.ndarray, shift: np.ndarray, scale: float) -> np.ndarray:
    """``rows @ (scale * x) - shift`` as float32: one query's codes (``rows``: a (k, n) float32 matrix, ``x``: n
    float32, ``shift``: k float32; the last two C-contiguous). ``x`` is scaled in float64 first: a cosine
    query's scale can be past float32's range."""
    if _native is not None and x.flags.c_contiguous and x.dtype == rows.dtype == shift.dtype == np.float32:
        out = np.empty(len(rows), np.float32)
        _native.project(x, rows, shift, scale, out)
        return out
    return (rows @ (x.astype(np.float64) * scale).astype(np.float32) - shift).astype(np.float32, copy=False)


def _best(scores: np.ndarray, rows: np.ndarray, n: int, metric: str) -> np.ndarray:
    """Positions of the best ``n`` (score, row) pairs, best first, ties by the lower row."""
    order = np.argsort(rows, kind="stable")
    return order[top(scores[order], n, metric)]


def query_norms(queries: np.ndarray, d: int) -> np.ndarray:
    q = queries[:, :d].astype(np.float64)
    return np.einsum("ij,ij->i", q, q)


# Threads that page a single query's cold candidate rows in together before a stage reads them, in stores
# whose rows were not all read at open (past a quarter of RAM: the narrowest bands are read whole, the widest
# are not). The kernel asks mincore about two of a stage's rows first: rows in memory cost two system calls.
# 0 turns it off.
COLD_READ_THREADS = 16


def refine(
    vectors: Rows,
    rows: np.ndarray,
    offsets: np.ndarray,
    queries: np.ndarray,
    stages: tuple[int, ...],
    keeps: tuple[int, ...],
    metric: str,
    native: bool = NATIVE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates (sorted within each query) through the funnel's later stages: at stage s, add the dot
    products and squared norms of columns ``stages[s-1]:stages[s]`` and keep the best ``keeps[s]`` per query
    (in row order between stages, so reads run forward). Returns the last stage's (rows, offsets, scores),
    best first within each query. A tier without memory maps for every band (``native`` False: a remote
    store) runs the stages within its ``native_dims`` natively and the rest through the numpy twins."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if native and _native is not None:
        if getattr(vectors, "native", True):
            return _refine_native(vectors, rows, offsets, queries, stages, keeps, metric, bounded=True)
        near = sum(1 for d in stages[:-1] if d <= getattr(vectors, "native_dims", 0))
        if near:
            rows, offsets, _ = _refine_native(vectors, rows, offsets, queries, stages[:near], keeps[:near], metric)
            rows = rows[np.lexsort((rows, np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))))]  # row order
            stages, keeps = stages[near:], keeps[near:]  # their sums start again from column 0, for fewer rows
    dot, sq = np.zeros(len(rows)), np.zeros(len(rows))
    covered, scores = 0, np.empty(0)
    for i, (d, keep) in enumerate(zip(stages, keeps)):
        _accumulate(vectors, rows, offsets, queries, covered, d, dot, sq)
        covered = d
        qq = query_norms(queries, d)
        pos, scores, offsets = select(rows, offsets, dot, sq, qq, metric, keep, by_row=i < len(stages) - 1)
        rows, dot, sq = rows[pos], dot[pos], sq[pos]
    return rows, offsets, scores


def _refine_native(vectors, rows, offsets, queries, stages, keeps, metric, bounded=False):
    """``refine`` in one native call; ``bounded``: a long last stage may skip rows by their band norms."""
    nq, k = len(offsets) - 1, keeps[-1]
    out_rows = np.empty(nq * k, dtype=np.int64)
    out_scores = np.empty(nq * k, dtype=np.float64)
    counts = np.empty(nq, dtype=np.int64)
    if not len(rows):
        needed = 1
    else:  # rows are sorted within each query: one query's last is its largest
        needed = int(rows[-1] if nq == 1 else rows.max()) + 1
    bands = vectors.kernel_bands(needed)
    # The kernel bounds only long last stages: with none possible, skip the norms' setup.
    least = _native.BOUND_MIN_PER_KEPT * keeps[-1]
    long_last = bounded and len(rows) >= least * nq and (len(stages) == 1 or keeps[-2] >= least)
    norms = vectors.kernel_norms(needed) if long_last else None
    bounds = _int32(vectors.band_bounds) if norms is not None else _NO_BOUNDS
    _native.refine(
        bands, rows, offsets, queries, queries.shape[1], _int32(tuple(stages)), _int32(tuple(keeps)),
        METRIC_CODES[metric], out_rows, out_scores, counts, threads(), None if norms is None else [norms], bounds,
        COLD_READ_THREADS if needed > getattr(vectors, "prefault_rows", 0) else 0,  # read at open: in memory
    )  # fmt: skip
    out_rows, out_scores, offsets = _compact(counts, k, out_rows, out_scores)
    return out_rows, offsets, out_scores


_NO_BOUNDS = np.zeros(1, np.int32)


@lru_cache(maxsize=256)
def _int32(values: tuple[int, ...]) -> np.ndarray:
    """A plan's stage dims or keeps as the kernel's int32 array (made once per plan, read-only)."""
    out = np.asarray(values, np.int32)
    out.flags.writeable = False
    return out


def _accumulate(vectors, rows, offsets, queries, col_from, col_to, dot, sq) -> None:
    shared = None
    if not getattr(vectors, "native", True) and len(offsets) > 2 and len(rows):
        # Rows read over the network: one fetch for the whole batch (its requests run concurrently)
        unique, inverse = np.unique(rows, return_inverse=True)
        shared = (vectors.gather_bands(unique, col_from, col_to), inverse)
    for i in range(len(offsets) - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if a == b:
            continue
        lo = col_from
        if shared is None:
            blocks = vectors.gather_bands(rows[a:b], col_from, col_to)
        else:
            blocks = [(stop, block[shared[1][a:b]]) for stop, block in shared[0]]
        for stop, block in blocks:
            x = as_float32(block)
            dot[a:b] += np.einsum("ij,j->i", x, queries[i, lo:stop])
            sq[a:b] += np.einsum("ij,ij->i", x, x)
            lo = stop


def select(rows, offsets, dot, sq, qq, metric, keep, by_row):
    """The best ``keep`` per query: (positions into rows/dot/sq, their scores, new offsets); best first, or
    in row order when ``by_row``."""
    out_pos, out_scores, counts = [], [], []
    for i in range(len(offsets) - 1):
        a, b = int(offsets[i]), int(offsets[i + 1])
        s = scores_from_sums(dot[a:b], sq[a:b], qq[i], metric)
        best = top(s, keep, metric)  # rows are sorted: position ties are row ties
        if by_row:
            best = np.sort(best)
        out_pos.append(best + a)
        out_scores.append(s[best])
        counts.append(len(best))
    return (
        np.concatenate(out_pos) if out_pos else np.empty(0, np.int64),
        np.concatenate(out_scores) if out_scores else np.empty(0),
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


def scan(
    vectors: Rows,
    queries: np.ndarray,
    d: int,
    n: int,
    metric: str,
    *,
    rows: np.ndarray | None = None,
    stop: int = 0,
    live: np.ndarray | None = None,
    native: bool = NATIVE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact best ``n`` on the ``d``-prefix per query over ``rows`` (sorted), or over rows ``0..stop`` where
    ``live`` is True. Returns (rows, scores, offsets), best first within each query."""
    nq = len(queries)
    qq = query_norms(queries, d)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if rows is not None:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
    if native and _native is not None and getattr(vectors, "native", True):
        last = int(rows[-1]) + 1 if rows is not None and len(rows) else stop
        bands = vectors.kernel_bands(last)
        norms = vectors.kernel_norms(last)
        out_rows = np.empty(nq * n, dtype=np.int64)
        out_scores = np.empty(nq * n, dtype=np.float64)
        counts = np.empty(nq, dtype=np.int64)
        live_arg = None if live is None else live[:stop]
        _native.scan(
            bands, rows, 0, stop, live_arg, queries, queries.shape[1], d, qq, METRIC_CODES[metric], n,
            out_rows, out_scores, counts, threads(), None if norms is None else [norms],
        )  # fmt: skip
        return _compact(counts, n, out_rows, out_scores)
    return _scan_numpy(vectors, queries, d, n, metric, qq, rows, stop, live)


def _compact(
    counts: np.ndarray, stride: int, first: np.ndarray, second: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernels write query i's ``counts[i]`` results at ``i * stride``: close the gaps (when some
    query had fewer) and return both arrays with the offsets."""
    if len(counts) == 1:  # one query: no gaps to close
        n = int(counts[0])
        return first[:n], second[:n], np.array([0, n], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if offsets[-1] != len(counts) * stride:
        take = np.concatenate([np.arange(i * stride, i * stride + c) for i, c in enumerate(counts)])
        first, second = first[take], second[take]
    return first, second, offsets


def _scan_numpy(vectors, queries, d, n, metric, qq, rows, stop, live):
    nq = len(queries)
    q = np.ascontiguousarray(queries[:, :d], dtype=np.float32)
    best_rows = [np.empty(0, np.int64) for _ in range(nq)]
    best_scores = [np.empty(0, np.float64) for _ in range(nq)]
    total = len(rows) if rows is not None else stop
    for lo in range(0, total, SCAN_BLOCK_ROWS):
        hi = min(lo + SCAN_BLOCK_ROWS, total)
        if rows is not None:
            block_rows = rows[lo:hi]
            x = vectors.gather(block_rows, 0, d)
        else:
            keep = np.flatnonzero(live[lo:hi]) if live is not None else np.arange(hi - lo)
            block_rows = keep + lo
            x = vectors.read_range(lo, hi, 0, d)[keep]
        dot = (x @ q.T).astype(np.float64)
        sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
        for j in range(nq):
            s = np.concatenate([best_scores[j], scores_from_sums(dot[:, j], sq, qq[j], metric)])
            r = np.concatenate([best_rows[j], block_rows])
            keep_pos = _best(s, r, n, metric)
            best_rows[j], best_scores[j] = r[keep_pos], s[keep_pos]
    counts = [len(r) for r in best_rows]
    return np.concatenate(best_rows), np.concatenate(best_scores), np.concatenate([[0], np.cumsum(counts)])
