"""The public Store: a facade over the components of one open store. Each verb is one delegation:

- ``StoreState`` (tiers/state.py): the catalog, bands and prefix indexes, and the snapshot of the last commit;
- ``Writer`` (write/): the commit protocol; ``ImageAdder`` and ``add_arrow`` feed it images and Arrow data;
- ``Searcher`` and ``Reader`` (query/): queries and tuning; rows by id, SQL and Arrow scans;
- ``Versions`` and ``Maintenance`` (upkeep/): which version is open and publishing it; copies, checks,
  compaction.

ARCHITECTURE.md draws how data flows through them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias, overload

import pyarrow as pa

from mrlstore import _open_handles as open_handles
from mrlstore._fsutil import local_destination
from mrlstore.encoder.protocol import Encoder
from mrlstore.encoder.runner import EncoderSlot
from mrlstore.errors import ReadOnlyError, UnsupportedStorageError
from mrlstore.inputs.staging import StoreShape
from mrlstore.inputs.vectors import id_strings
from mrlstore.options import StoreConfig
from mrlstore.query.filters import FilterCache
from mrlstore.query.reads import SCAN_BATCH_ROWS, Reader, write_parquet
from mrlstore.query.searcher import Searcher
from mrlstore.results import AddResult, CompactResult, Hits, HitsBatch, StoreInfo, TuneResult
from mrlstore.upkeep import opening
from mrlstore.upkeep.maintenance import Maintenance
from mrlstore.write.arrow_adds import add_arrow
from mrlstore.write.image_adds import COMMIT_EVERY, ImageAdder
from mrlstore.write.writer import Writer

# What a type checker can tell apart (the rule itself runs on values: see mrlstore.inputs.classify): a list
# of numbers is one vector, a list of lists a batch. numpy's shape types do not separate a 1-D from a 2-D
# array for mypy, so arrays, paths, images and columns are typed Hits | HitsBatch: narrow with isinstance.
OneVector: TypeAlias = "Sequence[float]"  # and bytes (a Sequence[int]): one encoded image, one Hits too
ManyVectors: TypeAlias = "Sequence[Sequence[float]]"


class Store:
    """A Matryoshka embedding store; create or reopen one with :func:`mrlstore.open`."""

    def __init__(self, path: str | os.PathLike[str], config: StoreConfig | int | None = None, **options: Any):
        """``mrlstore.open(path, ...)`` is the usual way in; ``Store(path, config)`` takes a StoreConfig, and
        ``Store(path, dim, **keywords)`` the keywords of ``open`` (as before StoreConfig existed)."""
        self._pid = os.getpid()  # a forked child's inherited stores are its parent's to close
        if not isinstance(config, StoreConfig):
            config = StoreConfig().replaced(dim=config, **options)
        elif options:
            config = config.replaced(**options)
        self.read_only = config.read_only
        self._options = config
        self._versions = versions = opening.locate(path, config)
        requested = config.creation()
        opening.create_if_absent(versions.path, config, requested)
        self._state = opening.open_tiers(versions, requested)
        self._encoders = EncoderSlot(config.encoder, self._state.params.dim, versions.location)
        self._writer = Writer(self._state, versions.committed)
        self._images = ImageAdder(self._state, self._writer, self._encoders)
        filters = FilterCache()
        self._search = Searcher(self._state, self._encoders, filters, versions.committed)
        self._reader = Reader(self._state, filters)
        self._upkeep = Maintenance(
            self._state,  # functions of the state, not of this Store: closed, it is freed at once (no cycle)
            functools.partial(opening.reopen_with_lock, self._state, versions),
            functools.partial(opening.reopen, self._state, versions, lambda: None),
            functools.partial(opening.reindex, self._state, versions),
            versions.committed,
            versions.holds,
        )
        open_handles.register(self)  # closed at exit if still open then

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Save the index cache (writers), release the store. Safe to call twice."""
        state = self._state
        if state.closed:
            return
        state.closing = True  # threads looping on writes would otherwise take the lock again and again first
        with state.write_lock:
            if state.closed:  # another close() ran meanwhile
                return
            try:
                if not self.read_only:
                    state.indexes.checkpoint()
                self._versions.close()
            finally:
                with state.visibility.write():  # let queries in flight finish first
                    state.close_for_good()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        # At exit, open_handles closed what was open; a finalizer then must not wait for a lock a daemon
        # thread, frozen by the exit, may hold, nor a forked child for one its parent's threads held
        if state is not None and not state.closed and not sys.is_finalizing() and self._pid == os.getpid():
            try:
                self.close()
            except Exception:
                pass

    def __len__(self) -> int:
        self._state.check_open()
        return self._state.snap.n_live

    def __repr__(self) -> str:
        state = self._state
        shown = "closed" if state.closed else f"{state.snap.n_live} vectors"
        return f"<mrlstore.Store {self.location!r} dim={self.dim} metric={self.metric} {shown}>"

    # -- what the store is -----------------------------------------------------------------------------
    @property
    def location(self) -> str:
        """The store's folder, or the URL of a store on object storage (its small parts cached in ``path``)."""
        return self._versions.location

    @property
    def path(self) -> Path:
        return self._state.path

    @property
    def config(self) -> StoreConfig:
        """The config the store was opened with, its creation parameters as the store holds them (chunk_rows
        as given: the store keeps one per band; hnsw_m and ef_construction where the store was made with one
        for every index: a default's values given to a new store would apply to every prefix there)."""
        p = self._state.params
        return self._options.replaced(
            dim=p.dim, bands=p.bands, metric=p.metric, dtype=p.dtype, index_dims=p.index_dims,
            hnsw_m=p.hnsw_m if p.hnsw_m_given and not p.hnsw_m_by_prefix else None,
            ef_construction=p.ef_construction if p.ef_construction_given and not p.ef_construction_by_prefix else None,
            prefixes=p.prefixes,
        )  # fmt: skip

    @property
    def encoder(self) -> Encoder | None:
        """The image encoder (None until the bundled one loads on the first image)."""
        return self._encoders.encoder

    @encoder.setter
    def encoder(self, encoder: Encoder | None) -> None:
        self._encoders.encoder = encoder

    @property
    def manifest(self) -> dict[str, Any]:
        return self._state.manifest

    @property
    def dim(self) -> int:
        return self._state.params.dim

    @property
    def bands(self) -> tuple[int, ...]:
        return self._state.params.bands

    @property
    def metric(self) -> str:
        return self._state.params.metric

    @property
    def dtype(self) -> str:
        return self._state.params.dtype

    @property
    def index_dims(self) -> tuple[int, ...]:
        return self._state.params.index_dims

    @property
    def index_status(self) -> dict[int, str]:
        """How each raw prefix index opened: "loaded" (its saved file; a reader reads the files of indexes a
        default query does not search on their first use), "extended", "rebuilt", or "fitted code"."""
        return self._state.indexes.status

    def info(self) -> StoreInfo:
        """Creation parameters, current state (rows, live vectors, index status) and the tuned settings."""
        self._state.check_open()
        state, p = self._state, self._state.params
        snap, tuned = state.snap, state.manifest.get("tuned")
        return StoreInfo(
            path=self.location, dim=p.dim, bands=p.bands, metric=p.metric, dtype=p.dtype,
            index_dims=p.index_dims, chunk_rows=state.vectors.chunk_rows, rows=snap.watermark, live=snap.n_live,
            deleted=snap.watermark - snap.n_live, index_status=dict(state.indexes.status),
            encoder=state.manifest.get("encoder"), read_only=self.read_only, version=self._versions.version,
            tuned=None if tuned is None else {key: value for key, value in tuned.items() if key != "tried"},
            prefixes="raw" if state.indexes.fitted is None else "fitted",
            remote=None if self._versions.remote is None else self._versions.remote.counters(),
        )  # fmt: skip

    # -- writes ----------------------------------------------------------------------------------------
    def add(
        self,
        images: Any,
        ids: Sequence[str] | None = None,
        metadata: Any = None,
        *,
        batch_size: int = 64,
        commit_every: int = COMMIT_EVERY,
        atomic: bool = False,
        skip_errors: bool = False,
        on_conflict: str = "skip",
        progress: bool | None = None,
    ) -> AddResult:
        """Encode images with the store's encoder and add them; returns an :class:`AddResult` (their ids in
        input order; ``added``, ``replaced``, ``skipped``, ``failed``). ``metadata``: one dict per image
        (after folders are expanded), a pa.Table or DataFrame of one row per image, or one dict for all.

        ``images``: a path, a folder (its image files, recursively and through symlinked subfolders,
        sorted), ``bytes`` or a binary file object holding an encoded image, a PIL image, an array or tensor
        (HxW, HxWx3, HxWx4; NxHxWx3 for several), or a list of these (:mod:`mrlstore.inputs.classify` has
        the rule). Photos are turned upright by their EXIF orientation. Files keep their
        absolute path as ``path`` metadata. Ids default to a hash of each image's content, so adding the
        same images again changes nothing; ``on_conflict`` decides for ids already in the store: ``"skip"``
        (nothing is encoded for them), ``"replace"`` or ``"error"`` (DuplicateIdError, nothing written).
        Every file's header is checked before anything is encoded: a bad file raises UnreadableImageError
        and nothing is written; with ``skip_errors=True`` it is left out and listed in ``failed``. Pixels that
        break after a good header fail when decoded: the batches committed before stay (the error says so).

        Images are committed ``commit_every`` at a time (``batch_size`` is the encoder's batch), so memory
        stays bounded and an interrupt keeps every committed batch: the same add again encodes only what is
        missing. ``atomic=True`` encodes everything first and commits once: all or nothing. ``progress``
        shows a bar (None: for long adds).
        """
        self._check_writable()
        return self._images.add(
            images, ids, metadata, batch_size=batch_size, commit_every=commit_every, atomic=atomic,
            skip_errors=skip_errors, on_conflict=on_conflict, progress=progress,
        )  # fmt: skip

    def upsert(self, images: Any, ids: Sequence[str] | None = None, metadata: Any = None, **options: Any) -> AddResult:
        """``add(images, ..., on_conflict="replace")``: re-encode and replace entries with the same ids."""
        return self.add(images, ids, metadata, on_conflict="replace", **options)

    def add_vectors(
        self, vectors: Any, ids: Sequence[str] | None = None, metadata: Any = None, *, on_conflict: str = "error"
    ) -> list[str]:
        """Add new vectors (n x dim); returns their ids. Durable once it returns. ``metadata``: one dict per
        vector, a pa.Table or DataFrame of n rows, or one dict for all. ``on_conflict`` decides for
        ids already in the store: ``"error"`` (DuplicateIdError, nothing written), ``"skip"`` (those rows
        are left out; the others are added) or ``"replace"`` (as :meth:`upsert_vectors`)."""
        self._check_writable()
        return self._writer.add(vectors, ids, metadata, on_conflict)

    def upsert_vectors(
        self, vectors: Any, ids: Sequence[str], metadata: Any = None, keep_metadata: bool = True
    ) -> list[str]:
        """Add vectors, replacing the vector of any existing entry with the same id. A replaced entry keeps
        the old metadata values this call leaves out (columns or keys it does not give, nulls; everything
        without ``metadata``); ``keep_metadata=False`` drops them: the entry has only what this call gives."""
        self._check_writable()
        return self._writer.upsert(vectors, ids, metadata, keep_metadata)

    def update_metadata(self, ids: Sequence[str], metadata: Any) -> int:
        """Set metadata of the entries ``ids`` without giving their vectors again: ``metadata`` is one dict
        per id (or one dict for all, a pa.Table, a DataFrame); the columns it gives are set, None clearing a
        value, and the others kept. Returns how many entries changed. Each entry is committed again with its
        stored vector, as an upsert (its rows take disk until a compaction). Unknown ids raise
        UnknownIdError and nothing changes."""
        self._check_writable()
        return self._writer.update_metadata(ids, metadata)

    def add_arrow(
        self,
        data: Any,
        vector: str | None = "embedding",
        id: str | None = "id",  # noqa: A002 - the column's name
        *,
        image: str | None = None,
        batch_size: int | None = None,
        on_conflict: str = "error",
    ) -> int:
        """Add the rows of ``data`` (a pa.Table, RecordBatchReader, iterable of RecordBatches, pandas DataFrame
        or DuckDB relation): vectors from the column ``vector`` (or images, encoded, from the column
        ``image``: bytes or paths), ids from ``id`` (None: generated, or content hashes for images), every
        other column as metadata. Streams ``batch_size`` rows at a time (default: 256 MiB of float32
        vectors), each batch one atomic commit: memory stays bounded, and a failure part way keeps every
        batch committed before it. Returns the number of rows added. ``on_conflict`` as in ``add_vectors``."""
        self._check_writable()
        return add_arrow(self._writer, self._images, data, vector, id, image, batch_size, on_conflict)

    def commit_staged(self, fragments: list[Any]) -> int:
        """Add the rows of staged fragments (files :func:`mrlstore.inputs.staging.write_fragment` wrote, e.g.
        by the workers of a Ray write) as one commit: all become visible at once, or, if any fragment is
        unreadable or any id repeats, none. Returns the number of rows added."""
        self._check_writable()
        return self._writer.commit_staged(fragments)

    def staging_shape(self) -> StoreShape:
        """What workers need to check and write fragments for this store."""
        return self._writer.shape()

    def delete(self, ids: Sequence[str], missing_ok: bool = False) -> int:
        """Delete entries by id; returns how many were deleted. Unknown ids raise unless ``missing_ok``."""
        self._check_writable()
        return self._writer.delete(ids, missing_ok)

    # -- reads -----------------------------------------------------------------------------------------
    def get(self, ids: Sequence[str], dims: int | None = None) -> pa.Table:
        """Entries by id, in the order given: id, metadata columns and ``vector`` (the first ``dims``)."""
        self._state.check_open()
        return self._reader.get(ids, dims)

    def sql(self, query: str) -> pa.Table:
        """Run one read-only SELECT over the catalog (table/view ``items``: id and metadata columns)."""
        self._state.check_open()
        return self._reader.sql(query)

    @overload
    def query(
        self, query: OneVector, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
        prefixes: str | None = None,
    ) -> Hits: ...  # fmt: skip
    @overload
    def query(
        self, query: ManyVectors, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
        prefixes: str | None = None,
    ) -> HitsBatch: ...  # fmt: skip
    @overload
    def query(
        self, query: Any, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
        prefixes: str | None = None,
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
        prefixes: str | None = None,
    ) -> Hits | HitsBatch:
        """Coarse-to-fine search: shortlist on ``dims[0]`` numbers per row, re-rank on each longer prefix.

        One rule: one query (a 1-D vector, a single image) gives one :class:`Hits`; a batch (a 2-D array,
        a vector column, several images or a folder) gives a :class:`HitsBatch`, one Hits per query
        (``to_arrow()`` makes one table). ``where`` is a DuckDB boolean expression over the metadata
        columns. ``shortlist`` sets the survivors of each stage but the last (an int halves along the
        funnel); without it, the setting ``tune`` measured for this funnel shape applies (``dims`` omitted:
        the tuned fastest shape). ``ef`` overrides the HNSW beam. The shortlist's numbers are the store's
        fitted codes where ``tune`` fitted them (``info().prefixes``), else the raw prefix; ``prefixes="raw"``
        asks for the raw prefix, ``"fitted"`` insists on the codes. ``metadata=False`` leaves each hit's
        metadata empty (no catalog read).
        """
        return self._search.query(query, k, dims, where, shortlist, ef, metadata, prefixes)  # checks it is open

    @overload
    def similar(  # type: ignore[overload-overlap]  # a str is a Sequence[str]: the first overload wins
        self, ids: str, k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
        prefixes: str | None = None,
    ) -> Hits: ...  # fmt: skip
    @overload
    def similar(
        self, ids: Sequence[str], k: int = 10, dims: Sequence[int] | int | None = None, *, where: str | None = None,
        shortlist: int | Sequence[int] | None = None, ef: int | None = None, metadata: bool = True,
        prefixes: str | None = None,
    ) -> HitsBatch: ...  # fmt: skip
    def similar(
        self,
        ids: str | Sequence[str],
        k: int = 10,
        dims: Sequence[int] | int | None = None,
        *,
        where: str | None = None,
        shortlist: int | Sequence[int] | None = None,
        ef: int | None = None,
        metadata: bool = True,
        prefixes: str | None = None,
    ) -> Hits | HitsBatch:
        """More like this: the entries nearest to the stored entry ``ids`` (one id gives Hits, a list a
        HitsBatch), its stored vector queried as :meth:`query` does (same options), the entry itself left
        out. Unknown ids raise UnknownIdError."""
        self._state.check_open()
        one = isinstance(ids, str)
        asked = id_strings([ids] if isinstance(ids, str) else ids)
        vectors = self._reader.vectors_of_ids(asked)
        found = self._search.similar(asked, vectors, k, dims, where, shortlist, ef, metadata, prefixes)
        return found[0] if one else found

    def query_table(
        self,
        queries: Any,
        k: int = 10,
        dims: Any = None,
        *,
        vector: str = "embedding",
        image: str | None = None,
        **options: Any,
    ) -> pa.Table:
        """``query`` for a batch of queries, as one table: query (its index), rank (from 1), id, score, and
        the metadata columns. ``queries`` may be a table (pa.Table, RecordBatch, pandas DataFrame, ...): its
        column ``vector`` holds the query vectors, or with ``image=`` its column of that name holds images."""
        self._state.check_open()
        return self._search.query_table(queries, k, dims, vector, image, **options)

    def scan(
        self,
        dims: int | None = None,
        columns: list[str] | None = None,
        where: str | None = None,
        batch_size: int = SCAN_BATCH_ROWS,
    ) -> pa.RecordBatchReader:
        """The live entries as a RecordBatchReader (bounded memory): ``id``, the metadata ``columns`` (default
        all), and ``vector``, the first ``dims`` numbers as float32 (none without ``dims``), in row order;
        ``where`` filters like in ``query``; ``batch_size`` rows per batch. A consistent snapshot: later writes
        do not show, and it reads to the end through a compaction, a refresh or ``close()`` meanwhile (it holds
        the maps of its rows' files until it is dropped); on object storage a refresh or close() ends it."""
        self._state.check_open()
        return self._reader.scan(dims, columns, where, batch_size)

    def to_arrow(self, dims: int | None = None, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        """``scan(...)`` as one table."""
        return self.scan(dims, columns, where).read_all()

    def export_parquet(
        self, dest: str | os.PathLike[str], dims: int | None = None, columns: list[str] | None = None
    ) -> int:
        """Write ``scan(dims, columns)`` to one Parquet file, atomically, in bounded memory; returns how many
        rows. ``add_arrow(pq.ParquetFile(dest).iter_batches(), vector="vector")`` reads it back."""
        target = local_destination(dest, "export_parquet", self._state.path)  # before the scan snapshots
        return write_parquet(self.scan(dims, columns), target)

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
        own row excluded), or on up to ``sample`` of ``queries`` (vectors or images like those users will
        send). Persisted: ``query`` uses the setting of the shape it runs (``dims`` omitted: the fastest
        shape that reached the target). Shapes that miss the target keep their best effort and are named in
        a warning; when none reaches it, TuningError is raised (naming what exact search costs, where it
        was measured) and the previous settings stay. Where scanning every row exactly measures faster
        than any funnel (small stores), that is the choice: ``dims=[dim]``. ``dims`` tunes that one shape
        only; ``seed`` picks the sample.

        Unless the store was created with ``prefixes="raw"`` (or holds under 100 rows), tune also fits
        short codes to the store's rows (principal directions, the directions of differences between rows and
        their nearest neighbours, and blends of the two: ``mrlstore/tiers/projection.py``), measures every
        shape on them too, and keeps them when they reach the target at least as fast: ``info().prefixes``
        says which."""
        self._check_writable()
        return self._search.tune(recall, k, sample, dims, seed, queries)

    def report(self, k: int = 10, sample: int = 200, seed: int = 0) -> pa.Table:
        """How recall and latency change with dims and shortlist on this store's own rows: one row per prefix
        alone (an exact scan of its first d numbers) and per funnel shape and shortlist, with recall@k against
        exact full-``dim`` search (and its 95% lower bound), p50 ms one query at a time, vector bytes read per
        query, and which setting ``query()`` uses. Reuses ``tune``'s points when the store is unchanged since
        (``mrlstore report STORE --plot dims.png`` prints and plots it)."""
        self._state.check_open()
        if self._versions.remote is not None:
            raise UnsupportedStorageError(
                "report() scans every prefix of the sampled queries' rows exactly, which on object storage means "
                "thousands of requests: run it on the local store (or a snapshot) that was published"
            )
        return self._search.report(k, sample, seed)

    # -- versions and upkeep ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save every HNSW index that changed since its last save (atomically)."""
        self._check_writable()
        with self._state.writing():
            self._state.indexes.checkpoint()

    def refresh(self) -> bool:
        """Readers: move to the newest version the writer published (or uploaded); True if there was a newer
        one. Queries in flight finish on the version they started with. Writers: always False."""
        self._state.check_open()
        state, versions = self._state, self._versions
        return versions.refresh(
            state,
            lambda switch: opening.reopen(state, versions, switch),
            lambda switch, undo: opening.open_beside(state, versions, switch, undo),
        )

    def publish(self, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload the store's committed state to object storage (``s3://bucket/prefix``) as a new version
        that ``mrlstore.open(url, read_only=True)`` opens anywhere. Atomic (its HEAD object is written last)
        and incremental (only chunks the previous version lacks). Returns the new HEAD."""
        self._state.check_open()
        return self._versions.publish(self._state, url, storage_options)

    def snapshot(self, dest: str | os.PathLike[str]) -> Path:
        """Write a consistent copy of the store to ``dest`` (which must not exist) and return its path; other
        processes read it meanwhile: ``mrlstore.open(dest, read_only=True)``."""
        self._state.check_open()
        return self._upkeep.snapshot(dest)

    def verify(self, full: bool = False) -> list[str]:
        """What is wrong with the store's files against its commits (empty when consistent); see
        :mod:`mrlstore.upkeep.verify`. Stored values are checked against their stored norms on 2,000 rows;
        ``full=True`` checks every live row (reads every vector: about a second per GB on a local disk)."""
        self._state.check_open()
        return self._upkeep.verify(full)

    def compact(self) -> CompactResult:
        """Rewrite the store without its deleted rows, crash-safely (a crash leaves the old or the new store,
        never a mix); a store of an older format version is rewritten in the newest even with nothing
        deleted (format 3 with nothing deleted: its catalog alone, in one transaction). See
        :mod:`mrlstore.upkeep.compaction`."""
        self._check_writable()
        return self._upkeep.compact()

    def set_index_dims(self, index_dims: Sequence[int]) -> None:
        """Index other prefixes of the rows (``index_dims``, as given to ``open``), without adding them again:
        an index over each new prefix is built from the stored vectors (at 1M rows a 128-d one takes
        minutes; queries go on meanwhile), indexes of prefixes left out are deleted. What ``tune`` chose and
        fitted is dropped with the old indexes: run ``tune()`` again. New indexes get a new store's HNSW
        parameters for their prefix (``hnsw_m``/``ef_construction`` if the store was made with them)."""
        self._check_writable()
        self._upkeep.set_index_dims(index_dims)

    def _check_writable(self) -> None:
        self._state.check_open()
        if self.read_only:
            if self._versions.remote is not None:
                raise ReadOnlyError(
                    f"store {self.location} is on object storage, which is read-only: write to a local store "
                    "and upload it with store.publish(url)"
                )
            raise ReadOnlyError(f"store {self.location} was opened with read_only=True")


def open(  # noqa: A001 - mirrors the builtin on purpose: mrlstore.open(path)
    path: str | os.PathLike[str],
    dim: int | None = None,
    *,
    config: StoreConfig | None = None,
    bands: Sequence[int] | None = None,
    metric: str | None = None,
    dtype: str | None = None,
    index_dims: Sequence[int] | None = None,
    chunk_rows: int | None = None,
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    prefixes: str | None = None,
    read_only: bool = False,
    encoder: Encoder | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_dims: int | None = None,
) -> Store:
    """Open the store at ``path``, creating it when absent. ``config`` (a :class:`StoreConfig`) gives the
    options below as one value; keywords given beside it override its fields.

    A new store takes its ``dim`` from ``dim``, else from ``encoder``, else it is a 2048-d store for the
    bundled MRL image encoder (loaded on the first ``add``/``query`` of images).

    Creation parameters (``dim``, ``bands``, ``metric`` = "cosine" | "ip" | "l2", ``dtype`` = "float16" |
    "float32", ``index_dims`` (default: 16 and 32), ``chunk_rows``, ``hnsw_m`` (default 16, and 8 for
    prefixes of at most 16 dims; a given value applies to every index), ``ef_construction`` (default 40, and
    200 for prefixes of more than 32 dims; a given value applies to every index), ``prefixes`` =
    "auto" (``tune`` may fit short codes to the store's rows: see :meth:`Store.tune`) | "raw" (never)) are
    persisted; passing a different value on reopen raises :class:`ConfigMismatchError`.

    ``path`` may be an ``s3://bucket/prefix`` URL where :meth:`Store.publish` uploaded a store: it opens
    ``read_only=True``, with credentials and endpoint from ``storage_options`` (pyarrow's or s3fs's names:
    ``key``, ``secret``, ``endpoint_url``, ``region``...) or the AWS environment variables; the small parts
    are downloaded once into ``cache_dir`` (default ``~/.cache/mrlstore``), the vectors read as queries need;
    bands ending at or before ``local_dims`` are downloaded whole into the cache instead (default: every
    band but the widest, within a quarter of RAM, as a local store's open reads them; 0: none), so a query
    fetches only its last stage's rows, from every chunk in one round of requests.
    """
    given = (config if config is not None else StoreConfig()).replaced(
        dim=dim, bands=bands, metric=metric, dtype=dtype, index_dims=index_dims, chunk_rows=chunk_rows,
        hnsw_m=hnsw_m, ef_construction=ef_construction, prefixes=prefixes, read_only=read_only, encoder=encoder,
        storage_options=storage_options, cache_dir=cache_dir, local_dims=local_dims,
    )  # fmt: skip
    return Store(path, given)
