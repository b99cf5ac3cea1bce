"""Adding Arrow data: record batches streamed from tables, readers, DataFrames or DuckDB relations, each
batch one commit of its vector column (or its images, through the image adder)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mrlstore.errors import InvalidInputError
from mrlstore.inputs.arrow import column, record_batches, to_matrix
from mrlstore.tiers.params import positive_int
from mrlstore.write.image_adds import ImageAdder
from mrlstore.write.writer import Writer

ADD_BATCH_BYTES = 256 << 20  # float32 bytes per committed batch of add_arrow (a commit has a fixed cost)
# Images per committed batch: sized by vectors, a batch was 32,768 photos, all read from the stream before the
# first commit (60 batches of two 1 MB images: 1 GB more memory); encoding 64 costs far more than a commit.
ADD_BATCH_IMAGES = 64


ARROW_HINT = "add_arrow takes no skip_errors: leave such rows out of the table, or use store.add(..., skip_errors=True)"


def add_arrow(
    writer: Writer,
    images: ImageAdder,
    data: Any,
    vector: str | None,
    id_column: str | None,
    image: str | None,
    batch_size: int | None,
    on_conflict: str,
) -> int:
    """``Store.add_arrow``; returns the number of rows added."""
    if on_conflict not in ("error", "skip", "replace"):
        raise InvalidInputError(f"on_conflict must be 'error', 'skip' or 'replace', got {on_conflict!r}")
    if (vector is None) == (image is None):
        raise InvalidInputError("add_arrow needs exactly one of vector= (a vector column) or image= (images)")
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    rows = batch_size or (ADD_BATCH_IMAGES if image else max(1, ADD_BATCH_BYTES // (4 * writer.state.params.dim)))
    added = 0
    for batch in record_batches(data, rows):
        source = column(batch, vector or image or "", "vector" if vector else "image")
        ids = column(batch, id_column, "id").to_pylist() if id_column is not None else None
        rest = [n for n in batch.schema.names if n not in (vector, image, id_column)]
        meta = pa.Table.from_batches([batch.select(rest)]) if rest else None
        if vector is not None:
            before = writer.state.snap.n_live
            writer.add(to_matrix(source), ids, meta, on_conflict)
            added += writer.state.snap.n_live - before if on_conflict == "skip" else len(source)
        else:
            result = images.add(source.to_pylist(), ids=ids, metadata=meta, on_conflict=on_conflict, atomic=True,
                                hint=ARROW_HINT)  # fmt: skip
            added += len(result.added)
    return added
