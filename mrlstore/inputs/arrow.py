"""Arrow in and out: vector columns as matrices (no Python loop over rows), record batches from the inputs
pipelines hold, and the store's rows and query results as Arrow.

Vector columns: a ``FixedSizeListArray``, a ``ListArray``/``LargeListArray`` of equal-length lists, a
``ChunkedArray`` of either, or a pandas Series of arrays. Record batch sources for ``add_arrow``: a
``pa.Table``, a ``pa.RecordBatchReader``, any iterable of ``RecordBatch``es (or tables), a pandas
DataFrame, or a DuckDB relation (read through its own Arrow reader).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrlstore.errors import InvalidInputError, ShapeError
from mrlstore.results import HitsBatch


def is_vector_column(x: Any) -> bool:
    """Whether ``x`` is an Arrow list column (or a tensor column stored as lists: Arrow's canonical
    ``fixed_shape_tensor``, Ray's tensor columns) or a pandas Series: vectors, never images."""
    if isinstance(x, (pa.Array, pa.ChunkedArray)):
        kind = x.type.storage_type if isinstance(x.type, pa.BaseExtensionType) else x.type
        return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return type(x).__name__ == "Series" and hasattr(x, "to_numpy")  # pandas, without importing it


def _list_storage(x: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A tensor extension column (Arrow's ``fixed_shape_tensor``, Ray's ``map_batches`` output of 2-D numpy
    arrays) as the list column it is stored as, without a copy; other columns as they are."""
    kind = x.type
    if not isinstance(kind, pa.BaseExtensionType):
        return x
    shape = getattr(kind, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ShapeError(f"a tensor column of shape {tuple(shape)} per row: a vector is one dimension per row")
    if isinstance(x, pa.ChunkedArray):
        return pa.chunked_array([chunk.storage for chunk in x.chunks], type=kind.storage_type)
    return x.storage


def to_matrix(x: Any) -> np.ndarray:
    """A vector column as an (n, d) numpy array (zero-copy for float FixedSizeLists, fixed-shape tensors or
    Ray tensor columns without nulls, in one chunk)."""
    if type(x).__name__ == "Series":
        values = x.to_numpy()
        if values.dtype != object:
            return values.reshape(-1, 1) if values.ndim == 1 else values
        try:
            return np.stack(values) if len(values) else np.empty((0, 0), np.float32)
        except ValueError as e:
            raise ShapeError(f"a Series of vectors must hold equal-length arrays: {e}") from None
    x = _list_storage(x)
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks() if x.num_chunks != 1 else x.chunk(0)
    if x.null_count:
        raise ShapeError(f"the vector column has {x.null_count} null vector(s)")
    if pa.types.is_fixed_size_list(x.type):
        width = x.type.list_size
    elif not (pa.types.is_list(x.type) or pa.types.is_large_list(x.type)):
        raise ShapeError(f"a vector column holds lists of numbers (or a fixed-shape tensor), got {x.type}")
    else:
        lengths = pc.list_value_length(x).to_numpy()
        if len(lengths) and (lengths != lengths[0]).any():
            raise ShapeError(f"vectors must all have one length, got lengths from {lengths.min()} to {lengths.max()}")
        width = int(lengths[0]) if len(lengths) else 0
    flat = x.flatten()
    if flat.null_count:
        raise ShapeError("the vector column holds null values inside vectors")
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise ShapeError(f"vectors must be numeric, got lists of {flat.type}")
    return flat.to_numpy(zero_copy_only=False).reshape(len(x), width)


def record_batches(data: Any, rows: int) -> Iterator[pa.RecordBatch]:
    """``data`` as record batches of at most ``rows`` rows, read lazily (memory: a batch or so)."""
    if type(data).__name__ == "DataFrame" and hasattr(data, "columns"):  # pandas
        data = pa.Table.from_pandas(data, preserve_index=False)
    elif hasattr(data, "to_arrow_reader"):  # a DuckDB relation (1.4+)
        data = data.to_arrow_reader(rows)
    elif hasattr(data, "fetch_record_batch"):  # a DuckDB relation (older)
        data = data.fetch_record_batch(rows)
    if isinstance(data, (pa.RecordBatch, pa.Table)):
        data = [data]
    if not isinstance(data, (pa.RecordBatchReader, Iterable)) or isinstance(data, (str, bytes, dict)):
        raise InvalidInputError(
            f"add_arrow reads a pa.Table, a RecordBatchReader, an iterable of RecordBatches, a pandas DataFrame "
            f"or a DuckDB relation, got {type(data).__name__}"
        )
    yield from _rebatched(_batches_of(data), rows)


def _batches_of(data: Iterable[Any]) -> Iterator[pa.RecordBatch]:
    for item in data:
        if isinstance(item, pa.Table):
            yield from item.to_batches()
        elif isinstance(item, pa.RecordBatch):
            yield item
        else:
            raise InvalidInputError(f"expected RecordBatches, got a {type(item).__name__}")


def _rebatched(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of ``rows`` rows (the last may be shorter): large ones sliced without a copy, small ones
    merged (a commit has a fixed cost)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        for lo in range(0, batch.num_rows, rows):
            piece = batch.slice(lo, rows)
            if not pending and piece.num_rows == rows:
                yield piece
                continue
            pending.append(piece)
            count += piece.num_rows
            if count >= rows:  # pieces hold fewer than rows each: one full batch out, the rest waits
                merged = pa.Table.from_batches(pending).combine_chunks()
                yield from merged.slice(0, rows).to_batches()
                rest = merged.slice(rows)
                pending, count = [b for b in rest.to_batches() if b.num_rows], rest.num_rows
    if count:
        yield from pa.Table.from_batches(pending).combine_chunks().to_batches()


def column(batch: pa.RecordBatch, name: str, role: str) -> pa.Array:
    if name not in batch.schema.names:
        raise InvalidInputError(f"no {role} column {name!r}: the data has {batch.schema.names}")
    return batch.column(name)


def is_table(x: Any) -> bool:
    """A table of rows (Arrow, pandas, DuckDB), as opposed to a vector column, an array or images."""
    if isinstance(x, (pa.Table, pa.RecordBatch, pa.RecordBatchReader)):
        return True
    return type(x).__name__ in ("DataFrame", "DuckDBPyRelation") and hasattr(x, "columns")


# -- out ---------------------------------------------------------------------------------------------------
SCAN_BATCH_ROWS = 8192  # rows per batch out: memory stays bounded whatever the store's size


def scan_batches(
    snap: Any, vectors: Any, rows: np.ndarray, dims: int | None, columns: list[str] | None, batch_rows: int
) -> pa.RecordBatchReader:
    """Rows ``rows`` (ascending) of ``snap`` as a reader of batches: id, the metadata ``columns`` (default
    all), and ``vector`` (the first ``dims`` numbers, float32) when ``dims`` is given."""
    names = snap.table.columns
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise InvalidInputError(f"no metadata column(s) {missing}; the store has {names}")
        names = list(columns)
    first = snap.table.take(rows[:0]).select(["id", *names])
    fields = list(first.schema)
    if dims:
        fields.append(pa.field("vector", pa.list_(pa.float32(), dims)))
    schema = pa.schema(fields)

    def generate() -> Iterator[pa.RecordBatch]:
        for lo in range(0, len(rows), batch_rows):
            part = rows[lo : lo + batch_rows]
            table = snap.table.take(part).select(["id", *names])
            if dims:
                flat = pa.array(vectors.gather(part, 0, dims).reshape(-1), pa.float32())
                table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, dims))
            yield from table.cast(schema).to_batches(max_chunksize=batch_rows)

    return pa.RecordBatchReader.from_batches(schema, generate())


def write_parquet(reader: pa.RecordBatchReader, dest: Any) -> int:
    """Write ``reader`` to ``dest`` as one Parquet file, atomically (a temporary file renamed into place);
    returns the number of rows."""
    import os

    import pyarrow.parquet as pq

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


ADD_BATCH_BYTES = 256 << 20  # float32 bytes per committed batch of add_arrow (a commit has a fixed cost)


class ArrowIO:
    """The Arrow half of :class:`mrlstore.Store`: ``add_arrow``, ``scan``, ``to_arrow``,
    ``export_parquet``, ``query_table``. Relies on the store's snapshot, vectors, filters and writes."""

    dim: int

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
        other column as metadata. Streams: ``batch_size`` rows at a time (default: 256 MiB of float32
        vectors; smaller input batches are merged), each batch one atomic commit, so memory stays a few
        batches whatever the input's size and a failure part way keeps every batch committed before it and
        nothing of the failing one. Returns the number of rows added (a count, not the ids: inputs may be
        far larger than memory). ``on_conflict`` ("error", "skip" or "replace") decides for ids already in
        the store, as in ``add_vectors`` (and ``add`` for images); skipped rows are not counted."""
        self._check_open()
        if (vector is None) == (image is None):
            raise InvalidInputError("add_arrow needs exactly one of vector= (a vector column) or image= (images)")
        rows = batch_size or max(1, ADD_BATCH_BYTES // (4 * self.dim))
        added = 0
        for batch in record_batches(data, rows):
            source = column(batch, vector or image or "", "vector" if vector else "image")
            ids = column(batch, id, "id").to_pylist() if id is not None else None
            rest = [n for n in batch.schema.names if n not in (vector, image, id)]
            meta = pa.Table.from_batches([batch.select(rest)]) if rest else None
            if vector is not None:
                before = len(self)
                self.add_vectors(to_matrix(source), ids=ids, metadata=meta, on_conflict=on_conflict)
                added += len(self) - before if on_conflict == "skip" else len(source)
            else:
                images = source.to_pylist()
                added += len(self.add(images, ids=ids, metadata=meta, on_conflict=on_conflict, atomic=True).added)
        return added

    def commit_staged(self, fragments: list[Any]) -> int:
        """Add the rows of staged fragments (files that :func:`mrlstore.inputs.staging.write_fragment` wrote, e.g. by
        the workers of a Ray write) as one commit: all of them become visible at once, or, if any fragment
        is unreadable or any id repeats, none. Returns the number of rows added."""
        from mrlstore.inputs.staging import Fragments

        self._check_open()
        self._check_writable()
        staged = Fragments(fragments, self.staging_shape())
        if len(staged):
            self._commit(staged.vectors(), staged.ids, staged.metadata, replace=False, keep_metadata=False)
        return len(staged)

    def staging_shape(self) -> Any:
        """What workers need to check and write fragments for this store (a :class:`StoreShape`)."""
        from mrlstore.inputs.staging import StoreShape

        return StoreShape(self.dim, self.dtype, self.metric, tuple(self.index_dims))

    def scan(
        self,
        dims: int | None = None,
        columns: list[str] | None = None,
        where: str | None = None,
        batch_size: int = SCAN_BATCH_ROWS,
    ) -> pa.RecordBatchReader:
        """The live entries as a RecordBatchReader (bounded memory): ``id``, the metadata ``columns`` (default
        all), and ``vector``, the first ``dims`` numbers as float32 (none without ``dims``), in row order;
        ``where`` filters like in ``query``. A consistent snapshot: later writes do not show."""
        from mrlstore.inputs.vectors import dims_tuple  # validation reads vector columns through this module

        self._check_open()
        if dims is not None:
            dims = dims_tuple([dims], self.dim)[0]
        snap = self._snap
        rows = self._allowed(where, snap) if where is not None else np.flatnonzero(snap.live[: snap.watermark])
        return scan_batches(snap, self._vectors, rows, dims, columns, batch_size)

    def to_arrow(self, dims: int | None = None, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        """``scan(...)`` as one table."""
        return self.scan(dims, columns, where).read_all()

    def export_parquet(self, dest: Any, dims: int | None = None, columns: list[str] | None = None) -> int:
        """Write ``scan(dims, columns)`` to one Parquet file, atomically, in bounded memory; returns how many
        rows. ``add_arrow(pq.ParquetFile(dest).iter_batches(), vector="vector")`` reads it back."""
        from pathlib import Path

        return write_parquet(self.scan(dims, columns), Path(dest))

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
        the metadata columns; the shape a pipeline joins on. ``queries`` may be a table (pa.Table,
        RecordBatch, pandas DataFrame, ...): its column ``vector`` holds the query vectors, or with
        ``image=`` its column of that name holds images (bytes or paths); other columns are ignored."""
        if is_table(queries):
            table = pa.Table.from_batches(list(record_batches(queries, 1 << 30)))
            source = column(table, image or vector, "image" if image else "vector")
            queries = source.to_pylist() if image else to_matrix(source)
        results = self.query(queries, k=k, dims=dims, **options)
        return (results if isinstance(results, HitsBatch) else HitsBatch([results])).to_arrow()
