"""Committing staged fragments without opening the store's coarse tier: the writer of a Ray write's driver.

It holds the store's writer lock, its catalog and its bands, and never the ids, the metadata or the HNSW
indexes, so its memory grows neither with the store nor with the write: fragments are read one at a time
through memory maps, their vectors appended to the bands, their ids and metadata inserted in one catalog
transaction (the commit point, as for every write). The indexes are a cache that trails the catalog until the
store is next opened as a writer, which extends them from the bands (the Ray sink does that on a worker).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mrlstore.inputs.staging import Fragments, StoreShape
from mrlstore.options import StoreConfig
from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.params import StoreParams
from mrlstore.tiers.state import HeldLock, clear_uncommitted
from mrlstore.upkeep.opening import create_if_absent
from mrlstore.upkeep.versions import Versions


class StagedWriter:
    """The store at ``path`` (created when absent, with ``config``'s creation parameters) opened for staged
    commits only, under its exclusive writer lock until ``close()``."""

    def __init__(self, path: str | os.PathLike[str], config: StoreConfig):
        versions = Versions(Path(path), read_only=False)
        requested = config.creation()
        create_if_absent(versions.path, config, requested)
        self.path = versions.path
        self._lock: HeldLock | None = versions.take_lock()
        self._catalog: Catalog | None = None
        self._vectors: VectorTier | None = None
        try:
            self._catalog = versions.open_catalog()
            self.params = StoreParams.from_manifest(self._catalog.manifest(), self.path)
            self.params.check_requested(requested, self.path)
            self._vectors = versions.open_bands(self.params)
            clear_uncommitted(self.path, self._vectors, self._catalog.committed_rows())
        except BaseException:
            self.close()
            raise

    def shape(self) -> StoreShape:
        p = self.params
        return StoreShape(p.dim, p.dtype, p.metric, tuple(p.index_dims))

    def commit_staged(self, fragments: list[Any]) -> int:
        """The rows of staged fragments as one commit (all visible at once, or none); returns how many."""
        if self._catalog is None or self._vectors is None:
            raise RuntimeError("this StagedWriter is closed")
        catalog, vectors = self._catalog, self._vectors
        staged = Fragments(fragments, self.shape())
        start = end = catalog.committed_rows()
        try:
            for batch in staged.vectors():
                vectors.append(end, batch)
                end += len(batch)
            catalog.append_tables(start, staged.catalog_tables(), end)
        except BaseException:
            if catalog.committed_rows() == start:  # never assume: the commit may have landed before the error
                vectors.truncate(start)
            raise
        return end - start

    def close(self) -> None:
        if self._vectors is not None:
            self._vectors.close()
            self._vectors = None
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
