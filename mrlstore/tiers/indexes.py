"""The prefix indexes as a rebuildable cache of the committed rows (the index half of
:class:`mrlstore.Store`): loading and checking the saved files, extending them from the bands, saving them
atomically now and then. DuckDB stays the commit point; an index file that is missing, stale or damaged
is rebuilt from the vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mrlstore.query.funnel import Snapshot
from mrlstore.tiers.hnsw import IndexUnusable, PrefixIndex
from mrlstore.tiers.layout import INDEX_DIR

REBUILD_BLOCK_ROWS = 65536
# Save the HNSW cache once this many rows, or a quarter of the index, were added since the last save: bounds
# the rebuild work after a crash to a share of the store, while the saves of a growing store stay linear in
# its size (a save every 100k rows rewrote a 1M-row index ten times during its build).
INDEX_AUTOSAVE_ROWS = 100_000


class IndexCache:
    """Relies on the store's path, config, snapshot, catalog, vectors and locks."""

    path: Path
    read_only: bool
    config: Any
    metric: str
    index_status: dict[int, str]
    _generation: int
    _snap: Snapshot
    _catalog: Any
    _vectors: Any
    _write_lock: Any
    _indexes: dict[int, PrefixIndex]
    _rows_since_save: dict[int, int]

    def _load_index(self, d: int, watermark: int) -> PrefixIndex:
        c, m = self.config, self.config.m_for(d)
        try:
            index = PrefixIndex.load(self._index_base(d), d, self.metric, m, c.ef_construction, self._generation)
            # A reader's published version may trail the writer's last save: rows past it stay invisible.
            if index.covered_rows > watermark and not self.read_only:
                raise IndexUnusable(f"index covers {index.covered_rows} rows, catalog committed {watermark}")
            status = "loaded" if index.covered_rows >= watermark else "extended"
        except IndexUnusable:
            index = PrefixIndex(d, self.metric, m, c.ef_construction, watermark + 1024, self._generation)
            status = "rebuilt"
        start = index.covered_rows
        self._extend_index(index, self._snap)
        dead = self._catalog.tombstones()
        index.mark_deleted(dead[dead < start])
        self.index_status[d] = status
        if status != "loaded" and not self.read_only:
            self._save_index(d, index)
        return index

    def _extend_index(self, index: PrefixIndex, snap: Snapshot) -> None:
        """Add the live rows of ``snap`` that ``index`` does not cover yet, from the bands."""
        d, live = index.dim, snap.live
        for lo in range(index.covered_rows, snap.watermark, REBUILD_BLOCK_ROWS):
            hi = min(lo + REBUILD_BLOCK_ROWS, snap.watermark)
            keep = np.flatnonzero(live[lo:hi])
            index.add(self._vectors.read_range(lo, hi, 0, d)[keep], keep + lo, covered_rows=hi)

    def _index_base(self, d: int) -> Path:
        return self.path / INDEX_DIR / f"prefix_{d:05d}"

    def _save_index(self, d: int, index: PrefixIndex) -> None:
        (self.path / INDEX_DIR).mkdir(exist_ok=True)
        index.save(self._index_base(d))

    def checkpoint(self) -> None:
        """Save every HNSW index that changed since its last save (atomically)."""
        self._check_open()
        self._check_writable()
        with self._write_lock:
            for d, index in self._indexes.items():
                if self._rows_since_save[d]:
                    self._save_index(d, index)
                    self._rows_since_save[d] = 0

    def _autosave_indexes(self) -> None:
        for d, index in self._indexes.items():
            if self._rows_since_save[d] >= max(INDEX_AUTOSAVE_ROWS, index.covered_rows // 4):
                self._save_index(d, index)
                self._rows_since_save[d] = 0
