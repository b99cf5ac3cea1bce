"""``where=`` filters: the live rows of a snapshot matching a DuckDB expression over the metadata (the
catalog's sandbox keeps the expression inside the store's tables), evaluated once per expression and
snapshot version."""

from __future__ import annotations

import numpy as np

from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.snapshot import Snapshot

FILTER_CACHE_SIZE = 256


class FilterCache:
    """Rows matching each ``where`` expression, for the newest snapshot version asked about."""

    def __init__(self) -> None:
        self._cache: tuple[int, dict[str, np.ndarray]] = (-1, {})

    def allowed(self, catalog: Catalog, where: str, snap: Snapshot) -> np.ndarray:
        """Live rows of ``snap`` matching ``where`` (ascending)."""
        version, cache = self._cache
        if version != snap.version:
            cache = {}
            self._cache = (snap.version, cache)
        allowed = cache.get(where)
        if allowed is None:
            allowed = catalog.filter_rows(where)
            allowed = allowed[(allowed >= 0) & (allowed < snap.watermark)]
            allowed = allowed[snap.live[allowed]]
            if len(cache) < FILTER_CACHE_SIZE:
                cache[where] = allowed
        return allowed
