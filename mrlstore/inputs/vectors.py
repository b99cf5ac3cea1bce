"""Checks that run on a whole batch before any I/O, with messages that say what was expected."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore.errors import (
    DuplicateIdError,
    InvalidDimsError,
    InvalidIdError,
    MetadataError,
    NonFiniteError,
    ShapeError,
    UnknownIdError,
    ZeroVectorError,
)
from mrlstore.inputs.arrow import is_vector_column, to_matrix
from mrlstore.kernels import as_float32, sum_squares

FLOAT16_MAX = 65504.0
VALIDATE_ELEMENTS = 1 << 21  # per validation block: temporaries stay a few MiB whatever the batch
RESERVED_COLUMNS = frozenset({"id", "score", "vector", "query", "rank"})  # the columns of results


def _numeric(x: Any, what: str, keep_float: bool = False) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    elif is_vector_column(x):  # Arrow list columns, pandas Series of arrays
        x = to_matrix(x)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise ShapeError(f"{what} must be a numeric array: {e}") from None
    if arr.dtype.kind not in "fiub":
        raise ShapeError(f"{what} must be numeric, got dtype {arr.dtype}")
    if keep_float and arr.dtype.kind == "f":
        return arr  # converted block by block where it is written: a large memmap is never copied whole
    return arr.astype(np.float32, copy=False)


def _first_bad_row(mask_ok: np.ndarray) -> int:
    return int(np.flatnonzero(~mask_ok)[0])


def vector_batch(vectors: Any, dim: int, dtype: str, metric: str, prefixes: Sequence[int]) -> np.ndarray:
    """The batch (n, dim), checked block by block; float input keeps its dtype (no full-size copy, so a
    memory-mapped array of any size streams through), other numbers become float32.

    Values are stored rounded to ``dtype``; the checks look at the rounded values where that matters.
    """
    arr = _numeric(vectors, "vectors", keep_float=True)
    if arr.ndim != 2:
        hint = " (for one vector use vectors[None, :])" if arr.ndim == 1 else ""
        raise ShapeError(f"vectors must be a 2-D array of shape (n, {dim}), got {arr.ndim}-D{hint}")
    if arr.shape[0] == 0:
        raise ShapeError("empty batch: vectors has no rows")
    if arr.shape[1] != dim:
        raise ShapeError(f"vectors must have length {dim} (the store's dim), got {arr.shape[1]}")
    checks = sorted({*prefixes, dim}) if metric == "cosine" else []
    step = max(1, VALIDATE_ELEMENTS // dim)
    # A value rounds to zero in storage iff its magnitude is at most half the smallest subnormal.
    zero_at_most = 2.0**-25 if dtype == "float16" else 2.0**-150
    for lo in range(0, len(arr), step):
        block = arr[lo : lo + step]
        wide = as_float32(block)  # numpy's float16 arithmetic is a slow scalar loop: widen first
        mag = np.abs(wide, out=wide) if wide is not block else np.abs(block)  # one temporary per block
        peak = mag.max(axis=1)  # NaN or inf anywhere in a row makes its peak non-finite
        finite = np.isfinite(peak)
        if not finite.all():
            raise NonFiniteError(f"vector {lo + _first_bad_row(finite)} of the batch contains NaN or inf")
        if dtype == "float16":
            fits = peak <= FLOAT16_MAX
            if not fits.all():
                raise NonFiniteError(
                    f"vector {lo + _first_bad_row(fits)} has a value beyond float16's range (+-65504); "
                    "scale the vectors or create the store with dtype='float32'"
                )
        prefix_peak, covered = np.zeros(len(block), dtype=mag.dtype), 0
        for d in checks:  # ascending: each prefix's peak extends the previous one
            prefix_peak = np.maximum(prefix_peak, mag[:, covered:d].max(axis=1))
            covered = d
            nonzero = prefix_peak > zero_at_most
            if not nonzero.all():
                what = "is all zeros" if d == dim else f"has an all-zero {d}-d prefix (an indexed prefix)"
                raise ZeroVectorError(
                    f"vector {lo + _first_bad_row(nonzero)} {what} (after rounding to {dtype}); "
                    "cosine similarity is undefined for it"
                )
    return arr


def query_batch(query: Any, need: int, dim: int, metric: str) -> tuple[np.ndarray, bool]:
    """Queries as float32 (m, need) and whether a single 1-D query was given."""
    if type(query) is np.ndarray and query.dtype == np.float32 and query.ndim == 1 and need <= len(query) <= dim:
        # the common call, one float32 vector: the same checks in one or two native calls
        energy = sum_squares(query)
        if not math.isfinite(energy):
            raise NonFiniteError("query 0 contains NaN or inf")
        if metric == "cosine" and not (energy > 0 and (need == len(query) or sum_squares(query[:need]) > 0)):
            raise ZeroVectorError("query 0 is all zeros; cosine is undefined")
        return query[None, :need], True
    arr = _numeric(query, "query")
    single = arr.ndim == 1
    if arr.ndim not in (1, 2):
        raise ShapeError(f"query must be 1-D (one vector) or 2-D (a batch), got {arr.ndim}-D")
    arr = arr[None, :] if single else arr
    if arr.shape[0] == 0:
        raise ShapeError("empty batch: no queries")
    if not (need <= arr.shape[1] <= dim):
        raise ShapeError(f"query vectors must have length between max(dims)={need} and dim={dim}, got {arr.shape[1]}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise NonFiniteError(f"query {_first_bad_row(finite)} contains NaN or inf")
    arr = np.ascontiguousarray(arr[:, :need])
    if metric == "cosine":
        nonzero = np.any(arr != 0, axis=1)
        if not nonzero.all():
            raise ZeroVectorError(f"query {_first_bad_row(nonzero)} is all zeros; cosine is undefined")
    return arr, single


def check_prefix(queries: np.ndarray, d: int) -> None:
    """Cosine queries whose first ``d`` numbers (a funnel's first stage) are all zero: undefined there."""
    if len(queries) == 1:
        if sum_squares(np.ascontiguousarray(queries[0, :d])) > 0:
            return
        raise ZeroVectorError(f"query 0's first {d} numbers are all zeros; cosine is undefined on that prefix")
    nonzero = np.any(queries[:, :d] != 0, axis=1)
    if not nonzero.all():
        raise ZeroVectorError(
            f"query {_first_bad_row(nonzero)}'s first {d} numbers are all zeros; cosine is undefined on that prefix"
        )


def id_list(ids: Any, n: int) -> list[str]:
    if ids is None:
        return [uuid.uuid4().hex for _ in range(n)]
    out = id_strings(ids)
    if len(out) != n:
        raise InvalidIdError(f"got {len(out)} ids for {n} vectors")
    dup = [k for k, c in Counter(out).items() if c > 1]
    if dup:
        raise DuplicateIdError(f"duplicate ids within the batch: {dup[:5]}")
    return out


def check_known(ids: Sequence[str], found: Container[str]) -> None:
    """UnknownIdError naming the ``ids`` not in ``found`` (the ids the store holds among them), if any."""
    missing = [i for i in ids if i not in found]
    if missing:
        raise UnknownIdError(f"{len(missing)} id(s) not in the store, e.g. {missing[:5]}")


def first_positions(ids: Sequence[str]) -> list[int]:
    """Positions of each id's first occurrence, in order (all of them when no id repeats)."""
    seen: dict[str, int] = {}
    for pos, i in enumerate(ids):
        seen.setdefault(i, pos)
    return sorted(seen.values())


def id_strings(ids: Any) -> list[str]:
    """``ids`` as a list of non-empty strings (one string alone counts as one id only where allowed)."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = ids.to_pylist()
    if isinstance(ids, (str, bytes)):
        raise InvalidIdError("ids must be a sequence of strings, not a single string")
    if not hasattr(ids, "__iter__"):
        raise InvalidIdError(f"ids must be a sequence of strings, got {type(ids).__name__}")
    out = []
    for i, v in enumerate(ids):
        if isinstance(v, np.str_):
            v = str(v)
        if not isinstance(v, str) or not v:
            raise InvalidIdError(f"ids must be non-empty strings; ids[{i}] is {v!r}")
        if not v.isascii() and not is_utf8(v):
            raise InvalidIdError(f"ids must be valid Unicode text (UTF-8); ids[{i}] is {v!r}")
        out.append(v)
    return out


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (not so: lone surrogates, as Python decodes file names of other bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_row(row: dict[Any, Any], n: int) -> dict[Any, Any]:
    """A dict given as metadata is every entry's; one whose values are all n-long lists reads as columns,
    which it is not, so it is refused rather than stored as lists in every row."""
    columns = [v for v in row.values() if isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) >= 1 and len(v) == n]
    if n > 1 and row and len(columns) == len(row):
        raise MetadataError(
            f"a dict of {n}-long lists as metadata for {n} entries is ambiguous: pass one dict per entry, or the "
            "columns as pa.table(...) or a pandas DataFrame (a dict is the same metadata for every entry)"
        )
    return row


def metadata_table(metadata: Any, n: int, what: str = "vectors") -> pa.Table | None:
    """Metadata (list of dicts, one dict for every entry, pyarrow Table, pandas DataFrame) as an Arrow table of
    n rows; ``what`` names the entries in messages."""
    if metadata is None:
        return None
    if isinstance(metadata, Mapping):
        metadata = [_one_row(dict(metadata), n)] * n
    try:
        if isinstance(metadata, pa.Table):
            table = metadata
        elif isinstance(metadata, pa.RecordBatch):
            table = pa.Table.from_batches([metadata])
        elif hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):  # pandas, without importing it
            table = pa.Table.from_pandas(metadata, preserve_index=False)
        else:
            rows = list(metadata)
            if len(rows) != n:
                raise MetadataError(f"got {len(rows)} metadata entries for {n} {what}")
            for i, r in enumerate(rows):
                if not isinstance(r, dict):
                    raise MetadataError(f"metadata[{i}] must be a dict, got {type(r).__name__}")
            if not any(rows):
                return None  # every entry empty: no metadata at all
            keys = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, not the first's only
            for key in keys:
                if not isinstance(key, str):
                    raise MetadataError(f"metadata keys must be strings, got {key!r}")
            table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:  # OverflowError: an int past 64 bits
        raise MetadataError(f"metadata values cannot form typed columns: {e}") from None
    except UnicodeError as e:  # text with lone surrogates (from bytes decoded with surrogateescape)
        raise MetadataError(f"metadata text must be valid Unicode: {e}") from None
    if table.num_rows != n:
        raise MetadataError(f"got {table.num_rows} metadata rows for {n} {what}")
    for name in table.column_names:
        if isinstance(name, str) and "\x00" in name:  # DuckDB cuts a name at NUL: 'tag\x00x' went into 'tag'
            raise MetadataError(f"metadata column name {name!r} holds a NUL character")
        if not isinstance(name, str) or not name or name.lower() in RESERVED_COLUMNS or name.startswith("_"):
            raise MetadataError(
                f"metadata column name {name!r} is reserved or invalid (reserved: id, score, vector, query, rank, "
                "and names starting with '_')"
            )
    if len({name.lower() for name in table.column_names}) != len(table.column_names):
        raise MetadataError(
            f"duplicate metadata column names (DuckDB's names ignore case, so 'a' and 'A' are one column): "
            f"{table.column_names}"
        )
    if table.num_columns == 0:
        return None
    for i, field in enumerate(table.schema):
        problem = _nested_problem(field.type)
        if problem:
            raise MetadataError(f"metadata column {field.name!r} holds {problem}")
        if pa.types.is_float16(field.type):  # DuckDB reads no half floats; float32 holds every value
            table = table.set_column(i, field.name, table.column(i).cast(pa.float32()))
    return table


def _nested_problem(kind: pa.DataType) -> str:
    """What the catalog cannot store in a column of ``kind`` ("" for nothing): dicts without keys, keys with
    NUL, keys that differ only in case (DuckDB's struct fields ignore case), durations."""
    if pa.types.is_duration(kind) or pa.types.is_interval(kind):
        return ("durations (timedelta), which the catalog keeps as intervals that come back as another type "
                "and that Parquet export cannot write: give them as numbers (seconds)")  # fmt: skip
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        if not names:
            return ("an empty dict (a struct without fields), which the catalog cannot store: leave the key out, "
                    "or give it None")  # fmt: skip
        if any("\x00" in name for name in names):
            return f"a dict key with a NUL character: {[n for n in names if chr(0) in n]!r}"
        if len({name.lower() for name in names}) != len(names):
            return f"dict keys that differ only in case, which the catalog takes for one: {names}"
    return next(filter(None, (_nested_problem(kind.field(i).type) for i in range(kind.num_fields))), "")


def dims_tuple(dims: Any, dim: int) -> tuple[int, ...]:
    try:
        seq = [dims] if isinstance(dims, (int, np.integer)) else list(dims)
    except TypeError:
        seq = None  # not iterable: a float
    if seq is None or isinstance(dims, (str, bytes)):
        raise InvalidDimsError(f"dims must be an integer or a sequence of integers, got {dims!r}")
    if not seq:
        raise InvalidDimsError("dims must name at least one prefix length")
    for d in seq:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise InvalidDimsError(f"dims must be integers, got {d!r}")
        if not 1 <= d <= dim:
            raise InvalidDimsError(f"dims must lie in 1..{dim} (the store's dim), got {d}")
    if any(b <= a for a, b in zip(seq, seq[1:])):
        raise InvalidDimsError(f"dims must be strictly increasing, got {seq}")
    return tuple(int(d) for d in seq)
