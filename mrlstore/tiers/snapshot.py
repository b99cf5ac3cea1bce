"""The in-memory view of one commit: which rows are live, their ids and metadata. Writers make a new one per
commit; queries keep the one they started with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mrlstore.errors import CorruptStoreError
from mrlstore.tiers.rows import RowTable


@dataclass(frozen=True)
class Snapshot:
    """The committed rows at one point in time; writers publish a new one, queries keep theirs."""

    version: int  # bumped by every commit and delete (filter results are cached per version)
    watermark: int  # rows below it are committed
    live: np.ndarray  # bool by row (rows at or past the watermark are never read)
    n_live: int
    table: RowTable  # ids and metadata by row

    def live_sorted(self, rows: np.ndarray) -> np.ndarray:
        """The rows of ``rows`` (1-D) a query may return, ascending."""
        rows = np.sort(rows)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.watermark):  # HNSW's -1 pads, rows past this version
            rows = rows[(rows >= 0) & (rows < self.watermark)]
        if self.n_live != self.watermark:  # some rows deleted
            rows = rows[self.live[rows]]
        return rows


def load_snapshot(live_items: tuple[np.ndarray, Any], watermark: int, version: int) -> Snapshot:
    """The snapshot of a catalog's committed state (``Catalog.live_items()``: live rows, their ids and metadata)."""
    live_rows, items = live_items
    if len(live_rows) and live_rows.max() >= watermark:
        raise CorruptStoreError("catalog lists rows past its own committed watermark")
    live = np.zeros(max(watermark, 1024), dtype=bool)
    live[live_rows] = True
    return Snapshot(version, watermark, live, len(live_rows), RowTable.from_catalog(live_rows, items, watermark))
