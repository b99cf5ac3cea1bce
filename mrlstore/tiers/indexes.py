"""The prefix indexes as a rebuildable cache of the committed rows: loading and checking the saved files,
extending them from the bands, saving them atomically now and then. DuckDB stays the commit point; an index
file that is missing, stale or damaged is rebuilt from the vectors."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, ItemsView, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrlstore.errors import StoreClosedError
from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.hnsw import IndexNotSaved, IndexUnusable, PrefixIndex
from mrlstore.tiers.layout import INDEX_DIR
from mrlstore.tiers.params import StoreParams
from mrlstore.tiers.projection import Projection
from mrlstore.tiers.snapshot import Snapshot

REBUILD_BLOCK_ROWS = 65536
FIT_BLOCK_ROWS = 8192  # full rows read and projected at a time (2048-d: 64 MB as float32)
# Save the HNSW cache once this many rows, or a quarter of the index, were added since the last save: bounds
# the rebuild work after a crash to a share of the store, while the saves of a growing store stay linear in
# its size (a save every 100k rows rewrote a 1M-row index ten times during its build).
INDEX_AUTOSAVE_ROWS = 100_000
RAW, FITTED = "prefix", "fitted"  # the index families, as their files are named


def stored_prefix(vectors: np.ndarray, d: int, dtype: str) -> np.ndarray:
    """The first ``d`` numbers exactly as stored (rounded to ``dtype``), as float32."""
    return vectors[:, :d].astype(dtype).astype(np.float32)


@dataclass
class FittedCodes:
    """A fitted projection and the HNSW indexes over its codes, by code length: what a funnel's fitted first
    stage searches."""

    projection: Projection
    by_dim: dict[int, PrefixIndex]

    def query_codes(self, queries: np.ndarray, d: int) -> np.ndarray:
        return self.projection.query_codes(queries, d)


class IndexSet:
    """One store's prefix indexes, ``by_dim`` (the mapping the funnel searches: refilled in place, never
    replaced), and ``fitted``, the indexes over fitted codes when the store has a fit; with what each needs
    saved. ``status`` tells how each raw index was opened: loaded, extended (a saved file behind the commits)
    or rebuilt. A reader loads the index a default query searches first at open and defers the others to
    their first use (their files checked, and downloaded for a store on object storage, then)."""

    def __init__(
        self,
        path: Path,
        params: StoreParams,
        generation: int,
        read_only: bool,
        checked: Mapping[str, str] = {},
        fetch: Callable[[str], str | None] | None = None,
    ):
        """``checked``: digests of files (by path under ``path``) checked since they were written, such as the
        parts a reader just downloaded: their sidecar checksums are not computed again. ``fetch``: makes a
        file (by path under ``path``) local, returning its checked digest (a reader of object storage)."""
        self.path, self.params, self.generation, self.read_only = path, params, generation, read_only
        self.checked, self.fetch = checked, fetch
        self.first_stage: tuple[str, int] | None = None  # loaded at a reader's open; None: every index
        self._latest: tuple[Snapshot, VectorTier] | None = None  # the newest rows a deferred index could need
        self.by_dim: dict[int, PrefixIndex] = {}
        self.fitted: FittedCodes | None = None
        self._retired: list[tuple[int, PrefixIndex]] = []  # raw indexes a fit replaced, to save once
        self._unsaved: dict[tuple[str, int], int] = {}
        self.status: dict[int, str] = {}

    def __getitem__(self, d: int) -> PrefixIndex:
        return self.by_dim[d]

    def items(self) -> ItemsView[int, PrefixIndex]:
        return self.by_dim.items()

    @property
    def projection(self) -> Projection | None:
        return None if self.fitted is None else self.fitted.projection

    def all_indexes(self) -> Iterator[tuple[str, int, PrefixIndex]]:
        """Every index as (family, code length, index): family RAW or FITTED."""
        for d, index in self.by_dim.items():
            yield RAW, d, index
        if self.fitted is not None:
            for d, index in self.fitted.by_dim.items():
                yield FITTED, d, index

    def load(
        self,
        snap: Snapshot,
        vectors: VectorTier,
        tombstones: np.ndarray,
        projection: Projection | None = None,
        first_stage: tuple[str, int] | None = None,
    ) -> None:
        """Every index of the store, from its saved file where that is usable, brought up to ``snap``; for a
        reader, only ``first_stage`` (family, code length) now, the others on first use (None: all now)."""
        self.first_stage, self._latest = first_stage, (snap, vectors)
        self.by_dim.clear()  # the funnel holds this dict: refilled in place
        self._unsaved.clear()
        replaced = projection.codes_at(fitted_dims(self.params)) if projection is not None else ()
        for d in self.params.index_dims:
            if d in replaced:
                self.status[d] = "fitted code"
                continue
            self.by_dim[d] = self._load_raw(d, snap, vectors, tombstones)
            self._unsaved[RAW, d] = 0
        self.fitted = None
        if projection is not None:
            opened = {d: self._open(FITTED, d, projection, snap.watermark) for d in replaced}
            starts = {d: index.covered_rows for d, (index, _) in opened.items()}
            # the stale ones extended together: each block of full rows is read and projected once
            extend_many([index for index, _ in opened.values()], snap, vectors, projection)
            for d, (index, status) in opened.items():
                self._settle(FITTED, d, index, status, tombstones[tombstones < starts[d]])
            self.fitted = FittedCodes(projection, {d: index for d, (index, _) in opened.items()})
            self._unsaved |= {(FITTED, d): 0 for d in opened}

    def _load_raw(self, d: int, snap: Snapshot, vectors: VectorTier, tombstones: np.ndarray) -> PrefixIndex:
        """A raw prefix index, opened and brought up to ``snap``."""
        index, status = self._open(RAW, d, None, snap.watermark)
        start = index.covered_rows
        extend(index, snap, vectors)
        self._settle(RAW, d, index, status, tombstones[tombstones < start])
        return index

    def _open(self, family: str, d: int, fit: Projection | None, watermark: int) -> tuple[PrefixIndex, str]:
        """The saved index where it is usable ("loaded", or "extended" when behind ``watermark``), else a new
        empty one ("rebuilt")."""
        p, m, ef = self.params, self.params.m_for(d), self.params.ef_construction_for(d)
        space, fit_id = (p.metric, None) if fit is None else (fit.space, fit.fit_id)
        base = self._base(family, d)
        part = PrefixIndex.paths(base)[0].relative_to(self.path).as_posix()
        fetch, defer = self._fetcher(part), self.read_only and self.first_stage not in (None, (family, d))
        rebuild = self._rebuilder(family, d, fit) if defer else None
        try:
            checked = self.checked.get(part)
            index = PrefixIndex.load(base, d, space, m, ef, self.generation, fit_id, checked, fetch, rebuild)
            # A reader's published version may trail the writer's last save: rows past it stay invisible.
            if index.covered_rows > watermark and not self.read_only:
                raise IndexUnusable(f"index covers {index.covered_rows} rows, catalog committed {watermark}")
            return index, "loaded" if index.covered_rows >= watermark else "extended"
        except IndexUnusable:
            return self._empty(d, fit, watermark), "rebuilt"

    def _empty(self, d: int, fit: Projection | None, rows: int) -> PrefixIndex:
        """A new index over ``d``-prefixes (or ``fit``'s codes), with room for ``rows`` rows and some."""
        p = self.params
        space, fit_id = (p.metric, None) if fit is None else (fit.space, fit.fit_id)
        return PrefixIndex(d, space, p.m_for(d), p.ef_construction_for(d), rows + 1024, self.generation, fit_id)

    def _built(self, family: str, d: int, fit: Projection | None) -> PrefixIndex:
        """A new index over every live row of the newest snapshot (a deferred file found damaged or gone)."""
        if family == RAW:
            self.status[d] = "rebuilt"
        assert self._latest is not None
        snap, vectors = self._latest
        index = self._empty(d, fit, snap.watermark)
        if fit is None:
            extend(index, snap, vectors)
        else:
            extend_many([index], snap, vectors, fit)
        return index

    def _rebuilder(self, family: str, d: int, fit: Projection | None) -> Callable[[], PrefixIndex]:
        """What builds a deferred index from the vectors instead, holding this set weakly: a closure over it,
        held by its own index, made a cycle that kept a closed store's indexes until a full garbage collection."""
        owner = weakref.ref(self)

        def rebuild() -> PrefixIndex:
            indexes = owner()
            if indexes is None:
                raise StoreClosedError("the store this index belongs to was closed")
            return indexes._built(family, d, fit)

        return rebuild

    def _fetcher(self, part: str) -> Callable[[], str | None] | None:
        fetch = self.fetch
        return None if fetch is None else lambda: fetch(part)

    def _settle(self, family: str, d: int, index: PrefixIndex, status: str, dead: np.ndarray) -> None:
        """After extending: hide the rows deleted since its file was saved, note how it opened, save it."""
        index.mark_deleted(dead)
        if family == RAW:
            self.status[d] = status
        if status != "loaded" and not self.read_only:
            self._save(family, d, index)

    def build_fitted(self, projection: Projection, snap: Snapshot, vectors: VectorTier) -> FittedCodes:
        """New indexes over ``projection``'s codes of every live row of ``snap``, at the lengths it codes
        better than the raw prefixes (not installed: ``tune`` measures them first)."""
        p = self.params
        by_dim = {d: self._empty(d, projection, snap.watermark) for d in projection.codes_at(fitted_dims(p))}
        extend_many(list(by_dim.values()), snap, vectors, projection)
        return FittedCodes(projection, by_dim)

    def ensure_raw(self, snap: Snapshot, vectors: VectorTier, tombstones: np.ndarray) -> None:
        """Load (or rebuild) the raw prefix indexes a fit replaced: ``tune`` measures raw prefixes again."""
        for d in self.params.index_dims:
            if d not in self.by_dim:
                self.by_dim[d] = self._load_raw(d, snap, vectors, tombstones)
                self._unsaved[RAW, d] = 0

    def install_fitted(self, fitted: FittedCodes | None) -> None:
        """Use ``fitted`` (None: raw prefixes only) from now on (``save_fitted`` then writes its files). The
        raw indexes of the prefixes it codes leave memory (their files stay, for a later ``ensure_raw``): a
        query asking for raw prefixes scans them exactly."""
        same = fitted is not None and fitted is self.fitted  # back in use (a failed tune): its files are current
        self.fitted = fitted
        self._unsaved = {key: n for key, n in self._unsaved.items() if key[0] == RAW or same}
        if fitted is not None:
            if not same:
                self._unsaved |= {(FITTED, d): 1 for d in fitted.by_dim}
            for d in fitted.by_dim:
                raw = self.by_dim.pop(d, None)  # in place: the funnel holds this dict
                if raw is not None and self._unsaved.pop((RAW, d), 0):
                    self._retired.append((d, raw))  # saved by save_fitted, outside the caller's locks
                self.status[d] = "fitted code"

    def save_fitted(self) -> None:
        """Save the fitted indexes and the raw ones they replaced, and remove the files of fits no longer in
        use."""
        retired, self._retired = self._retired, []
        if self.read_only:
            return
        for d, raw in retired:
            self._save(RAW, d, raw)
            self._unsaved.pop((RAW, d), None)
        self.remove_stale_files()
        self.checkpoint()

    def release(self) -> None:
        """Drop every index from memory (the store was closed). Emptied in place: a funnel built over these
        dicts holds them too."""
        self.by_dim.clear()
        if self.fitted is not None:
            self.fitted.by_dim.clear()
        self._retired, self._latest = [], None

    def remove_stale_files(self) -> None:
        """Delete the saved indexes of prefixes the store no longer indexes and of fits no longer in use (the
        raw indexes a fit replaced stay, for a later ``ensure_raw``). Never raises OSError: it runs after a
        commit (``set_index_dims``, tune), and what it cannot delete costs disk, not correctness (a writer's
        open tries again)."""
        fitted = set() if self.fitted is None else set(self.fitted.by_dim)
        try:
            for side in (self.path / INDEX_DIR).glob("*_*.json"):
                family, d = side.stem.rsplit("_", 1)
                kept = {RAW: set(self.params.index_dims), FITTED: fitted}.get(family)
                if kept is not None and d.isdigit() and int(d) not in kept:
                    for stale in PrefixIndex.paths(side.with_suffix("")):
                        stale.unlink(missing_ok=True)
        except OSError:
            pass

    def prepare(self, params: StoreParams, snap: Snapshot, vectors: VectorTier, tombstones: np.ndarray) -> None:
        """Saved, current raw indexes over every prefix ``params`` indexes, so that the store reopened with
        ``params`` and without a fit (``Store.set_index_dims``) loads them all: those in memory are saved,
        the others loaded from their files or built from the bands and saved, one at a time."""
        self.checkpoint()
        other = IndexSet(self.path, params, self.generation, self.read_only)
        for d in params.index_dims:
            if d not in self.by_dim:
                other._load_raw(d, snap, vectors, tombstones)

    def insert(self, start: int, batch: np.ndarray) -> None:
        """Rows ``start``... of an uncommitted write (invisible until ``committed`` covers them)."""
        rows = np.arange(start, start + len(batch), dtype=np.int64)
        for d, index in self.by_dim.items():
            index.add(stored_prefix(batch, d, self.params.dtype), rows)
        if self.fitted is not None and self.fitted.by_dim:
            codes = self.fitted.projection.codes(stored_prefix(batch, self.params.dim, self.params.dtype))
            for d, index in self.fitted.by_dim.items():
                index.add(codes[:, :d], rows)

    def committed(self, end: int, replaced: np.ndarray, added: int) -> None:
        """A write committed: rows below ``end`` are visible, ``replaced`` rows are dead."""
        for family, d, index in self.all_indexes():
            index.covered_rows = end
            index.mark_deleted(replaced)
            self._unsaved[family, d] += added

    def deleted(self, rows: np.ndarray) -> None:
        for family, d, index in self.all_indexes():
            index.mark_deleted(rows)
            self._unsaved[family, d] += 1

    def extend_all(self, snap: Snapshot, vectors: VectorTier) -> None:
        """Add the rows of ``snap`` the indexes do not cover yet (a reader moving to a newer version)."""
        self._latest = (snap, vectors)  # what a deferred index found damaged is rebuilt from
        for index in self.by_dim.values():
            extend(index, snap, vectors)
        if self.fitted is not None:
            extend_many(list(self.fitted.by_dim.values()), snap, vectors, self.fitted.projection)

    def checkpoint(self) -> None:
        """Save every index that changed since its last save (atomically)."""
        for family, d, index in list(self.all_indexes()):
            if self._unsaved[family, d]:
                self._save(family, d, index)

    def autosave(self) -> None:
        """Save the indexes that changed by enough since their last save to be worth it."""
        for family, d, index in list(self.all_indexes()):
            if self._unsaved[family, d] >= max(INDEX_AUTOSAVE_ROWS, index.covered_rows // 4):
                self._save(family, d, index)

    def files(self) -> list[Path]:
        """The saved files of the indexes in use: a fit's replaced raw indexes are left out, since no reader
        loads them (a query asking for raw prefixes then scans them exactly)."""
        paths = (PrefixIndex.paths(self._base(family, d)) for family, d, _ in self.all_indexes())
        return [path for pair in paths for path in pair if path.exists()]

    def deferred_files(self, first_stage: tuple[str, int]) -> list[Path]:
        """The saved graphs of the indexes in use other than ``first_stage``: what a reader loads on first
        use, not at open."""
        return [self._base(f, d).with_suffix(".hnsw") for f, d, _ in self.all_indexes() if (f, d) != first_stage]

    def _base(self, family: str, d: int) -> Path:
        return self.path / INDEX_DIR / f"{family}_{d:05d}"

    def _save(self, family: str, d: int, index: PrefixIndex) -> None:
        """Save one index; when hnswlib's write fails, warn and keep it unsaved (the next checkpoint tries
        again; an open meanwhile extends the older saved copy or rebuilds): the rows it holds are committed."""
        try:
            (self.path / INDEX_DIR).mkdir(exist_ok=True)
            index.save(self._base(family, d))
        except (OSError, IndexNotSaved) as e:  # a folder it may not write in (mkdir), or hnswlib's failed write
            warnings.warn(f"cannot save the index of {family} {d}: {e}; it stays in memory", stacklevel=2)
            return
        self._unsaved[family, d] = 0


def default_first_stage(
    manifest: dict[str, Any], params: StoreParams, projection: Projection | None
) -> tuple[str, int]:
    """The index a default query (``store.query(v)``) searches first, as (family, code length): what the
    query planner resolves with no arguments (tests/test_deferred_indexes.py checks that they agree). A
    reader loads it at open; a guess that is wrong only costs its first query a load."""
    tuned = manifest.get("tuned") or None
    fitted = projection is not None  # a store with a fit shortlists on its codes by default
    if tuned and (tuned.get("prefixes") == "fitted") != fitted:
        tuned = None if fitted else tuned.get("raw_settings")
    index_dims = params.index_dims
    first = int(tuned["dims"][0]) if tuned else index_dims[0] if index_dims else params.dim
    if projection is not None and first in projection.codes_at(fitted_dims(params)):
        return FITTED, first
    return RAW, first


def fitted_dims(params: StoreParams) -> tuple[int, ...]:
    """The indexed prefixes shorter than the vectors: the code lengths a fit indexes."""
    return tuple(d for d in params.index_dims if d < params.dim)


def extend(index: PrefixIndex, snap: Snapshot, vectors: VectorTier) -> None:
    """Add the live rows of ``snap`` that ``index`` does not cover yet, from the bands."""
    d, live = index.dim, snap.live
    for lo in range(index.covered_rows, snap.watermark, REBUILD_BLOCK_ROWS):
        hi = min(lo + REBUILD_BLOCK_ROWS, snap.watermark)
        keep = np.flatnonzero(live[lo:hi])
        index.add(vectors.read_range(lo, hi, 0, d)[keep], keep + lo, covered_rows=hi)


def extend_many(indexes: list[PrefixIndex], snap: Snapshot, vectors: VectorTier, fit: Projection) -> None:
    """``extend`` for indexes over codes of ``fit``: each block of full rows is read and projected once."""
    if not indexes:
        return
    live, dim = snap.live, fit.basis.shape[0]
    for lo in range(min(i.covered_rows for i in indexes), snap.watermark, FIT_BLOCK_ROWS):
        hi = min(lo + FIT_BLOCK_ROWS, snap.watermark)
        keep = np.flatnonzero(live[lo:hi])
        codes = fit.codes(vectors.read_range(lo, hi, 0, dim)[keep])
        for index in indexes:
            ahead = keep + lo >= index.covered_rows
            index.add(codes[ahead, : index.dim], keep[ahead] + lo, covered_rows=hi)
