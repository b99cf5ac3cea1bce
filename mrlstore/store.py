"""The public Store: orchestrates the Zarr bands, the HNSW prefix indexes and the DuckDB catalog.

Commit protocol of a write (storage/FORMAT.md has the details):
1. validate the whole batch, before any I/O;
2. write the vectors into Zarr rows past the committed watermark, fsync;
3. insert them into the in-memory HNSW indexes (invisible: past every query's snapshot watermark);
4. one DuckDB transaction records ids, metadata, tombstones and the new watermark: the commit point;
   it and the in-memory publish run under an exclusive visibility lock that queries hold shared.
The HNSW indexes are a cache: saved atomically now and then, rebuilt when untrustworthy.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import funnel
from ._cast import as_float32
from ._fsutil import fsync_dir, fsync_file
from ._rwlock import RWLock
from .catalog import DB_FILE, Catalog
from .encoding import Encoder, looks_like_vectors, source_paths
from .errors import (
    ConfigMismatchError,
    CorruptStoreError,
    DuplicateIdError,
    EmptyStoreError,
    EncoderUnavailableError,
    InvalidInputError,
    InvalidKError,
    NotAStoreError,
    ReadOnlyError,
    StoreClosedError,
    StoreNotFoundError,
    UnknownIdError,
)
from .hits import Hits
from .hnsw_index import IndexUnusable, PrefixIndex
from .locking import LOCK_FILE, StoreLock
from .validation import (
    dims_tuple,
    id_list,
    id_strings,
    metadata_table,
    positive_int,
    query_batch,
    stored_prefix,
    vector_batch,
)
from .zarr_bands import BandedVectors, auto_chunk_rows, band_edges, create_bands

FORMAT_NAME = "mrlstore"
FORMAT_VERSION = 1
BUNDLED_ENCODER = "bundled"
BUNDLED_ENCODER_DIM = 2048
INDEX_DIR = "index"
SCAN_BLOCK_ROWS = 65536
# A where= filter matching at most this many rows (or this share of the store) is answered by an exact
# scan of those rows; larger ones use the HNSW index with over-fetching.
FILTER_EXACT_ROWS = 50_000
FILTER_EXACT_SHARE = 0.05
# Save the HNSW cache once this many rows were added since the last save (bounds rebuild work after a crash).
INDEX_AUTOSAVE_ROWS = 100_000
_REFINE_POOL: ThreadPoolExecutor | None = None
_REFINE_POOL_LOCK = threading.Lock()


def _refine_pool() -> ThreadPoolExecutor:
    """Shared threads for re-ranking a batch of queries: numpy releases the GIL in the gathers, casts
    and products that dominate a re-rank, so a batch uses every core."""
    global _REFINE_POOL
    with _REFINE_POOL_LOCK:
        if _REFINE_POOL is None:
            _REFINE_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mrlstore-refine")
        return _REFINE_POOL


def default_bands(dim: int) -> tuple[int, ...]:
    return (*[b for b in (16, 64, 256) if b < dim], dim)


class Store:
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
    ):
        self.path = Path(path)
        self.read_only = read_only
        self.encoder = encoder
        self._closed = True
        requested = {
            "dim": dim if dim is not None else (encoder.dim if encoder is not None else None),
            "bands": tuple(bands) if bands is not None else None,
            "metric": metric,
            "dtype": dtype,
            "index_dims": tuple(index_dims) if index_dims is not None else None,
            "hnsw_M": hnsw_m,
            "hnsw_ef_construction": ef_construction,
            "chunk_rows": chunk_rows,
        }
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            if read_only:
                raise StoreNotFoundError(f"no store at {self.path} (read_only=True never creates one)")
            if requested["dim"] is None:
                requested["dim"] = BUNDLED_ENCODER_DIM  # no dim, no encoder: images via the bundled encoder
            _create(self.path, requested, encoder_name(encoder, requested["dim"], dim))
        elif not self.path.is_dir() or not (self.path / DB_FILE).exists():
            raise NotAStoreError(f"{self.path} exists but is not an mrlstore store (no {DB_FILE} inside)")

        self._lock = StoreLock(self.path, exclusive=not read_only)
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
        self._catalog = Catalog(self.path, read_only=self.read_only)
        m = self._catalog.manifest()
        if m.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{self.path} holds a DuckDB file that is not an mrlstore catalog")
        if m.get("format_version") != FORMAT_VERSION:
            raise CorruptStoreError(
                f"{self.path} has format version {m.get('format_version')}; this mrlstore reads {FORMAT_VERSION}"
            )
        for key, value in requested.items():
            stored = tuple(m[key]) if isinstance(m.get(key), list) else m.get(key)
            if key == "chunk_rows" and value is not None and set(stored) == {value}:
                continue  # one size for every band, as given at creation
            if key == "index_dims" and value is not None and tuple(sorted(value)) == stored:
                continue  # kept sorted
            if value is not None and value != stored:
                raise ConfigMismatchError(f"{self.path} was created with {key}={stored!r}, not {value!r}")
        self.manifest = m
        self.dim: int = m["dim"]
        self.bands: tuple[int, ...] = tuple(m["bands"])
        self.metric: str = m["metric"]
        self.dtype: str = m["dtype"]
        self.index_dims: tuple[int, ...] = tuple(m["index_dims"])
        self._ef_search: int = m["hnsw_ef_search"]
        watermark = int(m["committed_rows"])

        self._vectors = BandedVectors(self.path, self.dim, self.bands, self.dtype)
        if not self.read_only:
            _remove_stale_temporaries(self.path)
        if self._vectors.physical_rows() < watermark:  # the protocol grows Zarr before every commit
            raise CorruptStoreError(
                f"Zarr arrays hold {self._vectors.physical_rows()} rows but the catalog committed {watermark}"
            )
        if not self.read_only and not self._vectors.is_clean(watermark):
            self._vectors.truncate(watermark)  # leftovers of an append that never committed
        self._check_chunk_files(watermark)

        self._load_live_state(watermark)
        self._write_lock = threading.RLock()
        # Queries hold it shared from their snapshot to their last catalog read; a commit and its in-memory
        # publish hold it exclusively, so a query never mixes the catalog of one moment with memory of another.
        self._visibility = RWLock()
        self.index_status: dict[int, str] = {}
        self._indexes = {d: self._load_index(d, watermark) for d in self.index_dims}
        self._rows_since_save = {d: 0 for d in self.index_dims}

    def _load_live_state(self, watermark: int) -> None:
        """The in-memory id map, live mask, live count and watermark, from the committed catalog."""
        live_rows, live_ids = self._catalog.live_rows()
        if len(live_rows) and live_rows.max() >= watermark:
            raise CorruptStoreError("catalog lists rows past its own committed watermark")
        cap = max(watermark, 1024)
        ids_by_row = np.empty(cap, dtype=object)
        live = np.zeros(cap, dtype=bool)
        ids_by_row[live_rows] = live_ids
        live[live_rows] = True
        self._ids_by_row, self._live, self._n_live = ids_by_row, live, len(live_rows)
        self._watermark = watermark

    def _check_chunk_files(self, watermark: int) -> None:
        for band in self._vectors.bands:
            for chunk in range(-(-watermark // band.chunk_rows)):
                band.mapped(chunk)  # raises CorruptStoreError if missing or truncated

    def _index_base(self, d: int) -> Path:
        return self.path / INDEX_DIR / f"prefix_{d:05d}"

    def _load_index(self, d: int, watermark: int) -> PrefixIndex:
        m = self.manifest
        try:
            index = PrefixIndex.load(self._index_base(d), d, self.metric, m["hnsw_M"], m["hnsw_ef_construction"])
            if index.covered_rows > watermark:
                raise IndexUnusable(f"index covers {index.covered_rows} rows, catalog committed {watermark}")
            status = "loaded" if index.covered_rows == watermark else "extended"
        except IndexUnusable:
            index = PrefixIndex(d, self.metric, m["hnsw_M"], m["hnsw_ef_construction"], capacity=watermark + 1024)
            status = "rebuilt"
        start = index.covered_rows
        for lo in range(start, watermark, SCAN_BLOCK_ROWS):
            hi = min(lo + SCAN_BLOCK_ROWS, watermark)
            keep = np.flatnonzero(self._live[lo:hi])
            index.add(self._vectors.read_range(lo, hi, 0, d)[keep], keep + lo, covered_rows=hi)
        index.covered_rows = watermark
        dead = self._catalog.tombstones()
        index.mark_deleted(dead[dead < start])
        self.index_status[d] = status
        if status != "loaded" and not self.read_only:
            self._save_index(d, index)
        return index

    def _save_index(self, d: int, index: PrefixIndex) -> None:
        (self.path / INDEX_DIR).mkdir(exist_ok=True)
        index.save(self._index_base(d))

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Save the index cache (writers), release the store. Safe to call twice."""
        if self._closed:
            return
        with self._write_lock:
            try:
                if not self.read_only:
                    self.checkpoint()
            finally:
                with self._visibility.write():  # let queries in flight finish first
                    self._closed = True
                    self._catalog.close()
                    self._vectors.close()
                    self._lock.release()

    def checkpoint(self) -> None:
        """Save every HNSW index that changed since its last save (atomically)."""
        self._check_open()
        self._check_writable()
        with self._write_lock:
            for d, index in self._indexes.items():
                if self._rows_since_save[d]:
                    self._save_index(d, index)
                    self._rows_since_save[d] = 0

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
        return self._n_live

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._n_live} vectors"
        return f"<mrlstore.Store {str(self.path)!r} dim={self.dim} metric={self.metric} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"store {self.path} was opened with read_only=True")

    def info(self) -> dict[str, Any]:
        """Creation parameters and current state (rows, live vectors, index status)."""
        self._check_open()
        return {
            "path": str(self.path),
            "dim": self.dim,
            "bands": self.bands,
            "metric": self.metric,
            "dtype": self.dtype,
            "index_dims": self.index_dims,
            "chunk_rows": self._vectors.chunk_rows,
            "rows": self._watermark,
            "live": self._n_live,
            "deleted": self._watermark - self._n_live,
            "index_status": dict(self.index_status),
            "encoder": self.manifest.get("encoder"),
            "read_only": self.read_only,
        }

    # -- writes ------------------------------------------------------------------------------------
    def add_vectors(self, vectors: Any, ids: Sequence[str] | None = None, metadata: Any = None) -> list[str]:
        """Add new vectors (n x dim); returns their ids. Durable once it returns."""
        return self._write(vectors, ids, metadata, replace=False)

    def upsert_vectors(self, vectors: Any, ids: Sequence[str], metadata: Any = None) -> list[str]:
        """Add vectors, replacing (vector and metadata) any existing entry with the same id."""
        if ids is None:
            raise InvalidInputError("upsert_vectors needs ids (which entries to replace)")
        return self._write(vectors, ids, metadata, replace=True)

    def add(
        self,
        images: Any,
        ids: Sequence[str] | None = None,
        metadata: Any = None,
        batch_size: int = 64,
    ) -> list[str]:
        """Encode images with the store's encoder and add them (file paths are kept as ``path``)."""
        self._check_open()
        self._check_writable()
        vectors = self._encode(images, batch_size)
        paths = source_paths(images)
        if paths is not None:
            meta = metadata_table(metadata, len(paths)) if metadata is not None else None
            column = pa.array(paths, pa.string())
            meta = pa.table({"path": column}) if meta is None else meta.append_column("path", column)
            if meta.column_names.count("path") > 1:
                meta = meta.drop_columns("path").append_column("path", column)
            metadata = meta
        return self.add_vectors(vectors, ids=ids, metadata=metadata)

    def _encode(self, images: Any, batch_size: int) -> np.ndarray:
        if self.encoder is None and self.manifest.get("encoder") == BUNDLED_ENCODER:
            from .encoder import load_encoder  # imports torch: only when images are first encoded

            self.encoder = load_encoder()
        if self.encoder is None:
            raise EncoderUnavailableError(
                "this store has no encoder: pass encoder=... to mrlstore.open(), or add vectors with add_vectors()"
            )
        if getattr(self.encoder, "dim", self.dim) != self.dim:
            raise EncoderUnavailableError(f"the encoder makes {self.encoder.dim}-d vectors, the store holds {self.dim}")
        return np.asarray(self.encoder.encode(images, batch_size=batch_size), dtype=np.float32)

    def _write(self, vectors: Any, ids: Any, metadata: Any, replace: bool) -> list[str]:
        self._check_open()
        self._check_writable()
        batch = vector_batch(vectors, self.dim, self.dtype, self.metric, self.index_dims)
        n = len(batch)
        id_batch = id_list(ids, n)
        meta = metadata_table(metadata, n)
        with self._write_lock:
            self._check_open()
            existing = self._catalog.rows_of(id_batch)
            if existing and not replace:
                raise DuplicateIdError(
                    f"{len(existing)} id(s) already in the store, e.g. {sorted(existing)[:5]}; "
                    "use upsert_vectors to replace them"
                )
            if meta is not None:
                self._catalog.check_metadata(meta)
            start = self._watermark
            replaced = np.fromiter(existing.values(), dtype=np.int64, count=len(existing))
            rows = np.arange(start, start + n, dtype=np.int64)
            try:
                self._vectors.append(start, batch)
                # Into the HNSW cache before the commit, so the visibility lock below stays short. Rows past
                # the watermark are invisible to queries; if the commit fails they stay behind as dead
                # labels that the next append of those rows overwrites.
                for d, index in self._indexes.items():
                    index.add(stored_prefix(batch, d, self.dtype), rows)
                with self._visibility.write():  # queries see all of this write or none of it
                    self._catalog.commit_rows(start, id_batch, meta, start + n, replace_rows=replaced)
                    self._publish(start, id_batch, replaced)
            except BaseException:
                # An interruption can land after DuckDB's COMMIT: ask the catalog, never assume.
                if self._catalog.committed_rows() == start:
                    self._vectors.truncate(start)
                    raise
                self._resync_after_failure()  # committed: memory must catch up with the catalog
                raise
            self._autosave_indexes()
        return id_batch

    def _resync_after_failure(self) -> None:
        """Rebuild the in-memory state (id map, live mask, watermark, indexes) from the committed
        catalog and the Zarr tier, after a failure between the commit and the in-memory update. If even
        that fails, the store closes: reopening recovers from disk."""
        try:
            watermark = self._catalog.committed_rows()
            self._load_live_state(watermark)
            self._indexes = {d: self._load_index(d, watermark) for d in self.index_dims}
            self._rows_since_save = {d: 0 for d in self.index_dims}
        except BaseException:
            self._closed = True
            self._catalog.close()
            self._lock.release()
            raise

    def _publish(self, start: int, ids: list[str], replaced: np.ndarray) -> None:
        """Make a committed write visible in memory: id map, live mask, index watermark, then the watermark."""
        n = len(ids)
        end = start + n
        if end > len(self._live):
            cap = max(end, 2 * len(self._live))
            ids_by_row = np.empty(cap, dtype=object)
            ids_by_row[:start] = self._ids_by_row[:start]
            live = np.zeros(cap, dtype=bool)
            live[:start] = self._live[:start]
            self._ids_by_row, self._live = ids_by_row, live
        self._ids_by_row[start:end] = ids
        self._live[start:end] = True
        for d, index in self._indexes.items():
            index.covered_rows = end
            self._rows_since_save[d] += n
        if len(replaced):
            self._hide(replaced)
        self._n_live += n - len(replaced)
        self._watermark = end

    def _autosave_indexes(self) -> None:
        for d, index in self._indexes.items():
            if self._rows_since_save[d] >= INDEX_AUTOSAVE_ROWS:
                self._save_index(d, index)
                self._rows_since_save[d] = 0

    def _hide(self, rows: np.ndarray) -> None:
        live = self._live.copy()  # copy-on-write: a concurrent query sees all or none of a delete
        live[rows] = False
        self._live = live
        for d, index in self._indexes.items():
            index.mark_deleted(rows)
            self._rows_since_save[d] += 1

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
                self._hide(rows)
                self._n_live -= len(rows)
        return len(rows)

    def snapshot(self, dest: str | os.PathLike[str]) -> Path:
        """Write a consistent copy of the store to ``dest`` (which must not exist) and return its path.

        DuckDB lets no other process open a store while its writer has it; a snapshot is how other
        processes read meanwhile: ``mrlstore.open(dest, read_only=True)``.
        """
        self._check_open()
        dest = Path(dest)
        if dest.exists():
            raise InvalidInputError(f"snapshot destination {dest} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.snapshot-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with self._write_lock:
            if not self.read_only:
                self.checkpoint()
            try:
                shutil.copytree(self.path / "vectors", tmp / "vectors")
                if (self.path / INDEX_DIR).exists():
                    shutil.copytree(self.path / INDEX_DIR, tmp / INDEX_DIR)
                else:
                    (tmp / INDEX_DIR).mkdir()
                self._catalog.snapshot_to(tmp / DB_FILE)
                (tmp / LOCK_FILE).touch()
                _fsync_tree(tmp)
                os.rename(tmp, dest)
                fsync_dir(dest.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return dest

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
    ) -> Hits | list[Hits]:
        """Coarse-to-fine search: shortlist on ``dims[0]``, re-rank on each longer prefix.

        A 1-D query (or a single image) gives one :class:`Hits`; a 2-D batch gives a list. ``where`` is a
        DuckDB boolean expression over the metadata columns. ``shortlist`` sets the survivors of each stage
        but the last (an int halves along the funnel). ``ef`` overrides the HNSW search beam.
        """
        self._check_open()
        k = positive_int(k, "k")
        tuned = self.manifest.get("tuned")
        if tuned and dims is None and shortlist is None:
            dims, shortlist = tuned["dims"], max(k, tuned["shortlist"] * k // tuned["k"])
            ef = ef if ef is not None else tuned["ef"]
        dims_t = dims_tuple(dims if dims is not None else self._default_dims(), self.dim)
        if looks_like_vectors(query):
            queries, single = query_batch(query, dims_t[-1], self.dim, self.metric)
        else:
            single = not isinstance(query, (list, tuple))
            encoded = self._encode([query] if single else query, batch_size=64)
            queries, _ = query_batch(encoded, dims_t[-1], self.dim, self.metric)
        try:
            sizes = funnel.shortlist_sizes(shortlist, k, len(dims_t))
        except (ValueError, TypeError) as e:
            raise InvalidKError(str(e)) from None
        for s in sizes:
            positive_int(s, "shortlist")
            if s < k:
                raise InvalidKError(f"shortlist sizes must be at least k={k}, got {s}")
        if ef is not None:
            positive_int(ef, "ef")
        with self._visibility.read():  # one point in time: memory snapshot and catalog reads agree
            self._check_open()
            if self._n_live == 0:
                raise EmptyStoreError(f"store {self.path} holds no vectors to search")

            watermark, live, ids_by_row = self._watermark, self._live, self._ids_by_row
            allowed = None
            if where is not None:
                allowed = self._catalog.filter_rows(where)
                allowed = allowed[(allowed >= 0) & (allowed < watermark)]
                allowed = allowed[live[allowed]]
            results = self._funnel(queries, dims_t, k, sizes, ef, allowed, watermark, live, self._n_live)

            meta_by_row: dict[int, dict[str, Any]] = {}
            if metadata:
                all_rows = np.concatenate([r for r, _ in results]) if results else np.empty(0, np.int64)
                meta_by_row = self._catalog.metadata_for_rows(all_rows)
        hits = [
            Hits(
                ids=ids_by_row[rows].tolist(),
                scores=scores,
                metadata=[meta_by_row.get(int(r), {}) for r in rows] if metadata else [],
                dims=dims_t,
            )
            for rows, scores in results
        ]
        return hits[0] if single else hits

    def tune(
        self, recall: float = 0.95, k: int = 10, sample: int = 200, dims: Sequence[int] | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """Pick the funnel (first stage on any indexed prefix, then straight to full ``dim`` or through the
        band edges) and the cheapest first-stage shortlist (and HNSW beam) whose recall@k against exact
        full-``dim`` search reaches ``recall``; among funnels that reach it, the fastest wins. Measured on
        ``sample`` of the store's own rows as queries (each one's own row excluded). The choice is persisted:
        ``query`` uses it when called without ``dims``/``shortlist``."""
        self._check_open()
        self._check_writable()
        k = positive_int(k, "k")
        if not 0 < recall <= 1:
            raise InvalidInputError(f"recall must be in (0, 1], got {recall}")
        shapes = [dims_tuple(dims, self.dim)] if dims is not None else self._funnel_shapes()
        live_rows = np.flatnonzero(self._live[: self._watermark])
        if len(live_rows) <= k + 1:
            raise EmptyStoreError(f"tuning needs more than k+1={k + 1} vectors, the store holds {len(live_rows)}")
        rng = np.random.default_rng(seed)
        probe = np.sort(rng.choice(live_rows, size=min(sample, len(live_rows)), replace=False))
        queries = self._vectors.gather(probe, 0, self.dim)
        truth = [t[t != r][:k] for r, t in zip(probe, self._exact(queries, k + 1, live_rows))]
        tried, reached = [], []
        for dims_t in shapes:
            for s in _shortlist_grid(k + 1, len(live_rows)):
                sizes = funnel.shortlist_sizes(s, k + 1, len(dims_t)) if len(dims_t) > 1 else []
                ef = max(self._ef_search, s)
                # One query at a time: the latency a caller of query() sees (a batch would time the pool).
                t0 = time.perf_counter()
                found = []
                for q in queries:
                    [(rows, _)] = self._funnel(
                        q[None], dims_t, k + 1, sizes, ef, None, self._watermark, self._live, self._n_live
                    )
                    found.append(rows)
                ms = 1e3 * (time.perf_counter() - t0) / len(queries)
                got = np.mean(
                    [len(set(f[f != r][:k].tolist()) & set(t.tolist())) / k for r, f, t in zip(probe, found, truth)]
                )
                point = {"dims": list(dims_t), "shortlist": s, "ef": ef, "recall": float(got), "ms_per_query": ms}
                tried.append(point)
                if got >= recall:
                    reached.append(point)
                    break
        if not reached:
            best = max(tried, key=lambda p: p["recall"])
            raise InvalidInputError(
                f"no funnel reaches recall {recall} (best {best['recall']:.3f} with dims={best['dims']}, shortlist "
                f"{best['shortlist']}); nothing was saved: lower the target or index a longer prefix"
            )
        best = min(reached, key=lambda p: p["ms_per_query"])  # among the shapes that reach it, the fastest
        choice = {**best, "k": k, "target": recall, "sample": len(probe), "tried": tried}
        self._catalog.set_manifest("tuned", choice)
        self.manifest["tuned"] = choice
        return choice

    def _exact(self, queries: np.ndarray, n: int, rows: np.ndarray) -> list[np.ndarray]:
        """Exact top-``n`` rows on the full vectors, best first."""
        found = self._scan(queries, self.dim, n, rows)
        return [self._refine(q, f, (self.dim,), [], n)[0] for q, f in zip(queries, found)]

    def _funnel(
        self,
        queries: np.ndarray,
        dims: tuple[int, ...],
        k: int,
        sizes: list[int],
        ef: int | None,
        allowed: np.ndarray | None,
        watermark: int,
        live: np.ndarray,
        n_live: int,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (rows, exact scores on dims[-1]), best first, within one snapshot of the store."""
        first = sizes[0] if sizes else k
        candidates = self._first_stage(queries, dims[0], first, allowed, watermark, live, ef, n_live)
        if len(queries) > 1 and (os.cpu_count() or 1) > 1:
            return list(
                _refine_pool().map(lambda qc: self._refine(qc[0], qc[1], dims, sizes[1:], k), zip(queries, candidates))
            )
        return [self._refine(q, c, dims, sizes[1:], k) for q, c in zip(queries, candidates)]

    def _funnel_shapes(self) -> list[tuple[int, ...]]:
        """Funnels ``tune`` compares, for every indexed prefix d: d -> full, and d -> every band edge -> full."""
        if not self.index_dims or self.index_dims[0] >= self.dim:
            return [self._default_dims()]
        shapes: list[tuple[int, ...]] = []
        for d in self.index_dims:
            if d >= self.dim:
                continue
            shapes.append((d, self.dim))
            edges = tuple(b for b in self.bands if d < b < self.dim)
            if edges:
                shapes.append((d, *edges, self.dim))
        return shapes

    def _default_dims(self) -> tuple[int, ...]:
        return (self.index_dims[0], self.dim) if self.index_dims and self.index_dims[0] < self.dim else (self.dim,)

    def _first_stage(
        self,
        queries: np.ndarray,
        d: int,
        n: int,
        allowed: np.ndarray | None,
        watermark: int,
        live: np.ndarray,
        ef: int | None,
        n_live: int,
    ) -> list[np.ndarray]:
        """Per query, the rows of the best ``n`` candidates on the ``d``-prefix (unordered)."""
        index = self._indexes.get(d)
        beam = max(ef or self._ef_search, n)
        if allowed is not None:
            if len(allowed) == 0:
                return [np.empty(0, np.int64) for _ in queries]
            if index is None or len(allowed) <= max(FILTER_EXACT_ROWS, FILTER_EXACT_SHARE * n_live):
                return self._scan(queries, d, n, allowed)
            return self._filtered_search(index, queries, n, allowed, n_live, beam, watermark)
        if index is None:
            return self._scan(queries, d, n, np.flatnonzero(live[:watermark]))
        labels = index.search(queries, n, beam, num_threads=-1 if len(queries) > 1 else 1)
        out = [_visible(row, watermark, live) for row in labels]
        short = [i for i, rows in enumerate(out) if len(rows) < min(n, n_live)]
        if short:  # HNSW came back with fewer than exist (tiny or heavily deleted stores): scan exactly
            scanned = self._scan(queries[short], d, n, np.flatnonzero(live[:watermark]))
            for i, rows in zip(short, scanned):
                out[i] = rows
        return out

    def _filtered_search(
        self,
        index: PrefixIndex,
        queries: np.ndarray,
        n: int,
        allowed: np.ndarray,
        n_live: int,
        beam: int,
        watermark: int,
    ) -> list[np.ndarray]:
        """HNSW with over-fetching; queries it cannot satisfy fall back to an exact scan of ``allowed``."""
        want = min(n, len(allowed))
        fetch = min(n_live, int(np.ceil(n * n_live / len(allowed) * 1.5)) + 10)
        out: list[np.ndarray | None] = [None] * len(queries)
        todo = np.arange(len(queries))
        while len(todo):
            labels = index.search(queries[todo], fetch, max(beam, fetch), num_threads=-1)
            retry = []
            for qi, row in zip(todo, labels):
                row = row[(row >= 0) & (row < watermark)]
                pos = np.minimum(np.searchsorted(allowed, row), len(allowed) - 1)
                row = row[allowed[pos] == row]  # allowed is sorted: membership without a store-sized mask
                if len(row) >= want:
                    out[qi] = row[:want]
                else:
                    retry.append(qi)
            todo = np.asarray(retry, dtype=np.int64)
            if len(todo) and fetch * 2 > n_live // 2:
                for qi, rows in zip(todo, self._scan(queries[todo], index.dim, n, allowed)):
                    out[qi] = rows
                break
            fetch *= 2
        return out  # type: ignore[return-value]

    def _scan(self, queries: np.ndarray, d: int, n: int, rows: np.ndarray) -> list[np.ndarray]:
        """Exact top-``n`` on the ``d``-prefix over ``rows`` (sorted), in blocks of bounded memory."""
        q = np.ascontiguousarray(queries[:, :d])
        best = funnel.RunningTop(len(q), n, self.metric)
        for lo in range(0, len(rows), SCAN_BLOCK_ROWS):
            block_rows = rows[lo : lo + SCAN_BLOCK_ROWS]
            first, last = int(block_rows[0]), int(block_rows[-1]) + 1
            if last - first == len(block_rows):  # contiguous: a plain slice, no gather
                block = self._vectors.read_range(first, last, 0, d)
            else:
                block = self._vectors.gather(block_rows, 0, d)
            best.update(block_rows, funnel.block_scores(block, q, self.metric))
        return best.rows

    def _refine(
        self, q: np.ndarray, rows: np.ndarray, dims: tuple[int, ...], sizes: list[int], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank ``rows`` through the later stages; returns (rows, exact scores on dims[-1]), best first."""
        scorer = funnel.PrefixScorer(q, np.sort(rows), self.metric)
        stages = list(dims[1:]) if len(dims) > 1 else [dims[0]]
        keeps = [*sizes, k] if len(dims) > 1 else [k]
        for i, (d, keep) in enumerate(zip(stages, keeps)):
            if len(scorer.rows) == 0:
                break
            for stop, block in self._vectors.gather_bands(scorer.rows, scorer.covered, d):
                scorer.extend(as_float32(block), stop)
            best = funnel.top(scorer.scores(), keep, self.metric)
            # survivors stay in row order between stages (sequential reads); the last stage ranks them
            scorer.keep(best if i == len(stages) - 1 else np.sort(best))
        return scorer.rows, scorer.scores()


def _shortlist_grid(k: int, n_live: int) -> list[int]:
    """Candidate first-stage shortlists for tuning, smallest first."""
    grid = sorted({max(k, s) for s in (k, 2 * k, 50, 100, 200, 300, 400, 600, 800, 1200, 1600, 2400, 3200)})
    return [s for s in grid if s < n_live] + [n_live]


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of atomic writes that a killed writer never renamed (we hold the writer lock)."""
    for pattern in ("vectors/*/.zarr.json.tmp-*", f"{INDEX_DIR}/.*.tmp-*"):
        for tmp in path.glob(pattern):
            tmp.unlink(missing_ok=True)


def _visible(rows: np.ndarray, watermark: int, live: np.ndarray) -> np.ndarray:
    """The rows a query may return: committed and live in the snapshot it started from."""
    rows = rows[(rows >= 0) & (rows < watermark)]
    return rows[live[rows]]


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def encoder_name(encoder: Encoder | None, dim: int, dim_given: int | None) -> str | None:
    """What the manifest records about the encoder a store was created for."""
    if encoder is not None:
        return str(getattr(encoder, "name", type(encoder).__name__))
    return BUNDLED_ENCODER if dim_given is None and dim == BUNDLED_ENCODER_DIM else None


def _create(path: Path, params: dict[str, Any], encoder: str | None = None) -> None:
    """Build a new store in a temporary folder and rename it into place (creation is all-or-nothing)."""
    from . import __version__

    dim = int(params["dim"])
    if dim <= 0:
        raise InvalidInputError(f"dim must be a positive integer, got {dim}")
    bands = tuple(int(b) for b in (params["bands"] or default_bands(dim)))
    if not bands or bands[-1] != dim or any(b <= a for a, b in zip((0, *bands), bands)):
        raise InvalidInputError(f"bands must be increasing band ends finishing at dim={dim}, got {bands}")
    metric = params["metric"] or "cosine"
    if metric not in funnel.METRICS:
        raise InvalidInputError(f"metric must be one of {funnel.METRICS}, got {metric!r}")
    dtype = params["dtype"] or "float16"
    if dtype not in ("float16", "float32"):
        raise InvalidInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    index_dims = tuple(int(d) for d in (params["index_dims"] if params["index_dims"] is not None else (16,)))
    index_dims = tuple(d for d in index_dims if d <= dim) if params["index_dims"] is None else index_dims
    if any(not 1 <= d <= dim for d in index_dims) or len(set(index_dims)) != len(index_dims):
        raise InvalidInputError(f"index_dims must be distinct prefix lengths within 1..{dim}, got {index_dims}")
    widths = [b - a for a, b in band_edges(dim, bands)]
    chunk_rows = params["chunk_rows"]
    rows = (
        [positive_int(chunk_rows, "chunk_rows")] * len(widths)
        if chunk_rows is not None
        else [auto_chunk_rows(w, dtype) for w in widths]
    )
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dim": dim,
        "bands": list(bands),
        "metric": metric,
        "dtype": dtype,
        "index_dims": sorted(index_dims),
        "chunk_rows": rows,
        "hnsw_M": int(params["hnsw_M"] or 16),
        # 64, not hnswlib's usual 200: on 16-32-d prefixes it halves the build at the same shortlist recall
        # (benchmarks/results/build_params.md), and the first stage searches with a wide beam anyway.
        "hnsw_ef_construction": int(params["hnsw_ef_construction"] or 64),
        "hnsw_ef_search": 64,
        "committed_rows": 0,
        "encoder": encoder,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "created_by": f"mrlstore {__version__}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        create_bands(tmp, dim, bands, dtype, rows, attributes={"mrlstore": manifest})
        catalog = Catalog(tmp, read_only=False, create=True)
        try:
            catalog.create_schema(manifest)
        finally:
            catalog.close()
        (tmp / INDEX_DIR).mkdir()
        (tmp / LOCK_FILE).touch()
        _fsync_tree(tmp)
        try:
            os.rename(tmp, path)  # also replaces an empty folder the user made
        except OSError:
            if not (path / DB_FILE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process created it first: open theirs
            return
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
) -> Store:
    """Open the store at ``path``, creating it when absent.

    A new store takes its ``dim`` from ``dim``, else from ``encoder``, else it is a 2048-d store for the
    bundled MRL image encoder (loaded on the first ``add``/``query`` of images).

    Creation parameters (``dim``, ``bands``, ``metric`` = "cosine" | "ip" | "l2", ``dtype`` = "float16" |
    "float32", ``index_dims``, ``chunk_rows``, ``hnsw_m``, ``ef_construction``) are persisted; passing a
    different value on reopen raises :class:`ConfigMismatchError`.
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
    )
