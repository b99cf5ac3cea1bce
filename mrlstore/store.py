"""The public Store: orchestrates the Zarr bands, the HNSW prefix indexes, the DuckDB catalog and the search.

Commit protocol of a write (storage/FORMAT.md has the details):
1. validate the whole batch, before any I/O;
2. write the vectors into Zarr rows past the committed watermark, fsync;
3. insert them into the in-memory HNSW indexes (invisible: past every query's snapshot watermark);
4. one DuckDB transaction records ids, metadata, tombstones and the new watermark: the commit point;
   it and the publish of a new in-memory ``Snapshot`` run under an exclusive visibility lock that queries
   hold shared, so a query sees the catalog and memory of one moment.
The HNSW indexes are a cache: saved atomically now and then, rebuilt when untrustworthy.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias, overload

import numpy as np
import pyarrow as pa

from mrlstore._memory import release_freed_memory
from mrlstore._rwlock import RWLock
from mrlstore.encoder.protocol import Encoder
from mrlstore.errors import (
    CorruptStoreError,
    DuplicateIdError,
    EmptyStoreError,
    InvalidInputError,
    MRLStoreError,
    NotAStoreError,
    ReadOnlyError,
    ShapeError,
    StoreClosedError,
    StoreNotFoundError,
    UnknownIdError,
    UnsupportedStorageError,
    storage_error,
)
from mrlstore.inputs.arrow import ArrowIO, is_table
from mrlstore.inputs.images import ImageInputs, bundled_weights_id, is_single, looks_like_vectors
from mrlstore.inputs.images import check as check_images
from mrlstore.inputs.images import encode as encode_images
from mrlstore.inputs.images import expand as expand_images
from mrlstore.inputs.vectors import (
    dims_tuple,
    id_list,
    id_strings,
    metadata_table,
    positive_int,
    query_batch,
    stored_prefix,
    vector_batch,
)
from mrlstore.query import tuning
from mrlstore.query.funnel import Funnel, Plan, Snapshot
from mrlstore.results import Hits, HitsBatch, StoreInfo, TuneResult
from mrlstore.tiers.bands import BandedVectors, auto_chunk_rows
from mrlstore.tiers.catalog import DB_FILE, Catalog
from mrlstore.tiers.indexes import IndexCache
from mrlstore.tiers.layout import create_store, remove_stale_temporaries
from mrlstore.tiers.locking import NoLock, StoreLock
from mrlstore.tiers.params import BUNDLED_ENCODER, BUNDLED_ENCODER_DIM, StoreConfig, encoder_name
from mrlstore.tiers.rows import RowTable, kept_metadata
from mrlstore.upkeep.maintenance import Maintenance
from mrlstore.upkeep.versions import Versions

# What a type checker can tell apart (the rule itself runs on values: see mrlstore.inputs.images): a list of
# numbers is one vector, a list of lists a batch. numpy's shape types do not separate a 1-D from a 2-D array
# for mypy (a (2, 4) array matched a 1-D overload), so arrays, paths, images and columns are typed
# Hits | HitsBatch: narrow with isinstance.
OneVector: TypeAlias = list[float]
ManyVectors: TypeAlias = list[list[float]]

_FILTER_CACHE_SIZE = 256
_PLAN_CACHE_SIZE = 256
_TRIM_AFTER_BYTES = 4 << 20


class Store(IndexCache, ImageInputs, ArrowIO, Maintenance, Versions):
    """A Matryoshka embedding store; create or reopen one with :func:`mrlstore.open`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        dim: int | None = None,
        *,
        bands: Sequence[int] | None = None,
        metric: str | None = None,
        dtype: str | None = None,
        index_dims: Sequence[int] | None = None,
        chunk_rows: int | None = None,
        hnsw_m: int | None = None,
        ef_construction: int | None = None,
        read_only: bool = False,
        encoder: Encoder | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_dims: int = 0,
    ):
        self._remote = None
        if isinstance(path, str) and "://" in path:  # before anything touches the disk
            if not read_only:
                raise UnsupportedStorageError(
                    f"{path} is a URL: stores on object storage are read-only (open it with read_only=True); "
                    "write to a local store and upload it with store.publish(url)"
                )
            from mrlstore.tiers.objectstore import RemoteSource

            self._remote, self._cache_dir = RemoteSource(path, storage_options), cache_dir
            self._local_dims = local_dims
            path = self._remote.local_copy(cache_dir)  # the small parts; the bands stay remote
        self.path = Path(path)
        self.read_only = read_only
        self.encoder = encoder
        self._closed = True
        requested: dict[str, Any] = {
            "dim": dim if dim is not None else (encoder.dim if encoder is not None else None),
            "bands": tuple(bands) if bands is not None else None,
            "metric": metric,
            "dtype": dtype,
            "index_dims": tuple(index_dims) if index_dims is not None else None,
            "hnsw_m": hnsw_m,
            "ef_construction": ef_construction,
            "chunk_rows": chunk_rows,
        }
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            if read_only:
                raise StoreNotFoundError(f"no store at {self.path} (read_only=True never creates one)")
            if requested["dim"] is None:
                requested["dim"] = BUNDLED_ENCODER_DIM  # no dim, no encoder: images via the bundled encoder
            name = encoder_name(encoder, int(requested["dim"]), dim)
            weights = bundled_weights_id() if name == BUNDLED_ENCODER else None
            config = StoreConfig.new(requested, name, auto_chunk_rows, encoder_weights=weights)
            try:
                create_store(self.path, config)
            except OSError as e:
                if isinstance(e, MRLStoreError):
                    raise
                raise storage_error("create a store at", self.path, e) from e
        elif not self.path.is_dir() or not (self.path / DB_FILE).exists():
            raise NotAStoreError(f"{self.path} exists but is not an mrlstore store (no {DB_FILE} inside)")

        self._head = None
        if self._remote is not None:
            self._lock = NoLock()  # a local copy of a remote version: nobody writes it
        elif read_only:
            self._lock = self._reader_lock()  # readers of published versions take no StoreLock (versions.py)
        else:
            self._lock = StoreLock(self.path, exclusive=True)
        try:
            self._open(requested)
        except BaseException:
            if hasattr(self, "_catalog"):
                self._catalog.close()
            self._lock.release(remove_if_created=True)
            raise
        self._closed = False

    # -- opening -----------------------------------------------------------------------------------
    def _open(self, requested: dict[str, Any]) -> None:
        self._catalog = self._open_catalog()
        self.manifest = self._catalog.manifest()
        self.config = config = StoreConfig.from_manifest(self.manifest, self.path)
        config.check_requested(requested, self.path)
        self.dim, self.bands, self.metric = config.dim, config.bands, config.metric
        self.dtype, self.index_dims = config.dtype, config.index_dims
        watermark = int(self.manifest["committed_rows"])
        self._generation = int(self.manifest.get("generation", 0))  # compaction renumbers rows: a new one
        if "store_id" not in self.manifest and not self.read_only:  # stores made before store ids
            self._catalog.set_manifest("store_id", uuid.uuid4().hex)
            self.manifest = self._catalog.manifest()

        self._vectors = self._open_vectors()
        if not self.read_only:
            remove_stale_temporaries(self.path)
        if self._vectors.physical_rows() < watermark:  # the protocol grows Zarr before every commit
            raise CorruptStoreError(
                f"Zarr arrays hold {self._vectors.physical_rows()} rows but the catalog committed {watermark}"
            )
        if not self.read_only and not self._vectors.is_clean(watermark):
            self._vectors.truncate(watermark)  # leftovers of an append that never committed
        for band in self._vectors.bands:
            rc = band.chunk_rows
            for chunk in range(-(-watermark // rc)):
                band.mapped(chunk, min(rc, watermark - chunk * rc))  # CorruptStoreError if missing or short
        self._vectors.prefault(0, watermark)

        self._snap = self._load_snapshot(watermark, version=0)
        self._write_lock = threading.RLock()
        # Queries hold it shared from their snapshot to their last catalog read; a commit and its publish
        # hold it exclusively, so a query never mixes the catalog of one moment with memory of another.
        self._visibility = RWLock()
        self._filters: tuple[int, dict[str, np.ndarray]] = (-1, {})
        self._plans: dict[tuple, Plan] = {}
        self.index_status: dict[int, str] = {}
        self._indexes = {d: self._load_index(d, watermark) for d in self.index_dims}
        self._rows_since_save = {d: 0 for d in self.index_dims}
        self._funnel = Funnel(self._vectors, self._indexes, self.metric, config.ef_search)
        if not self.read_only:
            self._start_publishing()

    def _open_vectors(self) -> BandedVectors:
        if self._remote is not None:
            from mrlstore.tiers.objectstore import RemoteBands

            return RemoteBands(self.path, self.dim, self.bands, self.dtype, self._remote, self._local_dims)
        return BandedVectors(self.path, self.dim, self.bands, self.dtype)

    def _load_snapshot(self, watermark: int, version: int, catalog: Catalog | None = None) -> Snapshot:
        """The live mask and the in-memory ids and metadata, from the committed catalog."""
        live_rows, items = (catalog or self._catalog).live_items()
        if len(live_rows) and live_rows.max() >= watermark:
            raise CorruptStoreError("catalog lists rows past its own committed watermark")
        live = np.zeros(max(watermark, 1024), dtype=bool)
        live[live_rows] = True
        return Snapshot(version, watermark, live, len(live_rows), RowTable.from_catalog(live_rows, items, watermark))

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Save the index cache (writers), release the store. Safe to call twice."""
        if self._closed:
            return
        with self._write_lock:
            try:
                if not self.read_only:
                    self.checkpoint()
                    self._publisher.close()
            finally:
                with self._visibility.write():  # let queries in flight finish first
                    self._closed = True
                    self._catalog.close()
                    self._vectors.close()
                    self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __len__(self) -> int:
        self._check_open()
        return self._snap.n_live

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._snap.n_live} vectors"
        return f"<mrlstore.Store {self.location!r} dim={self.dim} metric={self.metric} {state}>"

    @property
    def location(self) -> str:
        """Where the store lives: its folder, or the URL of a store on object storage (whose small parts
        are cached in ``path``)."""
        return self._remote.url if self._remote is not None else str(self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.location} is closed")

    def _check_writable(self) -> None:
        if self.read_only:
            if self._remote is not None:
                raise ReadOnlyError(
                    f"store {self.location} is on object storage, which is read-only: write to a local store "
                    "and upload it with store.publish(url)"
                )
            raise ReadOnlyError(f"store {self.location} was opened with read_only=True")

    def info(self) -> StoreInfo:
        """Creation parameters, current state (rows, live vectors, index status) and the tuned settings."""
        self._check_open()
        snap = self._snap
        tuned = self.manifest.get("tuned")
        return StoreInfo(
            path=self.location,
            dim=self.dim,
            bands=self.bands,
            metric=self.metric,
            dtype=self.dtype,
            index_dims=self.index_dims,
            chunk_rows=self._vectors.chunk_rows,
            rows=snap.watermark,
            live=snap.n_live,
            deleted=snap.watermark - snap.n_live,
            index_status=dict(self.index_status),
            encoder=self.manifest.get("encoder"),
            read_only=self.read_only,
            version=self._remote.head["version"] if self._remote else self._head and self._head["version"],
            tuned=None if tuned is None else {key: value for key, value in tuned.items() if key != "tried"},
        )

    # -- writes ------------------------------------------------------------------------------------
    def add_vectors(
        self, vectors: Any, ids: Sequence[str] | None = None, metadata: Any = None, *, on_conflict: str = "error"
    ) -> list[str]:
        """Add new vectors (n x dim); returns their ids. Durable once it returns. ``on_conflict`` decides for
        ids already in the store: ``"error"`` (DuplicateIdError, nothing written), ``"skip"`` (those rows
        are left out; the others are added) or ``"replace"`` (as :meth:`upsert_vectors`)."""
        if on_conflict not in ("error", "skip", "replace"):
            raise InvalidInputError(f"on_conflict must be 'error', 'skip' or 'replace', got {on_conflict!r}")
        replace = on_conflict == "replace"
        return self._write(vectors, ids, metadata, replace=replace, keep_metadata=replace, skip=on_conflict == "skip")

    def upsert_vectors(
        self, vectors: Any, ids: Sequence[str], metadata: Any = None, keep_metadata: bool = True
    ) -> list[str]:
        """Add vectors, replacing the vector of any existing entry with the same id. A replaced entry keeps
        the old metadata values this call leaves out (columns or keys it does not give, nulls; everything
        without ``metadata``); ``keep_metadata=False`` drops them: the entry has only what this call gives."""
        if ids is None:
            raise InvalidInputError("upsert_vectors needs ids (which entries to replace)")
        return self._write(vectors, ids, metadata, replace=True, keep_metadata=keep_metadata)

    def _write(
        self, vectors: Any, ids: Any, metadata: Any, replace: bool, keep_metadata: bool = False, skip: bool = False
    ) -> list[str]:
        self._check_open()
        self._check_writable()
        batch = vector_batch(vectors, self.dim, self.dtype, self.metric, self.index_dims)
        id_batch = id_list(ids, len(batch))
        meta = metadata_table(metadata, len(batch))
        with self._write_lock:  # one writer: ids present now stay present until the commit
            rows, new_ids, new_meta = batch, id_batch, meta
            present = self._catalog.rows_of(id_batch) if skip and ids is not None else {}
            if present:  # on_conflict="skip": leave those rows out
                keep = np.array([i not in present for i in id_batch])
                rows, new_ids = batch[keep], [i for i in id_batch if i not in present]
                new_meta = None if meta is None else meta.filter(keep)
            if new_ids:
                self._commit([rows], new_ids, new_meta, replace, keep_metadata)
        if batch.nbytes >= _TRIM_AFTER_BYTES:
            release_freed_memory()
        return id_batch

    def _commit(
        self,
        batches: Iterable[np.ndarray],
        id_batch: list[str],
        meta: pa.Table | None,
        replace: bool,
        keep_metadata: bool,
    ) -> None:
        """Write the rows of ``batches`` (checked vectors, ``len(id_batch)`` rows in all, read one batch at a
        time) and commit them as one: queries and a reopen see all of them or none."""
        n = len(id_batch)
        with self._write_lock:
            self._check_open()
            existing = self._catalog.rows_of(id_batch)
            if existing and not replace:
                raise DuplicateIdError(
                    f"{len(existing)} id(s) already in the store, e.g. {sorted(existing)[:5]}; "
                    "pass on_conflict='skip' or 'replace' (or use upsert_vectors)"
                )
            if keep_metadata and existing:
                meta = kept_metadata(meta, self._snap.table.metadata_of([existing.get(i, -1) for i in id_batch]))
            if meta is not None:
                self._catalog.check_metadata(meta)
            start = self._snap.watermark
            replaced = np.fromiter(existing.values(), dtype=np.int64, count=len(existing))
            rows = np.arange(start, start + n, dtype=np.int64)
            try:
                end = start
                for batch in batches:
                    self._append(end, batch)
                    end += len(batch)
                if end != start + n:
                    raise ShapeError(f"got {end - start} vectors for {n} ids")
                with self._visibility.write():  # queries see all of this write or none of it
                    stored = self._catalog.commit_rows(start, id_batch, meta, start + n, replace_rows=replaced)
                    self._publish(rows, replaced, stored)
            except BaseException as e:
                # An interruption can land after DuckDB's COMMIT: ask the catalog, never assume.
                if self._catalog.committed_rows() == start:
                    try:
                        self._vectors.truncate(start)
                    except OSError:
                        pass  # a full disk: the leftovers past the watermark stay invisible, cleared on open
                    if isinstance(e, OSError) and not isinstance(e, MRLStoreError):
                        raise storage_error("write to the store", self.path, e) from e
                    raise
                self._resync_after_failure()  # committed: memory must catch up with the catalog
                raise
            self._autosave_indexes()
            self._publisher.committed()

    def _append(self, start: int, batch: np.ndarray) -> None:
        """Rows ``start``... of an uncommitted write: to the bands, and into the HNSW cache before the commit
        so the visibility lock stays short. Rows past the watermark are invisible to queries; if the commit
        fails they stay behind as dead labels that the next append of those rows overwrites."""
        self._vectors.append(start, batch)
        self._vectors.prefault(start, start + len(batch))
        rows = np.arange(start, start + len(batch), dtype=np.int64)
        for d, index in self._indexes.items():
            index.add(stored_prefix(batch, d, self.dtype), rows)

    def _resync_after_failure(self) -> None:
        """Rebuild the in-memory state (snapshot, indexes) from the committed catalog and the Zarr tier,
        after a failure between the commit and the in-memory update. If even that fails, the store
        closes: reopening recovers from disk."""
        try:
            watermark = self._catalog.committed_rows()
            self._snap = self._load_snapshot(watermark, self._snap.version + 1)
            self._indexes.clear()  # the funnel holds this dict: refill it in place
            self._indexes.update({d: self._load_index(d, watermark) for d in self.index_dims})
            self._rows_since_save = {d: 0 for d in self.index_dims}
        except BaseException:
            self._closed = True
            self._catalog.close()
            self._lock.release()
            raise

    def _publish(self, rows: np.ndarray, replaced: np.ndarray, stored: pa.Table) -> None:
        """Make a committed write visible in memory: a new snapshot (``stored``: the new rows' ids and
        metadata as the catalog stored them), and the indexes' watermark."""
        snap = self._snap
        start, end = int(rows[0]), int(rows[-1]) + 1
        live = snap.live
        if end > len(live):
            live = np.zeros(max(end, 2 * len(live)), dtype=bool)
            live[:start] = snap.live[:start]
        live[start:end] = True  # past the old watermark: no older snapshot reads these, so filled in place
        if len(replaced):
            live = live.copy()  # copy-on-write: an older snapshot keeps the replaced rows live
            live[replaced] = False
        n_live = snap.n_live + len(rows) - len(replaced)
        self._snap = Snapshot(snap.version + 1, end, live, n_live, snap.table.appended(stored))
        for d, index in self._indexes.items():
            index.covered_rows = end
            index.mark_deleted(replaced)
            self._rows_since_save[d] += len(rows)

    def delete(self, ids: Sequence[str], missing_ok: bool = False) -> int:
        """Delete entries by id; returns how many were deleted. Unknown ids raise unless ``missing_ok``."""
        self._check_open()
        self._check_writable()
        ids = id_strings([ids] if isinstance(ids, str) else ids)
        with self._write_lock:
            found = self._catalog.rows_of(ids)
            missing = [i for i in ids if i not in found]
            if missing and not missing_ok:
                raise UnknownIdError(f"{len(missing)} id(s) not in the store, e.g. {missing[:5]}")
            if not found:
                return 0
            rows = np.fromiter(found.values(), dtype=np.int64, count=len(found))
            with self._visibility.write():
                self._catalog.delete_rows(rows)
                snap = self._snap
                live = snap.live.copy()  # copy-on-write: a query in flight keeps its snapshot
                live[rows] = False
                self._snap = Snapshot(snap.version + 1, snap.watermark, live, snap.n_live - len(rows), snap.table)
                for d, index in self._indexes.items():
                    index.mark_deleted(rows)
                    self._rows_since_save[d] += 1
            self._publisher.committed()
        return len(rows)

    # -- reads -------------------------------------------------------------------------------------
    def get(self, ids: Sequence[str], dims: int | None = None) -> pa.Table:
        """Entries by id, in the order given: id, metadata columns and ``vector`` (the first ``dims``)."""
        self._check_open()
        ids = id_strings([ids] if isinstance(ids, str) else ids)
        d = dims_tuple(dims if dims is not None else self.dim, self.dim)[-1]
        table = self._catalog.items_for_ids(ids)
        if table.num_rows != len(ids):
            found = set(table.column("id").to_pylist())
            missing = [i for i in ids if i not in found]
            raise UnknownIdError(f"{len(missing)} id(s) not in the store, e.g. {missing[:5]}")
        rows = table.column("_row").to_numpy()
        vectors = self._vectors.gather(rows, 0, d)
        flat = pa.array(vectors.reshape(-1), pa.float32())
        table = table.drop_columns("_row").append_column("vector", pa.FixedSizeListArray.from_arrays(flat, d))
        return table

    def sql(self, query: str) -> pa.Table:
        """Run one read-only SELECT over the catalog (table/view ``items``: id and metadata columns)."""
        self._check_open()
        return self._catalog.sql(query)

    @overload
    def query(
        self, query: OneVector, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
    ) -> Hits: ...  # fmt: skip
    @overload
    def query(
        self, query: ManyVectors, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
    ) -> HitsBatch: ...  # fmt: skip
    @overload
    def query(
        self, query: Any, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
    ) -> Hits | HitsBatch: ...  # fmt: skip
    def query(
        self,
        query: Any,
        k: int = 10,
        dims: Sequence[int] | int | None = None,
        *,
        where: str | None = None,
        shortlist: int | Sequence[int] | None = None,
        ef: int | None = None,
        metadata: bool = True,
    ) -> Hits | HitsBatch:
        """Coarse-to-fine search: shortlist on ``dims[0]``, re-rank on each longer prefix.

        One rule: one query (a 1-D vector, a single image) gives one :class:`Hits`; a batch (a 2-D array,
        a vector column, several images or a folder) gives a :class:`HitsBatch`, one Hits per query (a
        list; ``to_arrow()`` makes one table). ``where`` is a
        DuckDB boolean expression over the metadata columns. ``shortlist`` sets the survivors of each stage
        but the last (an int halves along the funnel); without it, the setting ``tune`` measured for this
        funnel shape applies (``dims`` omitted: the tuned fastest shape). ``ef`` overrides the HNSW beam.
        """
        self._check_open()
        plan = self._plan(dims, k, shortlist, ef)
        queries, single = self._query_vectors(query, plan.dims[-1])
        with self._visibility.read():  # one point in time: the snapshot and catalog reads agree
            self._check_open()
            snap = self._snap
            if snap.n_live == 0:
                raise EmptyStoreError(f"store {self.location} holds no vectors to search")
            allowed = self._allowed(where, snap) if where is not None else None
            rows, offsets, scores = self._funnel.run(snap, queries, plan, allowed)
        hits = snap.hits(rows, offsets, scores, plan.dims, metadata)
        return hits[0] if single else hits

    def _plan(self, dims: Any, k: Any, shortlist: Any, ef: Any) -> Plan:
        """The query plan for these arguments; validated plans are remembered (cleared by ``tune``)."""
        key = tuning.plan_key(dims, k, shortlist, ef)
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            plan = tuning.make_plan(self.manifest.get("tuned"), dims, k, shortlist, ef, self.index_dims, self.dim)
            if key is not None:
                if len(self._plans) >= _PLAN_CACHE_SIZE:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _query_vectors(self, query: Any, need: int) -> tuple[np.ndarray, bool]:
        if looks_like_vectors(query, self.dim) or (self._no_encoder() and looks_like_vectors(query)):
            return query_batch(query, need, self.dim, self.metric)
        if is_table(query):
            raise InvalidInputError(
                f"query() takes vectors or images, got a {type(query).__name__}: for a table of queries use "
                "query_table(table, vector='embedding') (or image='<column>')"
            )
        encoder = self._image_encoder()
        vectors, _ = encode_images(encoder, check_images(expand_images(query), skip_errors=False)[0], 64, None)
        return query_batch(vectors, need, self.dim, self.metric)[0], is_single(query)

    def _allowed(self, where: str, snap: Snapshot) -> np.ndarray:
        """Live rows of ``snap`` matching ``where``; evaluated once per expression and snapshot version."""
        version, cache = self._filters
        if version != snap.version:
            cache = {}
            self._filters = (snap.version, cache)
        allowed = cache.get(where)
        if allowed is None:
            allowed = self._catalog.filter_rows(where)
            allowed = allowed[(allowed >= 0) & (allowed < snap.watermark)]
            allowed = allowed[snap.live[allowed]]
            if len(cache) < _FILTER_CACHE_SIZE:
                cache[where] = allowed
        return allowed

    def tune(
        self,
        recall: float = 0.95,
        k: int = 10,
        sample: int = 200,
        dims: Sequence[int] | None = None,
        seed: int = 0,
        queries: Any = None,
    ) -> TuneResult:
        """For every funnel shape users pass (each indexed prefix straight to ``dim``, and through the band
        edges), measure the cheapest first-stage shortlist (and HNSW beam) whose recall@k against exact
        full-``dim`` search reaches ``recall``, on ``sample`` of the store's own rows as queries (each one's
        own row excluded), or on up to ``sample`` of ``queries`` (full-``dim`` vectors or images like those
        users will send: a store's own rows can be easier to find than new photos). Persisted: ``query``
        uses the setting of the shape it runs (``dims`` omitted: the fastest shape that reached the
        target). Shapes that miss the target within the shortlist budget keep their best effort and are
        named in a warning; when none reaches it, TuningError is raised and the previous settings stay."""
        self._check_open()
        self._check_writable()
        held_out = self._query_vectors(queries, self.dim)[0] if queries is not None else None
        k = positive_int(k, "k")
        if not 0 < recall <= 1:
            raise InvalidInputError(f"recall must be in (0, 1], got {recall}")
        sample = positive_int(sample, "sample")
        shapes = (
            [dims_tuple(dims, self.dim)]
            if dims is not None
            else tuning.funnel_shapes(self.index_dims, self.bands, self.dim)
        )
        with self._write_lock:
            snap = self._snap
            if snap.n_live <= k + 1:
                raise EmptyStoreError(f"tuning needs more than k+1={k + 1} vectors, the store holds {snap.n_live}")
            choice = tuning.tune(
                self._funnel, snap, shapes, recall, k, sample, seed, self.dim,
                lambda rows: self._vectors.gather(rows, 0, self.dim), held_out,
            )  # fmt: skip
            self._catalog.set_manifest("tuned", choice)
            self.manifest["tuned"] = choice
            self._plans = {}
            self._publisher.committed()
        return TuneResult(**choice)


def open(  # noqa: A001 - mirrors the builtin on purpose: mrlstore.open(path)
    path: str | os.PathLike[str],
    dim: int | None = None,
    *,
    bands: Sequence[int] | None = None,
    metric: str | None = None,
    dtype: str | None = None,
    index_dims: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    read_only: bool = False,
    encoder: Encoder | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_dims: int = 0,
) -> Store:
    """Open the store at ``path``, creating it when absent.

    A new store takes its ``dim`` from ``dim``, else from ``encoder``, else it is a 2048-d store for the
    bundled MRL image encoder (loaded on the first ``add``/``query`` of images).

    Creation parameters (``dim``, ``bands``, ``metric`` = "cosine" | "ip" | "l2", ``dtype`` = "float16" |
    "float32", ``index_dims`` (default: 16 and 32), ``chunk_rows``, ``hnsw_m`` (default 16, and 8 for
    prefixes of at most 16 dims; a given value applies to every index), ``ef_construction``) are
    persisted; passing a different value on reopen raises :class:`ConfigMismatchError`.

    ``path`` may be an ``s3://bucket/prefix`` URL where :meth:`Store.publish` uploaded a store: it opens
    ``read_only=True``, with credentials and endpoint from ``storage_options`` (pyarrow's or s3fs's names:
    ``key``, ``secret``, ``endpoint_url``, ``region``...) or the AWS environment variables; the small parts
    are downloaded once into ``cache_dir`` (default ``~/.cache/mrlstore``), the vectors read as queries need;
    bands ending at or before ``local_dims`` (e.g. 256) are downloaded whole into the cache instead, so a
    query fetches only its last stages' rows.
    """
    return Store(
        path,
        dim,
        bands=bands,
        metric=metric,
        dtype=dtype,
        index_dims=index_dims,
        chunk_rows=chunk_rows,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        read_only=read_only,
        encoder=encoder,
        storage_options=storage_options,
        cache_dir=cache_dir,
        local_dims=local_dims,
    )
