"""The interfaces between the tiers and the components above them. Local bands (:class:`BandedVectors`)
and the bands of a store on object storage (:class:`RemoteBands`) both provide :class:`VectorTier`;
``tests/test_bands_contract.py`` runs one contract against each."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mrlstore.kernels import Rows


class RowGather(Protocol):
    """Rows by number, read as one moment's files (``VectorTier.frozen``)."""

    def gather(self, rows: np.ndarray, col_start: int, col_stop: int) -> np.ndarray:
        """Rows (any order) x columns ``col_start:col_stop`` as float32."""
        ...


class VectorTier(Rows, Protocol):
    """The vectors of a store, by row number: read whole or by column range (what the kernels read, through
    :class:`mrlstore.kernels.Rows`), appended past the committed watermark, cut back to it."""

    @property
    def chunk_rows(self) -> list[int]: ...

    def physical_rows(self) -> int:
        """Rows the files can hold (at least the committed ones)."""
        ...

    def is_clean(self, rows: int) -> bool:
        """Whether nothing was written past row ``rows`` (leftovers of an append that never committed)."""
        ...

    def map_committed(self, rows: int) -> None:
        """Map the files of the first ``rows`` rows; CorruptStoreError when one is missing or short."""
        ...

    prefault_rows: int  # rows every array holds in memory: prefault reads them, the rest stay on disk

    def prefault(self, row_start: int, row_stop: int) -> None:
        """Read the rows of ``row_start:row_stop`` the store holds in memory now (their pages mapped)."""
        ...

    def append(self, start_row: int, vectors: np.ndarray) -> None: ...

    def write_rows(self, start_row: int, vectors: np.ndarray, sized: bool = True) -> None:
        """Write rows durably without changing the arrays' shapes (``sized=False``: rows alone, by one of
        several processes writing side by side at rows reserved for each)."""
        ...

    def read_written(self, row: int, n: int) -> np.ndarray:
        """Rows as written, uncommitted ones included (n x dim, stored dtype)."""
        ...

    def settle(self, first_row: int, end_row: int) -> None:
        """Make rows written with ``sized=False`` up to ``end_row`` whole files and erase rows past it."""
        ...

    def truncate(self, rows: int) -> None: ...

    def release_retired(self) -> None:
        """Let go of the maps that larger or truncated files replaced (each holds a descriptor), and of the
        kernels' cached descriptions of the chunks, which hold the maps' addresses (a query reading a released
        map's address crashed the process). The caller holds the write lock and the visibility lock
        exclusively: no read in flight still uses one (queries hold the visibility lock; tune and report, which
        scan natively, the write lock)."""
        ...

    def file_problems(self, watermark: int) -> list[str]: ...

    def has_norms(self) -> bool:
        """Whether per-band row norms are stored (format 2 and later)."""
        ...

    def norm_mismatches(self, rows: np.ndarray, values: np.ndarray | None = None) -> np.ndarray: ...

    def frozen(self, rows: int, columns: int) -> RowGather:
        """The first ``columns`` numbers of the first ``rows`` rows as the files are now, readable after the
        tier is closed (a compaction or refresh replaced it): for a scan that runs on while they happen. The
        caller holds the read lock."""
        ...

    def close(self) -> None: ...
