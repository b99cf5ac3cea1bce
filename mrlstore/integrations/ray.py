"""Ray Data: embed images on many workers, write a Dataset into a store with one commit, and query a store
from many workers. ``pip install "mrlstore[ray]"``; the only module that imports Ray.

    ds = ray.data.read_binary_files("photos/", include_paths=True)
    ds = ds.map_batches(EmbedImages, fn_constructor_kwargs={"column": "bytes"}, batch_size=64, concurrency=2)
    ds.drop_columns(["bytes"]).write_datasink(StoreSink("photos.mrl", id="path"))

:class:`StoreSink` keeps the store's rules: the driver is the store's only writer while the write runs;
workers check their rows and write their vectors straight into the store's band files, in parallel, at row
ranges a small actor reserves for them past the committed watermark, and their ids and metadata as fragments
beside the store; when every task has finished the driver commits them all at once, copying no vector and
holding neither the store's ids nor its HNSW indexes (with ids in insertion order its memory does not grow
with the write; with random ids it stays near 250 MiB at 2M rows, benchmarks/results/ray_ingest.md);
then a Ray task extends the indexes to the new rows. If a task fails, or the driver dies, nothing of the
write is visible and the store is as it was (a writer that opens the store later erases the rows and the
fragments, after ending the write's lease so that no worker of it writes again).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from mrlstore._fsutil import local_path
from mrlstore.errors import StoreLockedError
from mrlstore.inputs.arrow import column, to_matrix
from mrlstore.inputs.staging import StoreShape, new_staging_dir, remove_staging, write_fragment
from mrlstore.options import StoreConfig
from mrlstore.results import HitsBatch
from mrlstore.store import open as open_store
from mrlstore.tiers.layout import LEASE_FILE, STAGING_DIR
from mrlstore.tiers.locking import WriteLease
from mrlstore.upkeep.staged import RangeWriter, StagedWriter

FRAGMENT_ROWS = 16384  # rows per staged fragment at least (Ray merges smaller blocks): fewer, larger appends


def as_table(batch: Any) -> pa.Table:
    """A Ray batch (pyarrow, pandas, or a dict of numpy columns) as a pa.Table; 2-D columns become
    fixed-size lists, other columns what Ray makes of them (images: its tensor columns)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        rest = BlockAccessor.batch_to_block({k: v for k, v in batch.items() if getattr(v, "ndim", 1) != 2})
        columns = {k: vector_array(v) if getattr(v, "ndim", 1) == 2 else rest.column(k) for k, v in batch.items()}
        return pa.table(columns)
    return BlockAccessor.for_block(batch).to_arrow()


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


class EmbedImages:
    """For ``ds.map_batches(EmbedImages, fn_constructor_kwargs={...}, concurrency=...)``: loads the bundled
    encoder (or one saved at ``encoder_path``) once per worker, on the worker's GPU when Ray gave it one,
    and appends a column ``output`` of vectors (fixed-size lists of float32) made from ``column``, which holds
    image bytes or paths. A file that cannot be decoded fails the task with its name."""

    def __init__(
        self,
        column: str = "image",
        output: str = "embedding",
        *,
        encoder_path: str | os.PathLike[str] | None = None,
        device: str | None = None,
        batch_size: int = 64,
    ):
        from mrlstore.encoder.runner import load_bundled_encoder

        self.column, self.output, self.batch_size = column, output, batch_size
        self.encoder = load_bundled_encoder(encoder_path, device=device or ("cuda" if ray.get_gpu_ids() else "cpu"))

    def __call__(self, batch: Any) -> pa.Table:
        table = as_table(batch)
        images = column(table, self.column, "image").to_pylist()
        if not images:
            return table.append_column(self.output, pa.array([], pa.list_(pa.float32(), self.encoder.dim)))
        vectors = self.encoder.encode(images, batch_size=self.batch_size, progress=False)
        return table.append_column(self.output, vector_array(vectors.astype(np.float32, copy=False)))


class StoreSink(Datasink):
    """``ds.write_datasink(StoreSink(path, vector="embedding", id="id"))``: adds the Dataset's rows to the
    store at ``path`` (created when absent, with ``create`` as in :func:`mrlstore.open`) in one commit.
    Vectors come from the column ``vector``, ids from ``id`` (None: generated), every other column is
    metadata. The sink opens the store as its writer when it is made and closes it when the write ends;
    the driver holds the store's lock, catalog and bands only, and a Ray task opens the store after the
    commit to bring its prefix indexes (a cache the next writer would otherwise extend) up to the new rows.

    By default workers write vectors straight into the store's files (they must reach ``path``: one machine,
    or a shared file system with working flock locks). With ``staging`` (a folder every worker and the
    driver can reach, for a store only the driver can reach) workers write whole rows there instead and the
    driver copies their vectors in at the commit. After the write, ``rows_added`` says how many rows it added
    and ``rows_moved`` how many the commit copied into rows that failed tasks had reserved (normally none)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        vector: str = "embedding",
        id: str | None = "id",  # noqa: A002 - the column's name
        *,
        staging: str | os.PathLike[str] | None = None,
        fragment_rows: int = FRAGMENT_ROWS,
        **create: Any,
    ):
        self.path = local_path(path)  # workers (and the index catch-up) resolve it elsewhere
        # The store's writer until the write ends: its lock, catalog and bands, never its ids or indexes
        self._writer: StagedWriter | None = StagedWriter(self.path, StoreConfig().replaced(**create))
        self.shape: StoreShape = self._writer.shape()
        self.bands = tuple(self._writer.params.bands)
        self.in_place = staging is None
        self.staging = new_staging_dir(local_path(staging) if staging else self.path / STAGING_DIR)
        self.vector, self.id, self.fragment_rows = vector, id, fragment_rows
        self.rows_added: int | None = None
        self.rows_moved = 0  # rows the commit copied into rows that failed tasks had reserved
        self.lease = WriteLease(self.staging / LEASE_FILE)
        self._rows: Any = None
        # a sink dropped without a write (or after one Ray never ended: an interrupt) gives the store back
        self._release = weakref.finalize(self, StagedWriter.close, self._writer)
        if self.in_place:
            try:
                self.lease.grant()
                self._rows = _RowReservations.remote(self._writer.committed_rows())  # type: ignore[attr-defined]
            except BaseException:
                self._finish()
                raise

    def __getstate__(self) -> dict[str, Any]:
        # workers get the settings, never the open store
        return {**self.__dict__, "_writer": None, "_release": None}

    def close(self) -> None:
        """Give the store back without committing anything: for a write that never ended (Ray calls neither
        ``on_write_complete`` nor ``on_write_failed`` when the driver is interrupted) or a sink never used.
        Rows its workers wrote stay invisible; after a write that ended it does nothing."""
        if self._writer is not None:
            self.on_write_failed(RuntimeError("the sink was closed"))

    def __enter__(self) -> StoreSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def min_rows_per_write(self) -> int:
        return self.fragment_rows

    def write(self, blocks: Any, ctx: Any) -> list[dict[str, Any]]:
        """On a worker: each block checked (as an add checks it) and written, in place or as a fragment."""
        tables = (BlockAccessor.for_block(block).to_arrow() for block in blocks)
        tables = (t for t in tables if t.num_rows)
        if not self.in_place:
            return [write_fragment(self.staging, t, self.vector, self.id, self.shape) for t in tables]
        writer = RangeWriter(self.path, self.shape, self.bands, self.staging, self.lease)
        try:
            return [writer.write(t, self.vector, self.id, self._reserve) for t in tables]
        finally:
            writer.close()

    def _reserve(self, rows: int) -> int:
        return int(ray.get(self._rows.reserve.remote(rows)))

    def on_write_complete(self, write_result: Any) -> None:
        """On the driver, after every task succeeded: one commit of every fragment; then a worker brings the
        prefix indexes up to it (the driver never holds them)."""
        try:
            written = [f for returned in write_result.write_returns for f in returned]
            writer = self._staged_writer()
            if self.in_place:
                self.rows_added, self.rows_moved = writer.commit_in_place(written, self.lease)
            else:
                self.rows_added = writer.commit_staged([f["path"] for f in written])
        finally:
            self._finish()
        if self.rows_added:
            self.catch_up_indexes()

    def catch_up_indexes(self) -> None:
        """After a commit: a Ray task opens the store as its writer, which extends the prefix indexes to the
        committed rows and saves them (the driver never loads them)."""
        try:
            ray.get(_catch_up_indexes.remote(str(self.path)))
        except Exception as e:  # the rows are committed; the next writer's open extends the indexes
            warnings.warn(f"{self.path}: the write committed, but extending its indexes failed: {e}", stacklevel=2)

    def on_write_failed(self, error: Exception) -> None:
        try:
            if self.in_place and self._writer is not None:
                self._writer.discard_in_place(self.lease)  # nothing was committed: no worker writes after this
        finally:
            self._finish()  # and the fragments go

    def _staged_writer(self) -> StagedWriter:
        if self._writer is None:
            raise RuntimeError("this StoreSink already finished its write; make a new one for the next write")
        return self._writer

    def _finish(self) -> None:
        try:
            self.lease.revoke(timeout=0)  # the commit or the discard revoked it already
        except StoreLockedError:
            pass  # a hung worker: its rows and fragments wait for the next writer's open, which clears them
        else:
            remove_staging(self.staging)
            if self.in_place:
                try:
                    self.staging.parent.rmdir()  # the store's own staging folder, only when empty
                except OSError:
                    pass
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._release is not None:
                self._release.detach()
        if self._rows is not None:
            ray.kill(self._rows)
            self._rows = None

    def get_name(self) -> str:
        return f"mrlstore({self.path.name})"


@ray.remote(num_cpus=0)
class _RowReservations:
    """The rows past the committed watermark, handed out to in-place writers in disjoint ranges."""

    def __init__(self, first: int):
        self.next = first

    def reserve(self, rows: int) -> int:
        start, self.next = self.next, self.next + rows
        return start


@ray.remote
def _catch_up_indexes(path: str) -> None:
    """Open the store as its writer, which extends the prefix indexes to the committed rows and saves them."""
    open_store(path).close()


class QueryStore:
    """For ``ds.map_batches(QueryStore, fn_constructor_kwargs={"path": ...}, concurrency=...)``: opens the
    store read-only once per worker and appends, for the query vectors in column ``vector``, the columns
    ``hit_ids`` (list of ids, best first) and ``hit_scores``. ``k``, ``dims`` and the other keywords are
    those of :meth:`mrlstore.Store.query`."""

    def __init__(
        self, path: str | os.PathLike[str], k: int = 10, dims: Any = None, *, vector: str = "embedding", **options: Any
    ):
        self.store = open_store(path, read_only=True)
        self.k, self.dims, self.vector, self.options = k, dims, vector, options
        self.options.setdefault("metadata", False)  # ids and scores only: a pipeline joins on ids

    def __call__(self, batch: Any) -> pa.Table:
        table = as_table(batch)
        if not table.num_rows:
            hits: list[Any] = []
        else:
            queries = to_matrix(column(table, self.vector, "vector"))
            found = self.store.query(queries, k=self.k, dims=self.dims, **self.options)
            hits = found if isinstance(found, HitsBatch) else [found]
        offsets = pa.array(np.cumsum([0] + [len(h.ids) for h in hits]), pa.int32())
        ids = pa.ListArray.from_arrays(offsets, pa.array([i for h in hits for i in h.ids], pa.string()))
        scores = [np.asarray(h.scores, np.float32) for h in hits]
        flat = np.concatenate(scores) if scores else np.empty(0, np.float32)
        scores = pa.ListArray.from_arrays(offsets, pa.array(flat))
        return table.append_column("hit_ids", ids).append_column("hit_scores", scores)
