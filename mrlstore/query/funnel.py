"""The funnel: runs a query plan over a snapshot of the committed rows.

A funnel is a list of prefix lengths ``dims``: the first stage finds ``sizes[0]`` candidates on the
``dims[0]``-prefix (HNSW when that prefix is indexed, else an exact scan); each later stage reads only its
new columns for the survivors, through the native kernels, and keeps the next size; the last keeps k with
exact scores on ``dims[-1]``. Candidates of a batch of queries travel as one flat row array with offsets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from mrlstore import kernels
from mrlstore.query.plan import Plan
from mrlstore.tiers.indexes import FittedCodes
from mrlstore.tiers.snapshot import Snapshot

# A where= filter matching at most this many rows (or this share of the store) is answered by an exact
# scan of those rows; larger ones use the HNSW index with over-fetching.
FILTER_EXACT_ROWS = 50_000
FILTER_EXACT_SHARE = 0.05


class PrefixSearch(Protocol):
    """An approximate index over one prefix: mrlstore.tiers.hnsw.PrefixIndex."""

    dim: int

    def search(self, queries: np.ndarray, k: int, ef: int, num_threads: int = 1) -> np.ndarray: ...


class Funnel:
    """Runs plans over snapshots of one store's vectors, prefix indexes and (when the store has a fit) the
    indexes over its fitted codes."""

    def __init__(
        self,
        vectors: kernels.Rows,
        indexes: Mapping[int, PrefixSearch],
        metric: str,
        ef_search: int,
        fitted: FittedCodes | None = None,
        dim: int = 0,
    ):
        """``dim``: the store's; ``dims=[dim]`` is exact search even where that length is indexed."""
        self.vectors, self.indexes, self.metric, self.ef_search = vectors, indexes, metric, ef_search
        self.fitted, self.dim = fitted, dim

    def with_fitted(self, fitted: FittedCodes | None) -> Funnel:
        """The same funnel over other fitted codes (``tune`` measures a fit before it keeps it)."""
        return Funnel(self.vectors, self.indexes, self.metric, self.ef_search, fitted, self.dim)

    def scans_filter(self, snap: Snapshot, allowed: np.ndarray, plan: Plan) -> bool:
        """Whether ``plan``'s first stage over the rows ``allowed`` is an exact scan (of the raw prefix)."""
        if self.uses_fit(plan):
            return _small_filter(snap, allowed)  # the fitted index exists
        return plan.dims[0] not in self.indexes or _small_filter(snap, allowed)

    def uses_fit(self, plan: Plan) -> bool:
        """Whether ``plan``'s first stage searches fitted codes."""
        return plan.fitted and self.fitted is not None and plan.dims[0] in self.fitted.by_dim

    def is_exact(self, dims: Sequence[int], fitted: bool) -> bool:
        """Whether a funnel of ``dims`` (``fitted``: on codes) is exact search: one stage, on the whole vector
        or on a raw prefix that no index searches."""
        return len(dims) == 1 and not fitted and (dims[0] not in self.indexes or dims[0] == self.dim)

    def run(
        self, snap: Snapshot, queries: np.ndarray, plan: Plan, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query the best ``plan.k`` rows with exact scores on ``plan.dims[-1]``, as (rows, offsets, scores)."""
        d0, fitted = plan.dims[0], self.uses_fit(plan)
        if self.is_exact(plan.dims, fitted):  # final scores
            return self.exact(snap, queries, d0, plan.k, allowed)
        first = plan.sizes[0] if plan.sizes else plan.k
        rows, offsets = self.first_stage(snap, queries, d0, first, allowed, plan.ef, fitted)
        if fitted and len(plan.dims) == 1:
            return self.code_scores(queries, rows, offsets, d0, plan.k)
        return self.refine(queries, rows, offsets, plan)

    def exact(
        self, snap: Snapshot, queries: np.ndarray, d: int, n: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact best ``n`` on the ``d``-prefix over ``rows`` (sorted; default every live row), best first."""
        if rows is None:
            found, scores, offsets = kernels.scan(
                self.vectors, queries, d, n, self.metric, stop=snap.watermark, live=snap.live
            )
        else:
            found, scores, offsets = kernels.scan(self.vectors, queries, d, n, self.metric, rows=rows)
        return found, offsets, scores

    def first_stage(
        self,
        snap: Snapshot,
        queries: np.ndarray,
        d: int,
        n: int,
        allowed: np.ndarray | None,
        ef: int | None,
        fitted: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per query up to ``n`` candidate rows on the ``d``-prefix (or the ``d``-number fitted codes), sorted
        within each query. Exact scans read the raw prefix."""
        index: PrefixSearch | None
        if fitted and self.fitted is not None:
            index, searched = self.fitted.by_dim[d], self.fitted.query_codes(queries, d)
        else:
            index, searched = self.indexes.get(d), queries
        beam = max(ef or self.ef_search, n)
        if allowed is not None and (index is None or _small_filter(snap, allowed)):
            rows, offsets, _ = self.exact(snap, queries, d, n, allowed)
            return _sorted_within(rows, offsets), offsets
        if allowed is not None and index is not None:
            return _flatten(self._filtered_search(snap, index, searched, queries, n, allowed, beam))
        if index is None:
            rows, offsets, _ = self.exact(snap, queries, d, n)
            return _sorted_within(rows, offsets), offsets
        labels = index.search(searched, n, beam, num_threads=-1 if len(queries) > 1 else 1)
        want = min(n, snap.n_live)
        if len(labels) == 1:  # one query, the usual call: fewer steps
            rows = snap.live_sorted(labels[0])
            if len(rows) >= want:
                return rows, np.array([0, len(rows)], dtype=np.int64)
        found = [snap.live_sorted(row) for row in labels]
        short = [i for i, rows in enumerate(found) if len(rows) < want]
        if short:  # HNSW came back with fewer than exist (tiny or heavily deleted stores): scan exactly
            rows, offsets, _ = self.exact(snap, queries[short], d, n)
            for j, i in enumerate(short):
                found[i] = np.sort(rows[offsets[j] : offsets[j + 1]])
        return _flatten(found)

    def _filtered_search(
        self,
        snap: Snapshot,
        index: PrefixSearch,
        searched: np.ndarray,
        queries: np.ndarray,
        n: int,
        allowed: np.ndarray,
        beam: int,
    ) -> list[np.ndarray]:
        """HNSW with over-fetching (``searched``: what the index holds of the ``queries``); queries it cannot
        satisfy fall back to an exact scan of ``allowed``."""
        want = min(n, len(allowed))
        fetch = min(snap.n_live, int(np.ceil(n * snap.n_live / len(allowed) * 1.5)) + 10)
        out: list[np.ndarray] = [np.empty(0, np.int64)] * len(queries)
        todo = np.arange(len(queries))
        while len(todo):
            labels = index.search(searched[todo], fetch, max(beam, fetch), num_threads=-1)
            retry = []
            for qi, row in zip(todo, labels):
                row = row[(row >= 0) & (row < snap.watermark)]
                pos = np.minimum(np.searchsorted(allowed, row), len(allowed) - 1)
                row = row[allowed[pos] == row]  # allowed is sorted: membership without a store-sized mask
                if len(row) >= want:
                    out[qi] = np.sort(row[:want])
                else:
                    retry.append(qi)
            todo = np.asarray(retry, dtype=np.int64)
            if len(todo) and fetch * 2 > snap.n_live // 2:
                rows, offsets, _ = self.exact(snap, queries[todo], index.dim, n, allowed)
                for j, qi in enumerate(todo):
                    out[qi] = np.sort(rows[offsets[j] : offsets[j + 1]])
                break
            fetch *= 2
        return out

    def code_scores(
        self, queries: np.ndarray, rows: np.ndarray, offsets: np.ndarray, d: int, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The best ``k`` of each query's candidates by their ``d``-number fitted codes (a one-stage fitted
        plan: its scores are the codes'), best first."""
        assert self.fitted is not None
        fit = self.fitted.projection
        codes = fit.codes(kernels.as_float32(self.vectors.gather(rows, 0, fit.basis.shape[0])), d).astype(np.float64)
        q = fit.query_codes(queries, d).astype(np.float64)
        owner = np.repeat(np.arange(len(queries)), np.diff(offsets))
        dot = np.einsum("ij,ij->i", codes, q[owner])
        sq = np.einsum("ij,ij->i", codes, codes)
        qq = np.einsum("ij,ij->i", q, q)
        pos, scores, out_offsets = kernels.select(rows, offsets, dot, sq, qq, fit.space, k, by_row=False)
        if fit.space == "ip":  # the part of the full inner product the codes leave out is the same for every row
            scores = scores + np.repeat(queries @ fit.mean, np.diff(out_offsets))
        return rows[pos].astype(np.int64), out_offsets, scores

    def refine(
        self, queries: np.ndarray, rows: np.ndarray, offsets: np.ndarray, plan: Plan
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Re-rank candidates (sorted within each query) through the later stages; best first at the end."""
        stages = plan.dims[1:] if len(plan.dims) > 1 else plan.dims[:1]
        keeps = (*plan.sizes[1:], plan.k) if len(plan.dims) > 1 else (plan.k,)
        return kernels.refine(self.vectors, rows, offsets, queries, stages, keeps, self.metric)


def _small_filter(snap: Snapshot, allowed: np.ndarray) -> bool:
    """Whether a where= filter matches few enough rows to scan them exactly rather than search HNSW."""
    return len(allowed) <= max(FILTER_EXACT_ROWS, FILTER_EXACT_SHARE * snap.n_live)


def _flatten(per_query: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if len(per_query) == 1:
        rows = np.ascontiguousarray(per_query[0], dtype=np.int64)
        return rows, np.array([0, len(rows)], dtype=np.int64)
    counts = [len(r) for r in per_query]
    rows = np.concatenate(per_query).astype(np.int64, copy=False) if per_query else np.empty(0, np.int64)
    return rows, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _sorted_within(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``rows`` sorted inside each query's segment."""
    segment = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return rows[np.lexsort((rows, segment))]
