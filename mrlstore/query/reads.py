"""Reading rows out: by id (``get``), by SQL over the catalog, and the live rows as Arrow batches in bounded
memory (``scan``, ``to_arrow``, ``export_parquet``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from mrlstore.errors import InvalidInputError, StorageError, storage_error
from mrlstore.inputs.vectors import check_known, dims_tuple, id_strings
from mrlstore.query.filters import FilterCache
from mrlstore.tiers.abc import RowGather
from mrlstore.tiers.params import positive_int
from mrlstore.tiers.snapshot import Snapshot
from mrlstore.tiers.state import StoreState


class Reader:
    """Rows of one open store by id, by SQL, and as Arrow."""

    def __init__(self, state: StoreState, filters: FilterCache):
        self.state, self.filters = state, filters

    def get(self, ids: Sequence[str], dims: int | None) -> pa.Table:
        """Entries by id, in the order given: id, metadata columns and ``vector`` (the first ``dims``)."""
        state = self.state
        ids = id_strings([ids] if isinstance(ids, str) else ids)
        d = dims_tuple(dims if dims is not None else state.params.dim, state.params.dim)[-1]
        with state.reading():  # the rows the catalog names and the files they are read from agree
            table = state.catalog.items_for_ids(ids)
            if table.num_rows != len(ids):
                check_known(ids, set(table.column("id").to_pylist()))
            rows = table.column("_row").to_numpy()
            vectors = state.vectors.gather(rows, 0, d)
        flat = pa.array(vectors.reshape(-1), pa.float32())
        return table.drop_columns("_row").append_column("vector", pa.FixedSizeListArray.from_arrays(flat, d))

    def vectors_of_ids(self, ids: list[str]) -> np.ndarray:
        """The whole stored vectors of entries ``ids`` as float32 rows, in the order given."""
        column = self.get(ids, None).column("vector").combine_chunks()
        return column.flatten().to_numpy().reshape(len(ids), column.type.list_size)

    def sql(self, query: str) -> pa.Table:
        with self.state.reading():  # not on a catalog a compaction or refresh is closing
            return self.state.catalog.sql(query)

    def scan(
        self, dims: int | None, columns: list[str] | None, where: str | None, batch_size: int
    ) -> pa.RecordBatchReader:
        """The live entries as a reader of batches (see ``Store.scan``); a consistent snapshot."""
        state = self.state
        batch_size = positive_int(batch_size, "batch_size")  # now: iterating the reader is too late to say so
        if dims is not None:
            dims = dims_tuple([dims], state.params.dim)[0]
        with state.reading():  # a snapshot, its filter and its files of one point in time
            snap = state.snap
            # read on after a compaction replaces the files (holding only the bands the scan reads)
            vectors = state.vectors.frozen(snap.watermark, dims) if dims else None
            if where is not None:
                rows = self.filters.allowed(state.catalog, where, snap)
            else:
                rows = np.flatnonzero(snap.live[: snap.watermark])
        return scan_batches(snap, vectors, rows, dims, columns, batch_size)


SCAN_BATCH_ROWS = 8192  # rows per batch out: memory stays bounded whatever the store's size


def scan_batches(
    snap: Snapshot,
    vectors: RowGather | None,
    rows: np.ndarray,
    dims: int | None,
    columns: list[str] | None,
    batch_rows: int,
) -> pa.RecordBatchReader:
    """Rows ``rows`` (ascending) of ``snap`` as a reader of batches: id, the metadata ``columns`` (default
    all), and ``vector`` (the first ``dims`` numbers, float32, read from ``vectors``) when ``dims`` is given."""
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
            if vectors is not None and dims:  # given together
                flat = pa.array(vectors.gather(part, 0, dims).reshape(-1), pa.float32())
                table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, dims))
            yield from table.cast(schema).to_batches(max_chunksize=batch_rows)

    return pa.RecordBatchReader.from_batches(schema, generate())


def write_parquet(reader: pa.RecordBatchReader, dest: Path) -> int:
    """Write ``reader`` to ``dest`` as one Parquet file, atomically (a temporary file renamed into place);
    returns the number of rows."""
    import pyarrow.parquet as pq  # loaded when a file is written

    if dest.is_dir():
        raise InvalidInputError(f"{dest} is a folder: export_parquet writes one file (e.g. {dest / 'out.parquet'})")
    if not dest.parent.is_dir():
        above = dest.parent
        while not above.exists():
            above = above.parent
        problem = f"{dest.parent} does not exist" if above.is_dir() else f"{above} is a file, not a folder"
        raise StorageError(f"cannot write {dest}: {problem}")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error("write", dest, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows
