"""The query path: classify the input once, plan, run the funnel over one snapshot, make the hits; and
``tune``, which measures the plans and persists the cheapest that reaches a recall target."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore._memory import release_freed_memory
from mrlstore.encoder.runner import EncoderSlot, encode_images
from mrlstore.errors import EmptyStoreError, InvalidInputError, ShapeError
from mrlstore.inputs.arrow import column, is_table, record_batches, to_matrix
from mrlstore.inputs.classify import Images, classify
from mrlstore.inputs.vectors import check_prefix, dims_tuple, query_batch
from mrlstore.query import tuning
from mrlstore.query.filters import FilterCache
from mrlstore.query.funnel import Funnel
from mrlstore.query.plan import Plan, PlanCache, for_filter_scan, for_rows, funnel_shapes
from mrlstore.query.report import dims_report
from mrlstore.results import Hits, HitsBatch, TuneResult
from mrlstore.tiers.indexes import FittedCodes, fitted_dims
from mrlstore.tiers.params import positive_int
from mrlstore.tiers.projection import FIT_MIN_ROWS, FIT_SAMPLE_ROWS, Projection, can_fit, fit_width
from mrlstore.tiers.snapshot import Snapshot
from mrlstore.tiers.state import StoreState

GROWTH_TOLD = 2  # queries warn once when the store holds this many times the live rows tune measured


def _outside_mrlstore() -> int:
    """The ``stacklevel`` of a warning raised by the caller of this function that names the first frame
    outside the package (query and query_table reach the warning through different depths)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class Searcher:
    """Queries and tuning over one open store. ``on_commit`` runs after ``tune`` persisted its choice."""

    def __init__(self, state: StoreState, encoders: EncoderSlot, filters: FilterCache, on_commit: Callable[[], None]):
        self.state, self.encoders, self.filters, self.on_commit = state, encoders, filters, on_commit
        self.plans = PlanCache()
        self._funnel: Funnel | None = None
        self._growth_told: tuple = ()  # the tune whose growth a warning named

    @property
    def funnel(self) -> Funnel:
        """The funnel over the store's current tiers (a new one after a compaction or a refresh swaps them)."""
        state, funnel = self.state, self._funnel
        indexes = state.indexes
        if (
            funnel is None
            or funnel.vectors is not state.vectors
            or funnel.indexes is not indexes.by_dim
            or funnel.fitted is not indexes.fitted
        ):
            p = state.params
            funnel = Funnel(state.vectors, indexes.by_dim, p.metric, p.ef_search, indexes.fitted, p.dim)
            self._funnel = funnel
        return funnel

    def plan(self, dims: Any, k: Any, shortlist: Any, ef: Any, prefixes: str | None = None) -> Plan:
        """The plan for these query arguments, resolved against the tuned settings."""
        p, fitted = self.state.params, self.uses_fit(prefixes)
        return self.plans.plan(self.state.manifest.get("tuned"), dims, k, shortlist, ef, p.index_dims, p.dim, fitted)

    def uses_fit(self, prefixes: str | None) -> bool:
        """Whether a query asking for ``prefixes`` shortlists on fitted codes."""
        has_fit = self.state.indexes.fitted is not None
        if prefixes is None:
            return has_fit
        if prefixes not in ("raw", "fitted"):
            raise InvalidInputError(f"prefixes must be 'raw', 'fitted' or None (the store's choice), got {prefixes!r}")
        if prefixes == "fitted" and not has_fit:
            raise InvalidInputError(
                f"store {self.state.location} has no fitted codes: tune() fits them (on stores of at least "
                f"{FIT_MIN_ROWS} rows not created with prefixes='raw', when they measure faster)"
            )
        return prefixes == "fitted"

    def query(
        self,
        query: Any,
        k: int,
        dims: Any,
        where: str | None,
        shortlist: Any,
        ef: int | None,
        metadata: bool,
        prefixes: str | None = None,
    ) -> Hits | HitsBatch:
        """``Store.query``: one query gives Hits, a batch a HitsBatch."""
        self.state.check_open()  # before anything is planned or encoded (checked again under the lock)
        plan = self.plan(dims, k, shortlist, ef, prefixes)
        fitted = self.funnel.uses_fit(plan)
        try:  # a first stage on fitted codes projects the whole query vector
            queries, single = self.vectors_of(query, self.state.params.dim if fitted else plan.dims[-1])
        except ShapeError:
            if not fitted or prefixes == "fitted":
                raise
            plan = self.plan(dims, k, shortlist, ef, "raw")  # a shorter query cannot be projected: raw prefixes
            queries, single = self.vectors_of(query, plan.dims[-1])
        if self.state.params.metric == "cosine" and not fitted:
            check_prefix(queries, plan.dims[0])
        state = self.state
        with state.reading():  # one point in time: the snapshot and catalog reads agree
            snap = state.snap
            if snap.n_live == 0:
                raise EmptyStoreError(f"store {state.location} holds no vectors to search")
            if plan.tuned_live and snap.n_live >= GROWTH_TOLD * plan.tuned_live:
                self._tell_growth(plan, snap.n_live)
            plan = for_rows(plan, snap.n_live)
            allowed = self.filters.allowed(state.catalog, where, snap) if where is not None else None
            if allowed is not None and self.funnel.scans_filter(snap, allowed, plan):
                if fitted:  # the matching rows are scanned exactly, on their raw prefix: the raw prefixes' settings
                    plan = for_rows(self.plan(dims, k, shortlist, ef, "raw"), snap.n_live)
                    queries = np.ascontiguousarray(queries[:, : plan.dims[-1]])
                if shortlist is None:
                    plan = for_filter_scan(plan, len(allowed))
            rows, offsets, scores = self.funnel.run(snap, queries, plan, allowed)
        if single:
            return Hits.of_rows(snap.table, rows, scores, plan.dims, metadata)
        return HitsBatch.of_rows(snap.table, rows, offsets, scores, plan.dims, metadata)

    def similar(
        self, ids: list[str], vectors: np.ndarray, k: int, dims: Any, where: str | None, shortlist: Any,
        ef: int | None, metadata: bool, prefixes: str | None,
    ) -> HitsBatch:  # fmt: skip
        """``Store.similar``: the stored ``vectors`` of entries ``ids`` as queries, each entry left out of its
        own hits."""
        self.plan(dims, k, shortlist, ef, prefixes)  # k and the rest checked as asked, before k + 1 is searched
        if shortlist is not None:  # one more candidate at each stage, for the entry itself
            shortlist = shortlist + 1 if isinstance(shortlist, int) else [int(s) + 1 for s in shortlist]
        found = self.query(vectors, k + 1, dims, where, shortlist, ef, metadata, prefixes)
        assert isinstance(found, HitsBatch)  # a 2-D array of queries
        return HitsBatch(hits.without(i, k) for hits, i in zip(found, ids))

    def _tell_growth(self, plan: Plan, live: int) -> None:
        """Warn once per tune (also across refreshes and compactions, which read the entry anew) that the
        store has outgrown the rows tune measured."""
        tuned = self.state.manifest.get("tuned") or {}
        key = tuple(tuned.get(f) for f in ("rows", "live", "generation", "seed", "ms_per_query", "fit_s"))
        if key == self._growth_told:
            return
        self._growth_told = key
        grown = (
            f"queries grow the tuned shortlist with them ({plan.sizes[0]} -> {for_rows(plan, live).sizes[0]}) to "
            "keep recall; "
            if plan.sizes
            else ""
        )
        warnings.warn(
            f"store {self.state.location} holds {live:,} live rows, {live / plan.tuned_live:.1f}x the "
            f"{plan.tuned_live:,} tune measured: {grown}tune() again to measure the cheapest funnel at this size",
            stacklevel=_outside_mrlstore(),
        )

    def query_table(self, queries: Any, k: int, dims: Any, vector: str, image: str | None, **options: Any) -> pa.Table:
        """``Store.query_table``: queries from a table's column (or vectors, images), hits as one table."""
        if is_table(queries):
            batches = list(record_batches(queries, 1 << 30))
            if not sum(b.num_rows for b in batches):
                raise ShapeError("query_table got a table with no rows: expected at least one query")
            table = pa.Table.from_batches(batches)
            source = column(table, image or vector, "image" if image else "vector")
            queries = source.to_pylist() if image else to_matrix(source)
        opts = {"where": None, "shortlist": None, "ef": None, "metadata": True, "prefixes": None, **options}
        results = self.query(queries, k, dims, **opts)
        return (results if isinstance(results, HitsBatch) else HitsBatch([results])).to_arrow()

    def vectors_of(self, query: Any, need: int) -> tuple[np.ndarray, bool]:
        """Query vectors (float32, ``need`` numbers each) from vectors or, through the encoder, images; and
        whether one query was given."""
        p, manifest = self.state.params, self.state.manifest
        if type(query) is np.ndarray and query.ndim == 1 and query.dtype == np.float32:
            return query_batch(query, need, p.dim, p.metric)  # the usual call, one vector: classify's first rule
        value = classify(query, p.dim, need, p.metric, images=lambda: self.encoders.available(manifest))
        if not isinstance(value, Images):
            return value.matrix, value.single
        vectors, _ = encode_images(self.encoders.get(manifest), value.items, 64, None)
        return query_batch(vectors, need, p.dim, p.metric)[0], value.single

    def report(self, k: int, sample: int, seed: int) -> pa.Table:
        """``Store.report``: the dims report over the current snapshot."""
        state, p = self.state, self.state.params
        k, sample, seed = positive_int(k, "k"), positive_int(sample, "sample"), _seed(seed)
        with state.writing():  # as tune: no close, compaction or refresh closes the files it scans meanwhile
            p = state.params  # as of now (see tune)
            snap = state.snap
            if snap.n_live <= k + 1:
                raise EmptyStoreError(f"a report needs more than k+1={k + 1} vectors, the store holds {snap.n_live}")
            read = lambda rows: state.vectors.gather(rows, 0, p.dim)  # noqa: E731 - the sampled rows' vectors
            tuned, generation = state.manifest.get("tuned"), state.generation
            return dims_report(self.funnel, snap, p, tuned, k, sample, seed, read, generation)

    def tune(
        self, recall: float, k: int, sample: int, dims: Sequence[int] | None, seed: int, queries: Any
    ) -> TuneResult:
        """``Store.tune``: measure, persist the choice, forget the old plans."""
        state, p = self.state, self.state.params
        held_out = self.vectors_of(queries, p.dim)[0] if queries is not None else None
        k = positive_int(k, "k")
        if isinstance(recall, bool) or not isinstance(recall, (int, float, np.number)) or not 0 < recall <= 1:
            raise InvalidInputError(f"recall must be a number in (0, 1], got {recall!r}")
        recall = float(recall)  # a numpy scalar would not persist as JSON
        sample, seed = positive_int(sample, "sample"), _seed(seed)
        asked = dims_tuple(dims, p.dim) if dims is not None else None
        with state.writing():
            p = state.params  # as of now: set_index_dims in another thread may have changed the indexed prefixes
            shapes = [asked] if asked is not None else funnel_shapes(p.index_dims, p.bands, p.dim)
            snap = state.snap
            if snap.n_live <= k + 1:
                raise EmptyStoreError(f"tuning needs more than k+1={k + 1} vectors, the store holds {snap.n_live}")
            read = lambda rows: state.vectors.gather(rows, 0, p.dim)  # noqa: E731 - the sampled rows' vectors
            with self._raw_while_measuring(snap):
                raw = self.funnel.with_fitted(None)
                probe = tuning.Probe.sample(raw, snap, k, sample, seed, p.dim, read, held_out)
                if state.vectors.prefault_rows < snap.watermark:
                    # Its exact search read rows the store leaves to disk, and the page cache made room for them
                    # with the rows held in memory (at 12M rows two thirds of them: cold queries then faulted
                    # 444 pages against 77): read those back before measuring, and for the queries after
                    state.vectors.prefault(0, snap.watermark)
                t0 = time.perf_counter()
                projection = self._fit(snap, read, shapes, probe.rows)
                # codes get indexes only at lengths where they beat the raw prefixes on the sample (as costly)
                candidate = (
                    None
                    if projection is None or not projection.beats_raw
                    else state.indexes.build_fitted(projection, snap, state.vectors)
                )
                fit_s = time.perf_counter() - t0
                fitted = None if candidate is None else raw.with_fitted(candidate)
                task = tuning.Task(snap, shapes, recall, k, probe, p.dim, p.index_dims)
                choice = tuning.tune_prefixes(raw, fitted, task)
                longest = max((setting["shortlist"] for setting in choice["shapes"].values()), default=k)
                growth = tuning.growth_exponents(raw, task, longest, seed)
            choice |= {"generation": state.generation, "held_out": held_out is not None, "seed": seed,
                       "sample_asked": sample, "all_shapes": dims is None,
                       "fit_s": None if projection is None else fit_s, "growth": growth}  # fmt: skip
            if choice.get("raw_settings"):
                choice["raw_settings"]["growth"] = growth
            self._keep(choice, candidate if choice["prefixes"] == "fitted" else None)
        del candidate, fitted, projection
        release_freed_memory()  # a code index not kept (at 1M rows: 80 MB of small blocks) leaves the heap
        return TuneResult(**choice)

    @contextmanager
    def _raw_while_measuring(self, snap: Snapshot) -> Iterator[None]:
        """The raw indexes a fit replaced, loaded for tune to measure raw prefixes again; if tune fails, the
        fit in use takes their place again (as a reopen would have it)."""
        state = self.state
        state.indexes.ensure_raw(snap, state.vectors, state.catalog.tombstones())
        try:
            yield
        except BaseException:
            if state.indexes.fitted is not None:
                with state.visibility.write():
                    state.indexes.install_fitted(state.indexes.fitted)
                state.indexes.save_fitted()
            raise

    def _fit(
        self,
        snap: Snapshot,
        read: Callable[[np.ndarray], np.ndarray],
        shapes: list[tuple[int, ...]],
        probe_rows: np.ndarray,
    ) -> Projection | None:
        """Codes fitted to a sample of the live rows (None: the store keeps raw prefixes: created so, too
        small, or no funnel shape starts at an indexed prefix below the full dimension). Where the store has
        rows to spare, the sample leaves out ``probe_rows`` (tune's sampled queries): codes trained on a query
        rank its neighbours better than a new query's, and tune would promise new queries too much."""
        state, p = self.state, self.state.params
        width = fit_width(p.index_dims, p.dim)
        if p.prefixes == "raw" or not can_fit(snap.n_live, width) or not getattr(state.vectors, "native", True):
            return None
        if not any(shape[0] in fitted_dims(p) for shape in shapes):
            return None
        live = np.flatnonzero(snap.live[: snap.watermark])
        rows = fit_sample(live, probe_rows)
        return Projection.fit(read(rows), width, p.metric, judge_at=fitted_dims(p), store_rows=len(live))

    def _keep(self, choice: dict[str, Any], fitted: FittedCodes | None) -> None:
        """Commit ``choice`` and its fit (None: none) in one transaction, then use them."""
        state = self.state
        fit = None if fitted is None else fitted.projection.to_manifest()
        state.catalog.set_manifest_entries({"tuned": choice, "fit": fit})
        manifest = {key: value for key, value in state.manifest.items() if key != "fit"}
        with state.visibility.write():
            state.indexes.install_fitted(fitted)
            # a new tuned entry: the plan cache empties
            state.manifest = {**manifest, "tuned": choice, **({"fit": fit} if fit is not None else {})}
        state.indexes.save_fitted()
        self.on_commit()


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)  # a numpy integer would not persist as JSON


def fit_sample(live: np.ndarray, probe_rows: np.ndarray) -> np.ndarray:
    """The sorted rows a fit learns from: FIT_SAMPLE_ROWS of the ``live`` rows, none of ``probe_rows`` where
    enough others are live (a smaller store's fit takes all its rows, probes included)."""
    unprobed = np.setdiff1d(live, probe_rows)
    pool = unprobed if len(unprobed) >= FIT_SAMPLE_ROWS else live
    return np.sort(np.random.default_rng(0).choice(pool, size=min(FIT_SAMPLE_ROWS, len(pool)), replace=False))
