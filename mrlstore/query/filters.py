"""``where=`` filters: the live rows of a snapshot matching a DuckDB expression over the metadata (the
catalog's sandbox keeps the expression inside the store's tables), evaluated once per expression and
snapshot version."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.snapshot import Snapshot

FILTER_CACHE_SIZE = 256  # expressions kept, the least recently used going first
FILTER_CACHE_BYTES = 128 << 20  # and their rows at most this much: 8 bytes a matching row


class FilterCache:
    """Rows matching each ``where`` expression, for the newest snapshot version asked about. Bounded in
    entries and bytes (256 filters matching most of a 400k-row store held 781 MiB)."""

    def __init__(self) -> None:
        self._version = -1
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # queries from several threads

    def allowed(self, catalog: Catalog, where: str, snap: Snapshot) -> np.ndarray:
        """Live rows of ``snap`` matching ``where`` (ascending)."""
        with self._lock:
            if self._version != snap.version:
                self._version, self._cache, self._bytes = snap.version, OrderedDict(), 0
            allowed = self._cache.get(where)
            if allowed is not None:
                self._cache.move_to_end(where)
                return allowed
        allowed = catalog.filter_rows(where)
        allowed = allowed[(allowed >= 0) & (allowed < snap.watermark)]
        allowed = allowed[snap.live[allowed]]
        self._keep(where, allowed, snap.version)
        return allowed

    def _keep(self, where: str, allowed: np.ndarray, version: int) -> None:
        with self._lock:
            if version != self._version or allowed.nbytes > FILTER_CACHE_BYTES or where in self._cache:
                return
            self._cache[where] = allowed
            self._bytes += allowed.nbytes
            while len(self._cache) > FILTER_CACHE_SIZE or self._bytes > FILTER_CACHE_BYTES:
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= dropped.nbytes
