"""Opening a store: where its files are (a folder, or the local copy of a remote version's small parts),
creating it when absent, opening its tiers under the right lock, and reopening them in place when a
compaction or a newer version replaced the files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrlstore._fsutil import HeldFolder, hold_folder, is_url, local_path
from mrlstore.encoder.bundled import bundled_weights_id
from mrlstore.errors import (
    MRLStoreError,
    NotAStoreError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedStorageError,
    storage_error,
)
from mrlstore.options import StoreConfig
from mrlstore.tiers.bands import auto_chunk_rows
from mrlstore.tiers.catalog import DB_FILE
from mrlstore.tiers.layout import create_store
from mrlstore.tiers.locking import StoreLock
from mrlstore.tiers.params import BUNDLED_ENCODER, BUNDLED_ENCODER_DIM, StoreParams, encoder_name
from mrlstore.tiers.state import StoreState, open_state, reload_indexes
from mrlstore.upkeep.versions import Versions

SWAP_RETRIES = 5  # opens of a reader that compactions may swap the folder under


def locate(path: str | os.PathLike[str], config: StoreConfig) -> Versions:
    """Where the store's files are: a local folder, or for a URL the local copy of its small parts."""
    if is_url(path):  # before anything touches the disk
        if not config.read_only:
            raise UnsupportedStorageError(
                f"{path} is a URL: stores on object storage are read-only (open it with read_only=True); "
                "write to a local store and upload it with store.publish(url)"
            )
        from mrlstore.tiers.objectstore import RemoteSource

        remote = RemoteSource(path, config.storage_options)
        local = remote.local_copy(config.cache_dir)  # the small parts; the bands stay remote
        return Versions(Path(local), True, remote, config.cache_dir, config.local_dims)
    return Versions(local_path(path), config.read_only)


def create_if_absent(path: Path, config: StoreConfig, requested: dict[str, Any]) -> None:
    """A new store at ``path`` when there is none (an empty folder counts as none); ``requested`` gets the
    bundled encoder's dim when neither a dim nor an encoder was given."""
    try:
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            if not path.is_dir() or not (path / DB_FILE).exists():
                raise NotAStoreError(f"{path} exists but is not an mrlstore store (no {DB_FILE} inside)")
            return
    except PermissionError as e:  # a folder this user may not list
        raise storage_error("open", path, e) from None
    if config.read_only:
        raise StoreNotFoundError(f"no store at {path} (read_only=True never creates one)")
    if requested["dim"] is None:
        requested["dim"] = BUNDLED_ENCODER_DIM  # no dim, no encoder: images via the bundled encoder
    name = encoder_name(config.encoder, int(requested["dim"]), config.dim)
    weights = bundled_weights_id() if name == BUNDLED_ENCODER else None
    params = StoreParams.new(requested, name, auto_chunk_rows, encoder_weights=weights)
    try:
        create_store(path, params)
    except OSError as e:
        if isinstance(e, MRLStoreError):
            raise
        raise storage_error("create a store at", path, e) from e


def open_tiers(versions: Versions, requested: dict[str, Any]) -> StoreState:
    """The store's tiers, opened under its lock (a writer's, a reader's registration), with publishing
    started for writers. On failure nothing stays open or locked."""

    def release(state: StoreState) -> None:
        state.close_tiers()
        if state.lock is not None:
            state.lock.release()

    try:
        return _open_unswapped(versions, lambda: _open_tiers_once(versions, requested), release)
    except MRLStoreError:
        raise
    except OSError as e:  # a file or folder this user may not read: which one, typed
        raise storage_error("open", e.filename or versions.path, e) from None


def _open_unswapped(
    versions: Versions, open_once: Callable[[], StoreState], release: Callable[[StoreState], None]
) -> StoreState:
    """``open_once()``, again if a compaction swapped a local reader's folder while it ran (its files may be
    of both generations); the folder opened is held by ``versions`` (``Versions.hold``)."""
    swappable = versions.read_only and versions.remote is None
    for attempt in range(SWAP_RETRIES):
        before = hold_folder(versions.path) if swappable else None
        try:
            state = open_once()
        except BaseException as e:
            swapped = before is not None and not before.is_at(versions.path)
            _let_go(before)
            if not (isinstance(e, MRLStoreError) and swapped) or attempt == SWAP_RETRIES - 1:
                raise
            continue
        if before is None or before.is_at(versions.path):
            versions.hold(before)
            return state
        before.release()
        release(state)
    raise StoreLockedError(f"{versions.path} was compacted {SWAP_RETRIES} times while this reader opened it")


def _let_go(folder: HeldFolder | None) -> None:
    if folder is not None:
        folder.release()


def _open_tiers_once(versions: Versions, requested: dict[str, Any]) -> StoreState:
    lock = versions.take_lock()
    catalog = None
    try:
        catalog = versions.open_catalog()
        checked, fetch = versions.take_checked(), versions.fetcher()
        path, read_only = versions.path, versions.read_only
        state = open_state(path, read_only, requested, catalog, versions.open_bands, 0, checked, fetch)
        state.lock, state.location = lock, versions.location
        if not versions.read_only:
            _remove_stale_indexes(state)
            versions.start_publishing(state)
    except BaseException:
        if catalog is not None:
            catalog.close()
        lock.release(remove_if_created=True)
        raise
    return state


def _remove_stale_indexes(state: StoreState) -> None:
    """A writer's open removes the index files of prefixes and fits the store no longer uses: a set_index_dims
    killed between saving its new indexes and committing left them (12.6 MiB at 20k rows for one 128-d index)."""
    state.indexes.remove_stale_files()


def reopen(state: StoreState, versions: Versions, switch: Callable[[], None]) -> None:
    """Close the tiers, ``switch()`` to what is to be opened instead (a lock, a version, a path), and open
    again into ``state`` under the same locks; queries wait meanwhile."""
    with state.visibility.write():
        try:  # closing too: a Ctrl-C after the catalog closed left a handle neither open nor marked closed
            state.close_tiers()
            switch()
            state.adopt(_open_again(state, versions))
        except BaseException as e:
            # what changed is committed, but this handle has no tiers left: closed, with the reason
            versions.stop()
            state.shut(f"its files changed and {_why_not(e, 'could not be opened again')}; open it again to go on")
            raise
        state.location = versions.location
        if not versions.read_only:
            versions.start_publishing(state)


def reopen_with_lock(state: StoreState, versions: Versions, lock: StoreLock) -> None:
    """Switch to the files a compaction put at the store's path, holding their ``lock``."""

    def take_lock() -> None:
        if state.lock is not None:
            state.lock.release()
        state.lock = lock

    try:
        reopen(state, versions, take_lock)
    except BaseException:
        if state.lock is not lock:  # stopped before it was taken: no process could open the store for writing
            lock.release()
        raise


def reindex(state: StoreState, versions: Versions) -> None:
    """Load the indexes of the prefixes the store now indexes, its catalog and bands left open (see
    ``reload_indexes``). If they cannot be loaded the handle is closed, as ``reopen`` does."""
    try:
        reload_indexes(state)
    except BaseException as e:
        with state.visibility.write():
            versions.stop()
            why = _why_not(e, "their indexes could not be loaded")
            state.shut(f"its indexed prefixes changed and {why}; open it again to go on")
        raise


def _why_not(e: BaseException, failed: str) -> str:
    """Why a handle could not go on after its files or indexes changed under it: ``failed``, or Ctrl-C."""
    return "an interrupt (Ctrl-C) stopped it from taking them up" if isinstance(e, KeyboardInterrupt) else failed


def open_beside(state: StoreState, versions: Versions, switch: Callable[[], None], undo: Callable[[], None]) -> None:
    """Open what ``switch()`` names while the open tiers go on answering, then swap them in (a copy of a
    remote version, which needs no lock): if the new one fails to open, ``undo()`` and the handle stays on
    what it had."""
    switch()
    try:
        new = _open_again(state, versions)
    except BaseException:
        undo()
        raise
    with state.visibility.write():
        try:
            state.close_tiers()
        finally:  # also after a Ctrl-C there: the handle stayed on the old version with its catalog closed
            state.adopt(new)
            state.location = versions.location


def _open_again(state: StoreState, versions: Versions) -> StoreState:
    return _open_unswapped(versions, lambda: _open_state_again(state, versions), StoreState.close_tiers)


def _open_state_again(state: StoreState, versions: Versions) -> StoreState:
    catalog = versions.open_catalog()
    try:
        version = state.snap.version + 1  # filters cached for the old snapshot stay unused
        checked, fetch = versions.take_checked(), versions.fetcher()
        return open_state(versions.path, versions.read_only, {}, catalog, versions.open_bands, version, checked, fetch)
    except BaseException:
        catalog.close()
        raise
