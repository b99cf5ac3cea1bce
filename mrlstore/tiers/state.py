"""An open store: its tiers (catalog, bands, prefix indexes) and the in-memory view of its last commit, the
state the Store's components share.

Components read these attributes. The writer replaces ``snap`` at each commit and the upkeep components
swap whole tiers (a compaction, a newer version), always holding ``visibility`` exclusively; queries hold
it shared from their snapshot to their last catalog read, so they never mix two moments. ``write_lock``
admits one writer (and one refresh or upkeep job) at a time.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from mrlstore._rwlock import RWLock
from mrlstore.errors import CorruptStoreError, MRLStoreError, StoreClosedError, storage_error
from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.indexes import IndexSet, default_first_stage
from mrlstore.tiers.layout import remove_stale_temporaries
from mrlstore.tiers.params import StoreParams
from mrlstore.tiers.projection import Projection
from mrlstore.tiers.snapshot import Snapshot, load_snapshot


class HeldLock(Protocol):
    """What keeps other processes off the store while it is open (a StoreLock, a reader's registration)."""

    def release(self, remove_if_created: bool = False) -> None: ...


class StoreState:
    """The open tiers of one store and the snapshot of its last commit (see the module's docstring)."""

    def __init__(
        self,
        path: Path,
        read_only: bool,
        params: StoreParams,
        manifest: dict[str, Any],
        catalog: Catalog,
        vectors: VectorTier,
        snap: Snapshot,
        indexes: IndexSet,
    ):
        self.path, self.read_only, self.params, self.manifest = path, read_only, params, manifest
        self.catalog, self.vectors, self.snap, self.indexes = catalog, vectors, snap, indexes
        self.write_lock = threading.RLock()
        self.visibility = RWLock()
        self.lock: HeldLock | None = None
        self.closed = False
        self.closing = False  # close() is waiting for the write lock: later calls are refused, not queued
        self.closed_because = ""  # said by check_open when the store was closed by a failure, not by close()
        self.location = str(path)  # what messages name: the folder, or the URL of a store on object storage

    @property
    def generation(self) -> int:
        """The row numbering's generation: a compaction renumbers rows and starts a new one."""
        return int(self.manifest.get("generation", 0))

    @contextmanager
    def reading(self) -> Iterator[None]:
        """``visibility`` shared, on a store still open once it is held (a close that ran while the caller
        waited is StoreClosedError, not a call on closed files)."""
        with self.visibility.read():
            self.check_open()
            yield

    @contextmanager
    def writing(self) -> Iterator[None]:
        """``write_lock``, on a store still open once it is held (see ``reading``)."""
        with self.write_lock:
            self.check_open()
            yield

    def check_open(self) -> None:
        if self.closed or self.closing:
            because = f": {self.closed_because}" if self.closed_because else ""
            raise StoreClosedError(f"store {self.location} is closed{because}")

    def adopt(self, other: StoreState) -> None:
        """Take ``other``'s tiers (just opened on the files that replaced these); locks stay. The caller holds
        ``visibility`` exclusively and has closed the old tiers."""
        self.path, self.params, self.manifest = other.path, other.params, other.manifest
        self.catalog, self.vectors, self.snap, self.indexes = other.catalog, other.vectors, other.snap, other.indexes

    def close_tiers(self) -> None:
        self.catalog.close()
        self.vectors.close()

    def close_for_good(self) -> None:
        """``close()``: the tiers closed, the lock released, the indexes out of memory (a closed handle the
        application keeps referenced held them)."""
        self.closed = True
        self.close_tiers()
        self.indexes.release()
        if self.lock is not None:
            self.lock.release()

    def shut(self, because: str = "") -> None:
        """Close everything now, after a failure: one that left memory behind the catalog (reopening
        recovers), or tiers that could not be opened again (``because`` says so to later calls)."""
        self.closed, self.closed_because = True, because
        self.catalog.close()  # closing it twice is harmless
        if self.lock is not None:
            self.lock.release()


def open_state(
    path: Path,
    read_only: bool,
    requested: dict[str, Any],
    catalog: Catalog,
    open_bands: Callable[[StoreParams], VectorTier],
    version: int = 0,
    checked: Mapping[str, str] = {},
    fetch: Callable[[str], str | None] | None = None,
) -> StoreState:
    """Open the tiers of the store at ``path`` whose committed state is ``catalog`` (the live catalog, or a
    reader's published version): check the requested creation parameters, check and clean the bands
    (leftovers past the watermark cut by writers), load the snapshot and the prefix indexes (``checked``,
    ``fetch``: see IndexSet)."""
    manifest = catalog.manifest()
    params = StoreParams.from_manifest(manifest, path)
    params.check_requested(requested, path)
    if "store_id" not in manifest and not read_only:  # stores made before store ids
        catalog.set_manifest("store_id", uuid.uuid4().hex)
        manifest = catalog.manifest()
    watermark = int(manifest["committed_rows"])
    vectors = open_bands(params)  # a remote tier's near bands may still be downloading: map_committed waits
    try:
        if read_only:
            check_rows(vectors, watermark)
        else:
            clear_uncommitted(path, vectors, catalog)
            manifest = catalog.manifest()  # without the mark of a write that died
        snap = load_snapshot(catalog.live_items(), watermark, version)
        indexes = IndexSet(path, params, int(manifest.get("generation", 0)), read_only, checked, fetch)
        load_indexes(indexes, manifest, snap, vectors, catalog)
        vectors.map_committed(watermark)  # CorruptStoreError if a file is missing or short
        vectors.prefault(0, watermark)
    except BaseException:
        vectors.close()
        raise
    return StoreState(path, read_only, params, manifest, catalog, vectors, snap, indexes)


def load_indexes(
    indexes: IndexSet, manifest: dict[str, Any], snap: Snapshot, vectors: VectorTier, catalog: Catalog
) -> None:
    """Load ``indexes`` as ``manifest`` names them (its fit, and what a reader loads first) up to ``snap``."""
    projection = projection_of(manifest, indexes.params)
    first = default_first_stage(manifest, indexes.params, projection)
    indexes.load(snap, vectors, catalog.tombstones(), projection, first)


def reload_indexes(state: StoreState) -> None:
    """Load the indexes the committed manifest names, the catalog and bands staying open (after
    ``set_index_dims``: a scan or export in another thread goes on); queries wait only for the swap. The
    caller holds the write lock."""
    manifest = state.catalog.manifest()
    params = StoreParams.from_manifest(manifest, state.path)
    indexes = IndexSet(state.path, params, state.generation, state.read_only)
    load_indexes(indexes, manifest, state.snap, state.vectors, state.catalog)
    with state.visibility.write():
        state.params, state.manifest, state.indexes = params, manifest, indexes


def check_rows(vectors: VectorTier, watermark: int) -> None:
    if vectors.physical_rows() < watermark:  # the protocol grows Zarr before every commit
        held = vectors.physical_rows()
        raise CorruptStoreError(f"Zarr arrays hold {held} rows but the catalog committed {watermark}")


def clear_uncommitted(path: Path, vectors: VectorTier, catalog: Catalog) -> None:
    """A writer's open: temporaries, catalog rows and band rows of appends that never committed go
    (CorruptStoreError when the bands hold fewer rows than the catalog committed)."""
    catalog.discard_staged()
    watermark = catalog.committed_rows()
    staged_write_left = remove_stale_temporaries(path)
    check_rows(vectors, watermark)
    # its workers may have written rows past the watermark inside the last chunk, which is_clean cannot see
    if staged_write_left or not vectors.is_clean(watermark):
        try:
            vectors.truncate(watermark)  # leftovers of an append that never committed
        except MRLStoreError:
            raise
        except OSError as e:
            raise storage_error("clear the rows of a write that never committed from", path, e) from None


def projection_of(manifest: dict[str, Any], params: StoreParams) -> Projection | None:
    """The store's fitted projection (None: raw prefixes only)."""
    entry = manifest.get("fit")
    return None if entry is None else Projection.from_manifest(entry, params.dim)
