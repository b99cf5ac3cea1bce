"""Arrow in: vector columns as matrices (no Python loop over rows), and record batches from the inputs
pipelines hold.

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


def is_vector_column(x: Any) -> bool:
    """Whether ``x`` is an Arrow list column (or a tensor column stored as lists: Arrow's canonical
    ``fixed_shape_tensor``, Ray's tensor columns) or a pandas Series: vectors, never images."""
    if isinstance(x, (pa.Array, pa.ChunkedArray)):
        kind = x.type.storage_type if isinstance(x.type, pa.BaseExtensionType) else x.type
        return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if type(x).__name__ == "Series" and hasattr(x, "to_numpy"):  # pandas, without importing it
        # vectors as lists or 1-D arrays (or numbers: one vector); paths, files, PIL images, pixels: images
        first = x.iloc[0] if len(x) else None
        return (
            first is None
            or isinstance(first, (list, tuple, int, float, np.number))
            or (isinstance(first, np.ndarray) and first.ndim == 1)
        )
    return False


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
    merged (a commit has a fixed cost), their schemas unified (a column all null in some batches, or in
    some only: ``from_batches`` raised ArrowInvalid); batches whose schemas do not unify go apart."""
    pending: list[pa.RecordBatch] = []
    count = 0
    schema: pa.Schema | None = None  # pending's, unified
    for batch in batches:
        unified = _unify([schema, batch.schema]) if pending and schema is not None else batch.schema
        if unified is None:
            yield from _merged(pending).to_batches()
            pending, count, unified = [], 0, batch.schema
        schema = unified
        for lo in range(0, batch.num_rows, rows):
            piece = batch.slice(lo, rows)
            if not pending and piece.num_rows == rows:
                yield piece
                continue
            pending.append(piece)
            count += piece.num_rows
            if count >= rows:  # pieces hold fewer than rows each: one full batch out, the rest waits
                merged = _merged(pending)
                yield from merged.slice(0, rows).to_batches()
                rest = merged.slice(rows)
                pending, count, schema = [b for b in rest.to_batches() if b.num_rows], rest.num_rows, merged.schema
    if count:
        yield from _merged(pending).to_batches()


def _unify(schemas: list[pa.Schema]) -> pa.Schema | None:
    try:
        return pa.unify_schemas(schemas, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _merged(pending: list[pa.RecordBatch]) -> pa.Table:
    """One table of ``pending`` (their schemas unify; the first batch's columns first)."""
    if all(b.schema.equals(pending[0].schema) for b in pending):
        return pa.Table.from_batches(pending).combine_chunks()
    tables = [pa.Table.from_batches([b]) for b in pending]
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


def column(batch: pa.RecordBatch, name: str, role: str) -> pa.Array:
    if name not in batch.schema.names:
        raise InvalidInputError(f"no {role} column {name!r}: the data has {batch.schema.names}")
    return batch.column(name)


def is_table(x: Any) -> bool:
    """A table of rows (Arrow, pandas, DuckDB), as opposed to a vector column, an array or images."""
    if isinstance(x, (pa.Table, pa.RecordBatch, pa.RecordBatchReader)):
        return True
    return type(x).__name__ in ("DataFrame", "DuckDBPyRelation") and hasattr(x, "columns")
