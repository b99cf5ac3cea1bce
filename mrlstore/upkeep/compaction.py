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
from pathlib import Path
from typing import Any

import numpy as np

from mrlstore._fsutil import fsync_dir
from mrlstore.errors import UnsupportedStorageError
from mrlstore.tiers.layout import create_store, fsync_tree
from mrlstore.tiers.locking import NoLock
from mrlstore.tiers.params import FORMAT_VERSION
from mrlstore.tiers.rows import split_hits

COPY_BLOCK_ROWS = 8192  # live rows copied per commit into the new store
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}.compact-{os.getpid()}"


def compact(store: Any) -> dict[str, int]:
    """Rewrite ``store`` (an open writer) without deleted rows; returns the row counts before and after."""
    from mrlstore.store import Store  # the new store is written by the same code as any store

    snap = store._snap
    live_rows = np.flatnonzero(snap.live[: snap.watermark])
    counts = {"rows_before": snap.watermark, "rows_after": len(live_rows)}
    if len(live_rows) == snap.watermark and store.manifest.get("format_version") == FORMAT_VERSION:
        return counts  # nothing deleted and the newest layout: nothing to rewrite
    store.checkpoint()
    tmp = temporary_path(store.path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        create_store(tmp, store.config, generation=store._generation + 1)  # old index caches stop matching
        new = Store(tmp, encoder=store.encoder)
        try:
            _copy_live(store, snap, live_rows, new)
            if "tuned" in store.manifest:
                new._catalog.set_manifest("tuned", store.manifest["tuned"])
            if "store_id" in store.manifest:  # the same store, renumbered
                new._catalog.set_manifest("store_id", store.manifest["store_id"])
            new.checkpoint()
        except BaseException:
            new.close()
            raise
        new_lock = new._lock  # kept: the new store must never be open to anyone else before this one reopens
        new._lock = NoLock()
        new.close()
        fsync_tree(tmp)
        _exchange(tmp, store.path)  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(store.path.parent)
    new_lock.path = store.path / new_lock.path.name
    store._reopen_with(new_lock)
    shutil.rmtree(tmp, ignore_errors=True)  # the old store
    return counts


def _copy_live(store: Any, snap: Any, live_rows: np.ndarray, new: Any) -> None:
    for lo in range(0, len(live_rows), COPY_BLOCK_ROWS):
        rows = live_rows[lo : lo + COPY_BLOCK_ROWS]
        ids, meta = split_hits(snap.table.take(rows))
        vectors = store._vectors.gather(rows, 0, store.dim)  # exact: stored values widen losslessly
        new.add_vectors(vectors, ids=ids, metadata=meta if meta.num_columns else None)


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
