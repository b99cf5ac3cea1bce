"""The store's upkeep verbs: a consistent copy (``snapshot``), checking the files (``verify``) and compaction
(the work itself is in layout.py, verify.py and compaction.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mrlstore.errors import InvalidInputError
from mrlstore.results import CompactResult
from mrlstore.tiers.layout import copy_store
from mrlstore.tiers.locking import StoreLock
from mrlstore.tiers.state import StoreState
from mrlstore.upkeep import compaction, verify


class Maintenance:
    """Upkeep of one open store. ``reopen_with(lock)`` switches the store to the files a compaction put in
    place."""

    def __init__(self, state: StoreState, reopen_with: Callable[[StoreLock], None]):
        self.state, self.reopen_with = state, reopen_with

    def snapshot(self, dest: str | os.PathLike[str]) -> Path:
        """A consistent copy at ``dest`` (which must not exist); see ``Store.snapshot``."""
        dest = Path(dest)
        if dest.exists():
            raise InvalidInputError(f"snapshot destination {dest} already exists")
        state = self.state
        with state.write_lock:
            if not state.read_only:
                state.indexes.checkpoint()
            copy_store(state.path, dest, state.catalog.snapshot_to)
        return dest

    def verify(self) -> list[str]:
        with self.state.write_lock:
            return verify.problems(self.state)

    def compact(self) -> CompactResult:
        with self.state.write_lock:
            return CompactResult(**compaction.compact(self.state, self.reopen_with))
