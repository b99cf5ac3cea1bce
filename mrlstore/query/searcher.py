"""The query path: classify the input once, plan, run the funnel over one snapshot, make the hits; and
``tune``, which measures the plans and persists the cheapest that reaches a recall target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore.encoder.runner import EncoderSlot, encode_images
from mrlstore.errors import EmptyStoreError, InvalidInputError
from mrlstore.inputs.arrow import column, is_table, record_batches, to_matrix
from mrlstore.inputs.classify import Images, classify
from mrlstore.inputs.vectors import dims_tuple, query_batch
from mrlstore.query import tuning
from mrlstore.query.filters import FilterCache
from mrlstore.query.funnel import Funnel
from mrlstore.query.plan import Plan, PlanCache, funnel_shapes
from mrlstore.query.report import dims_report
from mrlstore.results import Hits, HitsBatch, TuneResult
from mrlstore.tiers.params import positive_int
from mrlstore.tiers.state import StoreState


class Searcher:
    """Queries and tuning over one open store. ``on_commit`` runs after ``tune`` persisted its choice."""

    def __init__(self, state: StoreState, encoders: EncoderSlot, filters: FilterCache, on_commit: Callable[[], None]):
        self.state, self.encoders, self.filters, self.on_commit = state, encoders, filters, on_commit
        self.plans = PlanCache()
        self._funnel: Funnel | None = None

    @property
    def funnel(self) -> Funnel:
        """The funnel over the store's current tiers (a new one after a compaction or a refresh swaps them)."""
        state, funnel = self.state, self._funnel
        if funnel is None or funnel.vectors is not state.vectors or funnel.indexes is not state.indexes.by_dim:
            funnel = Funnel(state.vectors, state.indexes.by_dim, state.params.metric, state.params.ef_search)
            self._funnel = funnel
        return funnel

    def plan(self, dims: Any, k: Any, shortlist: Any, ef: Any) -> Plan:
        """The plan for these query arguments, resolved against the tuned settings."""
        p = self.state.params
        return self.plans.plan(self.state.manifest.get("tuned"), dims, k, shortlist, ef, p.index_dims, p.dim)

    def query(
        self, query: Any, k: int, dims: Any, where: str | None, shortlist: Any, ef: int | None, metadata: bool
    ) -> Hits | HitsBatch:
        """``Store.query``: one query gives Hits, a batch a HitsBatch."""
        self.state.check_open()  # before anything is planned or encoded (checked again under the lock)
        plan = self.plan(dims, k, shortlist, ef)
        queries, single = self.vectors_of(query, plan.dims[-1])
        state = self.state
        with state.visibility.read():  # one point in time: the snapshot and catalog reads agree
            state.check_open()
            snap = state.snap
            if snap.n_live == 0:
                raise EmptyStoreError(f"store {state.location} holds no vectors to search")
            allowed = self.filters.allowed(state.catalog, where, snap) if where is not None else None
            rows, offsets, scores = self.funnel.run(snap, queries, plan, allowed)
        hits = HitsBatch.of_rows(snap.table, rows, offsets, scores, plan.dims, metadata)
        return hits[0] if single else hits

    def query_table(self, queries: Any, k: int, dims: Any, vector: str, image: str | None, **options: Any) -> pa.Table:
        """``Store.query_table``: queries from a table's column (or vectors, images), hits as one table."""
        if is_table(queries):
            table = pa.Table.from_batches(list(record_batches(queries, 1 << 30)))
            source = column(table, image or vector, "image" if image else "vector")
            queries = source.to_pylist() if image else to_matrix(source)
        opts = {"where": None, "shortlist": None, "ef": None, "metadata": True, **options}
        results = self.query(queries, k, dims, **opts)
        return (results if isinstance(results, HitsBatch) else HitsBatch([results])).to_arrow()

    def vectors_of(self, query: Any, need: int) -> tuple[np.ndarray, bool]:
        """Query vectors (float32, ``need`` numbers each) from vectors or, through the encoder, images; and
        whether one query was given."""
        p, manifest = self.state.params, self.state.manifest
        value = classify(query, p.dim, need, p.metric, images=lambda: self.encoders.available(manifest))
        if not isinstance(value, Images):
            return value.matrix, value.single
        vectors, _ = encode_images(self.encoders.get(manifest), value.items, 64, None)
        return query_batch(vectors, need, p.dim, p.metric)[0], value.single

    def report(self, k: int, sample: int, seed: int) -> pa.Table:
        """``Store.report``: the dims report over the current snapshot."""
        state, p = self.state, self.state.params
        k, sample = positive_int(k, "k"), positive_int(sample, "sample")
        snap = state.snap
        if snap.n_live <= k + 1:
            raise EmptyStoreError(f"a report needs more than k+1={k + 1} vectors, the store holds {snap.n_live}")
        read = lambda rows: state.vectors.gather(rows, 0, p.dim)  # noqa: E731 - the sampled rows' vectors
        return dims_report(self.funnel, snap, p, state.manifest.get("tuned"), k, sample, seed, read, state.generation)

    def tune(
        self, recall: float, k: int, sample: int, dims: Sequence[int] | None, seed: int, queries: Any
    ) -> TuneResult:
        """``Store.tune``: measure, persist the choice, forget the old plans."""
        state, p = self.state, self.state.params
        held_out = self.vectors_of(queries, p.dim)[0] if queries is not None else None
        k = positive_int(k, "k")
        if not 0 < recall <= 1:
            raise InvalidInputError(f"recall must be in (0, 1], got {recall}")
        recall = float(recall)  # a numpy scalar would not persist as JSON
        sample = positive_int(sample, "sample")
        shapes = [dims_tuple(dims, p.dim)] if dims is not None else funnel_shapes(p.index_dims, p.bands, p.dim)
        with state.write_lock:
            snap = state.snap
            if snap.n_live <= k + 1:
                raise EmptyStoreError(f"tuning needs more than k+1={k + 1} vectors, the store holds {snap.n_live}")
            choice = tuning.tune(
                self.funnel, snap, shapes, recall, k, sample, seed, p.dim,
                lambda rows: state.vectors.gather(rows, 0, p.dim), held_out,
            )  # fmt: skip
            choice |= {"generation": state.generation, "held_out": held_out is not None, "seed": seed,
                       "sample_asked": sample, "all_shapes": dims is None}  # fmt: skip
            state.catalog.set_manifest("tuned", choice)
            state.manifest = {**state.manifest, "tuned": choice}  # a new tuned entry: the plan cache empties
            self.on_commit()
        return TuneResult(**choice)
