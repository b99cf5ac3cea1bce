"""Compaction: rewrite a store without its deleted rows, crash-safely.

The live rows are copied, in row order, into a complete new store built in a temporary folder beside the
store (``.NAME.compact-PID``): bands, catalog, and the HNSW caches rebuilt by the same write path as any
add. One atomic exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``) is the commit point: a
crash before it leaves the old store at the path, a crash after it the new one, never a mix; whichever
folder is left over beside it is removed by the next writer to open the store (it holds the store's lock,
so no compaction of it can be running).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mrlstore._fsutil import folder_id, fsync_dir
from mrlstore.errors import CorruptStoreError, MRLStoreError, UnsupportedStorageError, storage_error
from mrlstore.tiers.bands import BandedVectors
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.layout import create_store, fsync_tree
from mrlstore.tiers.locking import StoreLock
from mrlstore.tiers.params import FORMAT_VERSION
from mrlstore.tiers.rows import split_hits
from mrlstore.tiers.snapshot import Snapshot
from mrlstore.tiers.state import StoreState, open_state
from mrlstore.upkeep.verify import damaged_rows
from mrlstore.upkeep.versions import carry_readers, mark_pending
from mrlstore.write.writer import Writer

COPY_BLOCK_ROWS = 8192  # live rows copied per commit into the new store
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}.compact-{os.getpid()}"


ONLY_CATALOG_BEHIND = 3  # a store of this format with nothing deleted differs from the newest in its catalog only


def upgrade_catalog(state: StoreState) -> dict[str, int] | None:
    """A store of format 3 with nothing deleted: its catalog made format 4 in place (DuckDB's index on id
    dropped, in one transaction), instead of rewriting its vectors and indexes. Returns the row counts, or
    None when the store needs a compaction proper (or none)."""
    snap = state.snap
    if snap.n_live != snap.watermark or state.manifest.get("format_version") != ONLY_CATALOG_BEHIND:
        return None
    state.catalog.drop_id_index(FORMAT_VERSION)
    return {"rows_before": snap.watermark, "rows_after": snap.n_live}


def compact(state: StoreState, reopen_with: Callable[[StoreLock], None]) -> dict[str, int]:
    """Rewrite the open writer ``state`` without deleted rows; returns the row counts before and after.
    ``reopen_with(lock)`` switches the store to the files the exchange put at its path, holding ``lock``."""
    snap = state.snap
    live_rows = np.flatnonzero(snap.live[: snap.watermark])
    counts = {"rows_before": snap.watermark, "rows_after": len(live_rows)}
    if len(live_rows) == snap.watermark and state.manifest.get("format_version") == FORMAT_VERSION:
        return counts  # nothing deleted and the newest layout: nothing to rewrite
    state.indexes.checkpoint()
    # every committed row mapped from the files swapped out: scans and queries of the old snapshot under
    # way until the reopen never map a swapped-in file (renumbered) in their place
    state.vectors.map_committed(snap.watermark)
    tmp = temporary_path(state.path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        create_store(tmp, state.params, generation=state.generation + 1)  # old index caches stop matching
        fresh = folder_id(tmp)
        lock = StoreLock(tmp, exclusive=True)  # kept: nobody may open the new store before this one reopens
        try:
            _write_new(state, snap, live_rows, tmp)
            carry_readers(state.path, tmp)
            mark_pending(tmp)
            fsync_tree(tmp)
            _exchange(tmp, state.path)  # the commit point
        except BaseException:
            if folder_id(state.path) != fresh:
                lock.release()  # the new store is thrown away: nobody holds it
                raise
            _follow_exchange(state, lock, tmp, reopen_with)  # interrupted (Ctrl-C) just after it committed
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, MRLStoreError):  # a full disk: the store is as it was
            raise storage_error("compact", state.path, e) from None
        raise
    _follow_exchange(state, lock, tmp, reopen_with)
    return counts


def _follow_exchange(state: StoreState, lock: StoreLock, tmp: Path, reopen_with: Callable[[StoreLock], None]) -> None:
    """The exchange committed: this handle moves to the new files even if interrupted meanwhile (writing on
    to the swapped-out files, unlocked, lost every later add)."""
    try:
        fsync_dir(state.path.parent)
    finally:
        lock.path = state.path / lock.path.name
        reopen_with(lock)  # if this fails the handle is closed, with the reason
    shutil.rmtree(tmp, ignore_errors=True)  # the old store


def _write_new(state: StoreState, snap: Snapshot, live_rows: np.ndarray, tmp: Path) -> None:
    """The live rows, in row order, into the new store at ``tmp`` by the same write path as any add; its
    fitted projection, tuned settings and store id carried over; its index caches saved."""
    catalog = Catalog(tmp, read_only=False)
    try:
        new = open_state(tmp, False, {}, catalog, lambda p: BandedVectors(tmp, p.dim, p.bands, p.dtype))
    except BaseException:
        catalog.close()
        raise
    try:
        new.catalog.add_columns(state.catalog.columns())  # in their order, and those no live row fills
        fit = state.indexes.projection
        if fit is not None:  # kept, so that the rows are projected on their way in
            new.catalog.set_manifest("fit", fit.to_manifest())
            new.indexes.install_fitted(new.indexes.build_fitted(fit, new.snap, new.vectors))
        writer = Writer(new, on_commit=lambda: None)
        for lo in range(0, len(live_rows), COPY_BLOCK_ROWS):
            rows = live_rows[lo : lo + COPY_BLOCK_ROWS]
            ids, meta = split_hits(snap.table.take(rows))
            vectors = state.vectors.gather(rows, 0, state.params.dim)  # exact: stored values widen losslessly
            _check_copied(state, snap, rows, vectors)
            writer.write(vectors, ids, meta if meta.num_columns else None, replace=False)
        for key in ("tuned", "store_id"):  # the same store, renumbered
            if key in state.manifest:
                new.catalog.set_manifest(key, state.manifest[key])
        new.indexes.checkpoint()
    finally:
        new.close_tiers()


def _check_copied(state: StoreState, snap: Snapshot, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Rows whose stored values are not finite or disagree with their stored norms are damaged: copied, their
    norms would be computed again from the damage and verify() would find nothing from then on."""
    bad = damaged_rows(state.vectors, rows, vectors)
    if len(bad):
        raise CorruptStoreError(
            f"compact() stopped, the store unchanged: the stored vectors of {len(bad)} row(s), e.g. ids "
            f"{snap.table.take_ids(bad[:3])}, are not finite or disagree with their stored norms (damaged band "
            "files; verify() lists what it finds): delete those rows or restore a copy, then compact again"
        )


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise UnsupportedStorageError("compaction needs renameat2 (Linux 3.15+, glibc 2.28+) for its atomic swap")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise UnsupportedStorageError(f"cannot swap {a} and {b} atomically: {os.strerror(err)}")
