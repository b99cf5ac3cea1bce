"""Arrow out: the committed rows as record batches (id, metadata, an optional vector prefix), and Parquet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

EXPORT_BATCH_ROWS = 8192  # rows per batch: memory stays bounded whatever the store's size


def batches(snap: Any, vectors: Any, dims: int | None, batch_rows: int = EXPORT_BATCH_ROWS) -> Iterator[pa.Table]:
    """The live rows of ``snap`` in row order, ``batch_rows`` at a time: id, metadata, and ``vector`` (the
    first ``dims`` numbers as float32) when ``dims`` is given."""
    live = np.flatnonzero(snap.live[: snap.watermark])
    for lo in range(0, max(len(live), 1), batch_rows):
        rows = live[lo : lo + batch_rows]
        table = snap.table.take(rows)
        if dims:
            flat = pa.array(vectors.gather(rows, 0, dims).reshape(-1), pa.float32())
            table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, dims))
        yield table


def write_parquet(tables: Iterator[pa.Table], dest: Path) -> int:
    """Write the tables to ``dest`` as one Parquet file, atomically (a temporary file renamed into place);
    returns the number of rows."""
    import pyarrow.parquet as pq

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    rows = 0
    writer = None
    try:
        for table in tables:
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, dest)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return rows
