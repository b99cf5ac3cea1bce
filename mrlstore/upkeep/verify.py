"""Checking a store's files against its commit invariants (``Store.verify``, ``mrlstore verify``).

What a crash or a lost file can break, each checked against the catalog (the commit point): every band
(and row_norms) holds the committed rows; every chunk file that holds committed rows exists with its full
size; no live row reads as all zeros where a stored vector cannot be zero (a missing chunk reads as zeros
in Zarr); a sample of rows' stored band norms agree with their values (the bounded re-rank trusts them;
``full``: every live row's, which reads every vector);
the catalog's rows lie below the watermark and no id is at two of them; the HNSW caches cover no row the
catalog lacks.
"""

from __future__ import annotations

import numpy as np

from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.snapshot import Snapshot
from mrlstore.tiers.state import StoreState

ZERO_CHECK_BLOCK = 65536  # rows read per block when looking for all-zero rows
NORM_CHECK_ROWS = 2000  # live rows, evenly spread, whose band norms are recomputed
FULL_CHECK_BLOCK = 16384  # rows read per block when every row's norms are recomputed (128 MiB at 2048-d)


def problems(state: StoreState, full: bool = False) -> list[str]:
    """Everything wrong with an open store's files, as sentences; empty when it is consistent. ``full``
    checks every live row's values against its stored norms, not a sample."""
    snap, vectors, params = state.snap, state.vectors, state.params
    found: list[str] = []
    found += vectors.file_problems(snap.watermark)  # the files as they are now, not the open maps
    if found:
        return found  # the rows cannot be read: the checks below would only repeat it
    outside = state.catalog.rows_outside(snap.watermark)
    if outside:
        found.append(f"the catalog lists {outside} row(s) at or past the committed watermark {snap.watermark}")
    repeated = state.catalog.repeated_ids()
    if repeated:
        found.append(f"ids stored at more than one live row, e.g. {repeated}")
    if params.metric == "cosine":
        zero = all_zero_rows(vectors, snap, params.index_dims[0] if params.index_dims else params.dim)
        if len(zero):
            found.append(
                f"{len(zero)} committed row(s) read as all zeros (lost vector data), e.g. rows {zero[:5].tolist()}"
            )
    found += _every_norm_problem(vectors, snap, params.dim) if full else _norm_problems(vectors, snap)
    for family, d, index in state.indexes.all_indexes():
        if index.covered_rows > snap.watermark:
            covered = index.covered_rows
            found.append(f"the {d}-d {family} HNSW cache covers {covered} rows; {snap.watermark} are committed")
    return found


def _norm_problems(vectors: VectorTier, snap: Snapshot) -> list[str]:
    """Stored band norms of up to NORM_CHECK_ROWS live rows, evenly spread, against their values."""
    if not vectors.has_norms():
        return []
    live = np.flatnonzero(snap.live[: snap.watermark])
    if not len(live):
        return []
    sample = np.unique(live[np.linspace(0, len(live) - 1, min(NORM_CHECK_ROWS, len(live))).astype(np.int64)])
    wrong = vectors.norm_mismatches(sample)
    if not len(wrong):
        return []
    return [f"row_norms disagree with the stored vectors of {len(wrong)} sampled row(s), e.g. {wrong[:5].tolist()}"]


def _every_norm_problem(vectors: VectorTier, snap: Snapshot, dim: int) -> list[str]:
    """Stored band norms of every live row against its values, a block of rows at a time (a progress bar on
    stores past a few blocks)."""
    if not vectors.has_norms():
        return []
    from tqdm import tqdm

    wrong = []
    blocks = range(0, snap.watermark, FULL_CHECK_BLOCK)
    for lo in tqdm(blocks, desc="verify", unit="block", disable=len(blocks) < 8):
        hi = min(lo + FULL_CHECK_BLOCK, snap.watermark)
        live = snap.live[lo:hi]
        wrong.append(damaged_rows(vectors, np.flatnonzero(live) + lo, vectors.read_range(lo, hi, 0, dim)[live]))
    bad = np.concatenate(wrong) if wrong else np.empty(0, np.int64)
    if not len(bad):
        return []
    return [f"row_norms disagree with the stored vectors (or they are not finite) of {len(bad)} row(s), e.g. rows "
            f"{bad[:5].tolist()}"]  # fmt: skip


def damaged_rows(vectors: VectorTier, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Of ``rows`` (sorted), whose whole stored vectors are ``values``, those not finite or disagreeing with
    their stored band norms (verify(full=True), and what compaction refuses to copy)."""
    return np.union1d(vectors.norm_mismatches(rows, values), rows[~np.isfinite(values).all(axis=1)])


def all_zero_rows(vectors: VectorTier, snap: Snapshot, width: int) -> np.ndarray:
    """Live rows whose first ``width`` numbers are all zero (cosine rejects them at add where indexed)."""
    out = []
    for lo in range(0, snap.watermark, ZERO_CHECK_BLOCK):
        hi = min(lo + ZERO_CHECK_BLOCK, snap.watermark)
        block = vectors.read_range(lo, hi, 0, width)
        zero = ~np.any(block != 0, axis=1) & snap.live[lo:hi]
        out.append(np.flatnonzero(zero) + lo)
    return np.concatenate(out) if out else np.empty(0, np.int64)
