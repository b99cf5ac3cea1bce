"""The store's upkeep: consistent copies, compaction, and checking the files (the maintenance half of
:class:`mrlstore.Store`; the work itself is in layout.py, compaction.py and verify.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrlstore.errors import InvalidInputError
from mrlstore.results import CompactResult
from mrlstore.tiers.layout import copy_store
from mrlstore.tiers.locking import StoreLock


class Maintenance:
    """Relies on the store's path, locks, catalog, vectors and ``_open``."""

    path: Path
    read_only: bool
    _write_lock: Any
    _visibility: Any
    _catalog: Any
    _vectors: Any
    _lock: Any

    def snapshot(self, dest: str | os.PathLike[str]) -> Path:
        """Write a consistent copy of the store to ``dest`` (which must not exist) and return its path.

        DuckDB lets no other process open a store while its writer has it; a snapshot is how other
        processes read meanwhile: ``mrlstore.open(dest, read_only=True)``.
        """
        self._check_open()
        dest = Path(dest)
        if dest.exists():
            raise InvalidInputError(f"snapshot destination {dest} already exists")
        with self._write_lock:
            if not self.read_only:
                self.checkpoint()
            copy_store(self.path, dest, self._catalog.snapshot_to)
        return dest

    def verify(self) -> list[str]:
        """What is wrong with the store's files against its commits (empty when consistent); see
        :mod:`mrlstore.upkeep.verify`."""
        self._check_open()
        from mrlstore.upkeep.verify import problems

        with self._write_lock:
            return problems(self)

    def compact(self) -> CompactResult:
        """Rewrite the store without its deleted rows (disk shrinks by their share), crash-safely: a crash
        at any moment leaves the old or the new store, never a mix. A store of an older format version is
        rewritten in the newest even with nothing deleted. See :mod:`mrlstore.upkeep.compaction`."""
        self._check_open()
        self._check_writable()
        from mrlstore.upkeep.compaction import compact

        with self._write_lock:
            return CompactResult(**compact(self))

    def _reopen_with(self, lock: StoreLock) -> None:
        """Switch to the files now at ``self.path`` (a compaction swapped them in), holding ``lock``."""

        def take_lock() -> None:
            self._lock.release()
            self._lock = lock

        self._reopen(take_lock)

    def _reopen(self, switch: Callable[[], None]) -> None:
        """Close the open files, ``switch()`` to what is to be opened instead (a lock, a version, a path),
        and open again under the same write and visibility locks; queries wait meanwhile."""
        write_lock, visibility = self._write_lock, self._visibility
        with visibility.write():
            self._catalog.close()
            self._vectors.close()
            switch()
            self._open({})
            self._write_lock, self._visibility = write_lock, visibility  # threads may be waiting on these
