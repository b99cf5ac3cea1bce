"""The store's upkeep verbs: a consistent copy (``snapshot``), checking the files (``verify``) and compaction
(the work itself is in layout.py, verify.py and compaction.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from mrlstore._fsutil import local_destination
from mrlstore.errors import InvalidInputError, StoreChangedError, ZeroVectorError
from mrlstore.results import CompactResult
from mrlstore.tiers.layout import copy_store
from mrlstore.tiers.locking import StoreLock
from mrlstore.tiers.state import StoreState
from mrlstore.upkeep import compaction, verify


class Maintenance:
    """Upkeep of one open store. ``reopen_with(lock)`` switches the store to the files a compaction put in
    place, ``reopen()`` opens its tiers again on the same files, ``reindex()`` only its indexes (as the
    manifest names them), ``committed()`` follows every change committed here (publishing it for readers),
    ``holds(generation)`` says whether the store's folder still holds that row numbering (``Versions.holds``)."""

    def __init__(
        self,
        state: StoreState,
        reopen_with: Callable[[StoreLock], None],
        reopen: Callable[[], None],
        reindex: Callable[[], None],
        committed: Callable[[], None],
        holds: Callable[[int], bool] = lambda generation: True,
    ):
        self.state, self.reopen_with, self.reopen, self.reindex = state, reopen_with, reopen, reindex
        self.committed, self.holds = committed, holds

    def snapshot(self, dest: str | os.PathLike[str]) -> Path:
        """A consistent copy at ``dest`` (which must not exist); see ``Store.snapshot``."""
        dest = local_destination(dest, "snapshot", self.state.path)
        if dest.exists():
            raise InvalidInputError(f"snapshot destination {dest} already exists")
        state = self.state
        with state.writing():
            if not state.read_only:
                state.indexes.checkpoint()
            self._check_folder()
            copy_store(state.path, dest, state.catalog.snapshot_to)
            try:
                self._check_folder()  # a compaction during the copy
            except StoreChangedError:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        return dest

    def _check_prefixes(self, d: int) -> None:
        """Rows whose first ``d`` numbers are all zero, stored while ``d`` was not indexed, refuse a cosine
        index of ``d``: undefined there (the build took them, then compaction refused every row again and
        verify called them lost)."""
        state = self.state
        zero = verify.all_zero_rows(state.vectors, state.snap, d)
        if len(zero):
            raise ZeroVectorError(
                f"{len(zero)} row(s) have an all-zero {d}-d prefix, e.g. ids {state.snap.table.take_ids(zero[:3])}: "
                f"cosine similarity is undefined there, so {d} numbers cannot be indexed; delete those rows, or "
                "index longer prefixes"
            )

    def _check_folder(self) -> None:
        """A reader's snapshot copies the folder's bands beside the reader's catalog, and its verify checks
        them: they must be of its numbering (after a compaction, ids were paired with other rows' vectors)."""
        if not self.holds(self.state.generation):
            raise StoreChangedError(
                f"store {self.state.path} was compacted since this reader's version (its rows are numbered "
                "anew): refresh() the reader, or snapshot and verify from the writer"
            )

    def verify(self, full: bool = False) -> list[str]:
        with self.state.writing():
            found = verify.problems(self.state, full)
            self._check_folder()  # the files checked were another numbering's: not this reader's problems
            return found

    def compact(self) -> CompactResult:
        with self.state.writing():
            counts = compaction.upgrade_catalog(self.state)
            if counts is not None:  # nothing to rewrite but the catalog
                self.reopen()
                self.committed()
                return CompactResult(**counts)
            return CompactResult(**compaction.compact(self.state, self.reopen_with))

    def set_index_dims(self, index_dims: Sequence[int]) -> None:
        """Index other prefixes (see ``Store.set_index_dims``). The new indexes are built and saved first
        (queries go on meanwhile), then the manifest commits the change, then they are loaded (the catalog
        and bands stay open: a scan in another thread goes on): a crash before the commit leaves the store as
        it was, after it the saved files load."""
        state = self.state
        with state.writing():
            params = state.params.with_index_dims(index_dims)
            if params.index_dims == state.params.index_dims:
                return
            if params.metric == "cosine" and params.index_dims:
                self._check_prefixes(min(params.index_dims))
            state.indexes.prepare(params, state.snap, state.vectors, state.catalog.tombstones())
            state.catalog.set_manifest_entries({**params.index_entries(), "tuned": None, "fit": None})
            self.reindex()
            self.committed()  # published (or marked pending) for readers: the indexed prefixes count as a change
            state.indexes.remove_stale_files()
