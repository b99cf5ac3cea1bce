"""An in-memory, immutable Arrow copy of the committed ids and metadata, one table row per store row.

A query's hits take their ids and metadata from here instead of a DuckDB round trip (about 3.7 ms each):
one Arrow ``take`` for the whole batch of queries. Row ``r`` of the store is row ``r`` of the table, so the
table always has exactly ``watermark`` rows; rows deleted before the store was opened hold nulls, rows
deleted since keep their values (queries never return either). The copy is built from the catalog on open
and extended with exactly what each commit stored (the catalog returns the inserted rows), so it agrees
with the catalog at the snapshot it belongs to. Columnar: at 1M rows the ids take about 10 MB, where a
Python string per row took 60.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrlstore.errors import MetadataError

ID = "id"
_MIN_TAIL = 4096  # rows: below this the tail never folds into the base


class RowTable:
    """Column ``id`` and the metadata columns, row ``r`` at position ``r``.

    Held as two single-chunk tables, a large ``base`` and a small ``tail`` that each commit extends:
    Arrow's take on a chunked column concatenates every chunk first (560 µs for 10 rows of a 1M-row,
    16-chunk table, 8 µs on one chunk). The tail folds into the base once it reaches 1/32 of it (so few
    queries touch it: a take across both costs about 40 µs), and commits copy amortised O(1) per row.
    """

    def __init__(self, base: pa.Table, tail: pa.Table | None = None):
        self.base, self.tail = base, tail
        self.rows = base.num_rows + (tail.num_rows if tail is not None else 0)
        self._base_ids = _StringGather.of(base.column(ID)) if ID in base.column_names else None
        self._base_meta: pa.Table | None = None
        self._gathers: list[tuple[str, Any]] | None = None  # fast readers of the base's metadata columns

    @classmethod
    def from_catalog(cls, live_rows: np.ndarray, live: pa.Table, rows: int) -> RowTable:
        """From the catalog's live rows (ascending) and their id + metadata columns, for ``rows`` rows."""
        if len(live_rows) == rows:
            return cls(live.combine_chunks())
        position = np.full(rows, -1, dtype=np.int64)
        position[live_rows] = np.arange(len(live_rows))
        return cls(live.take(pa.array(position, mask=position < 0)).combine_chunks())

    def appended(self, batch: pa.Table) -> RowTable:
        """A new copy with ``batch`` (the next rows, as the catalog stored them: ``id`` and metadata) added."""
        tail = _concat([self.tail, batch]) if self.tail is not None else batch.combine_chunks()
        if tail.num_rows >= max(_MIN_TAIL, self.base.num_rows // 32):
            return RowTable(_concat([self.base, tail]) if self.base.num_rows else tail)
        # a column new in this batch is added to the base as nulls: every take has every column
        return RowTable(_with_columns_of(self.base, tail), _with_columns_of(tail, self.base))

    @property
    def has_metadata(self) -> bool:
        return self.base.num_columns > 1  # more than the id

    @property
    def columns(self) -> list[str]:
        """The metadata column names."""
        return [name for name in self.base.column_names if name != ID]

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows ``rows`` (any order), in that order."""
        return self._take(rows, self.base, self.tail)

    def metadata_of(self, rows: list[int]) -> pa.Table | None:
        """The metadata columns of ``rows`` (-1: a row of nulls), or None when there are none."""
        if not self.columns:
            return None
        rows_arr = np.asarray(rows, dtype=np.int64)
        present = rows_arr >= 0
        table = self.take(rows_arr[present]).drop_columns([ID])
        if present.all():
            return table
        position = np.cumsum(present) - 1
        return table.take(pa.array(position, mask=~present))

    def take_ids(self, rows: np.ndarray) -> list[str]:
        if self._base_ids is not None and len(rows) and self._in_base(rows):
            ids = self._base_ids.take(rows)
            if ids is not None:
                return ids
        tail = self.tail.select([ID]) if self.tail is not None else None
        return self._take(rows, self.base.select([ID]), tail).column(ID).to_pylist()

    def take_metadata(self, rows: np.ndarray) -> pa.Table | None:
        """The metadata columns of ``rows`` (any order), or None when there are none."""
        if not self.has_metadata:
            return None
        if self._base_meta is None:
            self._base_meta = self.base.drop_columns([ID])
        tail = self.tail.drop_columns([ID]) if self.tail is not None else None
        return self._take(rows, self._base_meta, tail)

    def records(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """The metadata of ``rows`` as one dict per row: gathered column by column straight from the Arrow
        buffers when every column allows it (strings, numbers and booleans without nulls; 8 µs for 10 rows
        and one string column where Arrow's take and to_pylist cost 22), else through Arrow."""
        if self._gathers is None:  # built on first use; empty when a column needs Arrow
            found = [(name, _gather_of(self.base.column(name))) for name in self.columns]
            fast = [(name, g) for name, g in found if g is not None]
            self._gathers = fast if len(fast) == len(found) else []
        if self._gathers and len(rows) and self._in_base(rows):
            out: list[dict[str, Any]] = [{} for _ in rows]
            for name, gather in self._gathers:  # column by column: a third of dict(zip(...)) per row
                values = gather.take(rows)
                if values is None:  # a null among them
                    break
                for record, value in zip(out, values):
                    record[name] = value
            else:
                return out
        return records(self.take_metadata(rows), len(rows))

    def _in_base(self, rows: np.ndarray) -> bool:
        """Whether every row of ``rows`` (rows of this table) lies in the base."""
        return self.tail is None or rows.max() < self.base.num_rows

    @staticmethod
    def _take(rows: np.ndarray, base: pa.Table, tail: pa.Table | None) -> pa.Table:
        n_base = base.num_rows
        if tail is None or (len(rows) and rows.max() < n_base):
            return base.take(rows)
        in_base = rows < n_base
        if not in_base.any():
            return tail.take(rows - n_base)
        parts = _concat([base.take(rows[in_base]), tail.take(rows[~in_base] - n_base)])
        order = np.concatenate([np.flatnonzero(in_base), np.flatnonzero(~in_base)])
        return parts.take(np.argsort(order))


class HitRows:
    """The metadata of one query's hits, read from its snapshot's RowTable when first asked for (a query
    that never reads it pays nothing; one that does pays a few µs for the dicts)."""

    __slots__ = ("table", "rows")

    def __init__(self, table: RowTable, rows: np.ndarray):
        self.table, self.rows = table, rows

    def records(self) -> list[dict[str, Any]]:
        return self.table.records(self.rows)

    def arrow(self) -> pa.Table | None:
        return self.table.take_metadata(self.rows)


class _StringGather:
    """Strings of a single-chunk Arrow string column by row, read straight from its offsets and data
    buffers: about 4 µs for 10 rows where Arrow's take and to_pylist cost about 10."""

    def __init__(self, offsets: np.ndarray, data: memoryview, validity: np.ndarray | None, first: int):
        self.data, self.validity, self.first = data, validity, first
        self.starts: memoryview = offsets.data  # string i spans starts[i]:starts[i + 1]; indexed as Python ints

    @classmethod
    def of(cls, column: pa.ChunkedArray) -> _StringGather | None:
        if column.num_chunks != 1 or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            return None
        arr = column.chunk(0)
        validity, offsets, data = arr.buffers()
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(offsets, dtype=width, count=arr.offset + len(arr) + 1)[arr.offset :]
        bits = np.frombuffer(validity, dtype=np.uint8) if validity is not None and arr.null_count else None
        return cls(offsets, memoryview(data) if data is not None else memoryview(b""), bits, arr.offset)

    def take(self, rows: np.ndarray) -> list[str] | None:
        """The strings at ``rows``, or None when one of them is null (the caller falls back to Arrow)."""
        if self.validity is not None:
            at = rows + self.first
            if not ((self.validity[at >> 3] >> (at & 7)) & 1).all():
                return None
        data, starts = self.data, self.starts
        return [str(data[starts[r] : starts[r + 1]], "utf-8") for r in rows.tolist()]


class _NumberGather:
    """Numbers or booleans of a single-chunk column without nulls, by row, from its numpy view."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def take(self, rows: np.ndarray) -> list[Any]:
        return self.values[rows].tolist()


def _gather_of(column: pa.ChunkedArray) -> _StringGather | _NumberGather | None:
    """A fast by-row reader of ``column`` whose values equal Arrow's to_pylist, or None."""
    if column.num_chunks != 1:
        return None
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _StringGather.of(column)
    numeric = pa.types.is_integer(kind) or (pa.types.is_floating(kind) and not pa.types.is_float16(kind))
    if column.null_count == 0 and (numeric or pa.types.is_boolean(kind)):
        return _NumberGather(column.chunk(0).to_numpy(zero_copy_only=False))
    return None


def _with_columns_of(table: pa.Table, other: pa.Table) -> pa.Table:
    """``table`` plus, as nulls, the columns only ``other`` has (the base grows one only when a commit
    brings a new metadata column)."""
    for field in other.schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One single-chunk table (columns missing from a part become nulls)."""
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


def split_hits(table: pa.Table) -> tuple[list[str], pa.Table]:
    """(ids, the metadata columns) of rows taken from a RowTable."""
    return table.column(ID).to_pylist(), table.drop_columns([ID])


def records(table: pa.Table | None, n: int) -> list[dict[str, Any]]:
    """``n`` rows of ``table`` as dicts (empty dicts when there are no metadata columns)."""
    if table is None or table.num_columns == 0:
        return [{} for _ in range(n)]
    return table.to_pylist()


def kept_metadata(given: pa.Table | None, old: pa.Table | None) -> pa.Table | None:
    """``given`` with the values it leaves out (columns it lacks, nulls) taken from ``old``, the replaced
    entries' metadata (nulls for new entries)."""
    if old is None or given is None:
        return given if old is None else old
    for name in old.column_names:
        if name not in given.column_names:
            given = given.append_column(name, old.column(name))
        elif given.column(name).null_count:
            column, kept = _alike(name, given.column(name), old.column(name))
            given = given.set_column(given.column_names.index(name), name, pc.coalesce(column, kept))
    return given


def overlaid_metadata(old: pa.Table | None, given: pa.Table, gave: dict[str, list[bool]] | None = None) -> pa.Table:
    """``old`` (entries' metadata, None: no columns) with the columns ``given`` gives replaced by its values,
    nulls too (a metadata update clears what it sets to None); ``gave[name]`` says which rows gave column
    ``name`` (None: every row gave every column): the others keep their old value."""
    if old is None:
        return given
    for name in given.column_names:
        values, mask = given.column(name), (gave or {}).get(name)
        if name not in old.column_names:
            old = old.append_column(name, values)
            continue
        if mask is not None and not all(mask):
            values, kept = _alike(name, values, old.column(name))
            values = pc.if_else(pa.array(mask, pa.bool_()), values, kept)
        old = old.set_column(old.column_names.index(name), name, values)
    return old


def _unchanged_cast(values: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    """``values`` cast to ``to``, refused (ArrowInvalid) where the cast changes a value: Arrow's safe cast
    refuses overflow and truncation, but matches struct fields by name (dropping the others, filling the
    missing with null) and turns any nonzero int into True, so {"z": "w"} was stored as {"x": None} and 5 as
    True where add_vectors refuses both. Floats are left to the safe cast (NaN never equals itself), and a
    column of nulls casts to anything."""
    cast = values.cast(to)
    if pa.types.is_floating(values.type) or pa.types.is_null(values.type):  # nothing a round trip would add
        return cast
    if not cast.cast(values.type).equals(values):
        raise pa.ArrowInvalid(f"casting {values.type} to {to} changes values")
    return cast


def _alike(name: str, given: pa.ChunkedArray, old: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """``given`` and ``old`` of one type: the stored one where the given values cast to it (an int given for
    a float column, a key given only as None), else the given one (text such as ' 7' or '2021-1-5' that the
    catalog casts on its way in, but Arrow does not: the old values then go in as text too, and were lost)."""
    if given.type == old.type:
        return given, old
    refused = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
    try:
        return _unchanged_cast(given, old.type), old
    except refused:
        pass
    try:
        return given, _unchanged_cast(old, given.type)
    except refused:
        raise MetadataError(
            f"metadata {name!r}: the values given ({given.type}) and the stored ones kept where they are None "
            f"({old.type}) do not fit one type; give every value of the column, or keep_metadata=False"
        ) from None
