"""The prefix indexes as a rebuildable cache of the committed rows: loading and checking the saved files,
extending them from the bands, saving them atomically now and then. DuckDB stays the commit point; an index
file that is missing, stale or damaged is rebuilt from the vectors."""

from __future__ import annotations

from collections.abc import ItemsView
from pathlib import Path

import numpy as np

from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.hnsw import IndexUnusable, PrefixIndex
from mrlstore.tiers.layout import INDEX_DIR
from mrlstore.tiers.params import StoreParams
from mrlstore.tiers.snapshot import Snapshot

REBUILD_BLOCK_ROWS = 65536
# Save the HNSW cache once this many rows, or a quarter of the index, were added since the last save: bounds
# the rebuild work after a crash to a share of the store, while the saves of a growing store stay linear in
# its size (a save every 100k rows rewrote a 1M-row index ten times during its build).
INDEX_AUTOSAVE_ROWS = 100_000


def stored_prefix(vectors: np.ndarray, d: int, dtype: str) -> np.ndarray:
    """The first ``d`` numbers exactly as stored (rounded to ``dtype``), as float32."""
    return vectors[:, :d].astype(dtype).astype(np.float32)


class IndexSet:
    """One store's prefix indexes, ``by_dim`` (the mapping the funnel searches: refilled in place, never
    replaced), with what each needs saved. ``status`` tells how each was opened: loaded, extended (a saved
    file behind the commits) or rebuilt."""

    def __init__(self, path: Path, params: StoreParams, generation: int, read_only: bool):
        self.path, self.params, self.generation, self.read_only = path, params, generation, read_only
        self.by_dim: dict[int, PrefixIndex] = {}
        self._unsaved: dict[int, int] = {}
        self.status: dict[int, str] = {}

    def __getitem__(self, d: int) -> PrefixIndex:
        return self.by_dim[d]

    def items(self) -> ItemsView[int, PrefixIndex]:
        return self.by_dim.items()

    def load(self, snap: Snapshot, vectors: VectorTier, tombstones: np.ndarray) -> None:
        """Every index of the store, from its saved file where that is usable, brought up to ``snap``."""
        self.by_dim.clear()  # the funnel holds this dict: refilled in place
        for d in self.params.index_dims:
            self.by_dim[d] = self._load(d, snap, vectors, tombstones)
            self._unsaved[d] = 0

    def _load(self, d: int, snap: Snapshot, vectors: VectorTier, tombstones: np.ndarray) -> PrefixIndex:
        p, m, watermark = self.params, self.params.m_for(d), snap.watermark
        try:
            index = PrefixIndex.load(self._base(d), d, p.metric, m, p.ef_construction, self.generation)
            # A reader's published version may trail the writer's last save: rows past it stay invisible.
            if index.covered_rows > watermark and not self.read_only:
                raise IndexUnusable(f"index covers {index.covered_rows} rows, catalog committed {watermark}")
            status = "loaded" if index.covered_rows >= watermark else "extended"
        except IndexUnusable:
            index = PrefixIndex(d, p.metric, m, p.ef_construction, watermark + 1024, self.generation)
            status = "rebuilt"
        start = index.covered_rows
        extend(index, snap, vectors)
        index.mark_deleted(tombstones[tombstones < start])
        self.status[d] = status
        if status != "loaded" and not self.read_only:
            self._save(d, index)
        return index

    def insert(self, start: int, batch: np.ndarray) -> None:
        """Rows ``start``... of an uncommitted write (invisible until ``committed`` covers them)."""
        rows = np.arange(start, start + len(batch), dtype=np.int64)
        for d, index in self.by_dim.items():
            index.add(stored_prefix(batch, d, self.params.dtype), rows)

    def committed(self, end: int, replaced: np.ndarray, added: int) -> None:
        """A write committed: rows below ``end`` are visible, ``replaced`` rows are dead."""
        for d, index in self.by_dim.items():
            index.covered_rows = end
            index.mark_deleted(replaced)
            self._unsaved[d] += added

    def deleted(self, rows: np.ndarray) -> None:
        for d, index in self.by_dim.items():
            index.mark_deleted(rows)
            self._unsaved[d] += 1

    def extend_all(self, snap: Snapshot, vectors: VectorTier) -> None:
        """Add the rows of ``snap`` the indexes do not cover yet (a reader moving to a newer version)."""
        for index in self.by_dim.values():
            extend(index, snap, vectors)

    def checkpoint(self) -> None:
        """Save every index that changed since its last save (atomically)."""
        for d, index in self.by_dim.items():
            if self._unsaved[d]:
                self._save(d, index)

    def autosave(self) -> None:
        """Save the indexes that changed by enough since their last save to be worth it."""
        for d, index in self.by_dim.items():
            if self._unsaved[d] >= max(INDEX_AUTOSAVE_ROWS, index.covered_rows // 4):
                self._save(d, index)

    def _base(self, d: int) -> Path:
        return self.path / INDEX_DIR / f"prefix_{d:05d}"

    def _save(self, d: int, index: PrefixIndex) -> None:
        (self.path / INDEX_DIR).mkdir(exist_ok=True)
        index.save(self._base(d))
        self._unsaved[d] = 0


def extend(index: PrefixIndex, snap: Snapshot, vectors: VectorTier) -> None:
    """Add the live rows of ``snap`` that ``index`` does not cover yet, from the bands."""
    d, live = index.dim, snap.live
    for lo in range(index.covered_rows, snap.watermark, REBUILD_BLOCK_ROWS):
        hi = min(lo + REBUILD_BLOCK_ROWS, snap.watermark)
        keep = np.flatnonzero(live[lo:hi])
        index.add(vectors.read_range(lo, hi, 0, d)[keep], keep + lo, covered_rows=hi)
