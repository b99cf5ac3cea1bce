"""Staged writes: many workers write checked fragments beside the store in parallel, then one commit makes
all of them visible at once (or none of them). Used by :class:`mrlstore.integrations.ray.StoreSink`; needs neither Ray
nor the store's engines, so a fragment is written wherever a worker runs.

A fragment is one Arrow IPC file: ``_id`` (string), ``_vector`` (fixed-size list of the store's dtype) and
the metadata columns. It is written to a temporary name and renamed, so a fragment that exists is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore.errors import InvalidInputError, MetadataError
from mrlstore.inputs.arrow import column, to_matrix
from mrlstore.inputs.vectors import id_list, metadata_table, vector_batch

ID_FIELD, VECTOR_FIELD = "_id", "_vector"


@dataclass(frozen=True)
class StoreShape:
    """What a worker needs to check and convert vectors for a store without opening it."""

    dim: int
    dtype: str
    metric: str
    index_dims: tuple[int, ...]

    def checked(self, vectors: Any) -> np.ndarray:
        """``vectors`` checked as the store checks an add, in the stored dtype."""
        batch = vector_batch(vectors, self.dim, self.dtype, self.metric, self.index_dims)
        return np.ascontiguousarray(batch, dtype=np.dtype(self.dtype))


def checked_rows(
    table: pa.Table, vector: str, id: str | None, shape: StoreShape
) -> tuple[np.ndarray, list[str], pa.Table | None]:  # noqa: A002
    """The rows of ``table`` checked as an add checks them: (vectors in the stored dtype, ids, metadata or
    None). Vectors come from column ``vector``, ids from ``id`` (None: generated), every other column is
    metadata."""
    vectors = shape.checked(to_matrix(column(table, vector, "vector")))
    n = len(vectors)
    ids = id_list(column(table, id, "id").to_pylist() if id is not None else None, n)
    rest = [name for name in table.column_names if name not in (vector, id)]
    return vectors, ids, metadata_table(table.select(rest), n) if rest else None


def write_fragment(directory: Path, table: pa.Table, vector: str, id: str | None, shape: StoreShape) -> dict[str, Any]:  # noqa: A002
    """Check the rows of ``table`` (as ``checked_rows``) and write them as one fragment in ``directory``;
    returns ``{"path", "rows"}``."""
    vectors, ids, meta = checked_rows(table, vector, id, shape)
    flat = pa.array(vectors.reshape(-1), type=pa.from_numpy_dtype(vectors.dtype))
    vector_column = pa.FixedSizeListArray.from_arrays(flat, shape.dim)
    return {"path": str(save_fragment(directory, ids, meta, vector_column)), "rows": len(ids)}


def save_fragment(directory: Path, ids: list[str], meta: pa.Table | None, vectors: pa.Array | None = None) -> Path:
    """Ids, vectors (None: written in place elsewhere) and metadata as one fragment file in ``directory``."""
    out = pa.table({ID_FIELD: pa.array(ids, pa.string())})
    if vectors is not None:
        out = out.append_column(VECTOR_FIELD, vectors)
    if meta is not None:
        for name in meta.column_names:
            out = out.append_column(name, meta.column(name))
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / f"{uuid.uuid4().hex}.arrow"
    tmp = directory / f".{dest.name}.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, out.schema) as writer:
        writer.write_table(out)
    os.replace(tmp, dest)
    return dest


class Fragments:
    """The fragments of one commit, read one at a time through memory maps, so that reading them costs memory
    for one fragment at most (``whole()`` gathers every id and metadata row, for a commit that needs them)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], shape: StoreShape):
        self.paths = [Path(p) for p in paths]
        self.shape = shape
        self.rows = [self._open(p).num_rows for p in self.paths]  # each checked to be a fragment of this store

    def __len__(self) -> int:
        return sum(self.rows)

    def vectors(self) -> Iterator[np.ndarray]:
        """Each fragment's vectors in order, checked again (a fragment is a file anyone could touch)."""
        for path in self.paths:
            table = self._open(path)
            if VECTOR_FIELD not in table.column_names:
                raise InvalidInputError(f"staged fragment {path} holds no vectors (they were written in place)")
            flat = table.column(VECTOR_FIELD).combine_chunks().flatten()
            yield self.shape.checked(flat.to_numpy(zero_copy_only=False).reshape(table.num_rows, self.shape.dim))

    def catalog_tables(self) -> Iterator[pa.Table]:
        """Each fragment's ``id`` and metadata columns, checked as an add checks them (ids repeated within a
        fragment are refused here, across fragments by the catalog)."""
        for i in range(len(self.paths)):
            yield self.catalog_table(i)

    def catalog_table(self, i: int, offset: int = 0, rows: int | None = None) -> pa.Table:
        """Rows ``offset..offset+rows`` (None: to the end) of fragment ``i``'s ids and metadata, checked."""
        table = self._open(self.paths[i])
        if VECTOR_FIELD in table.column_names:
            table = table.drop_columns([VECTOR_FIELD])
        table = table.slice(offset, rows)
        ids = id_list(table.column(ID_FIELD).to_pylist(), table.num_rows)
        meta = metadata_table(table.drop_columns([ID_FIELD]), table.num_rows) if table.num_columns > 1 else None
        id_column = pa.array(ids, pa.string())
        return pa.table({"id": id_column}) if meta is None else meta.add_column(0, "id", id_column)

    def metadata_columns(self, existing: Collection[str] = ()) -> pa.Table | None:
        """The metadata columns of every fragment, typed to hold all of them (an int column of one and a
        float of another: float; all nulls in one: the other's type), as an empty table: what the catalog
        makes first, so that the stored types do not depend on which worker finished first. A column of
        types that do not unify is a MetadataError, unless it is one of the ``existing`` columns (whose
        type each value must then fit). None when no fragment has metadata."""
        fields: dict[str, list[pa.Field]] = {}
        for path in self.paths:
            table = self._open(path).slice(0, 0)
            meta = table.drop_columns([c for c in (ID_FIELD, VECTOR_FIELD) if c in table.column_names])
            converted = metadata_table(meta, 0) if meta.num_columns else None
            for field in converted.schema if converted is not None else ():
                fields.setdefault(field.name, []).append(field)
        known = {name.lower() for name in existing}
        merged = [f for name, group in fields.items() if (f := _unified(name, group, name.lower() in known))]
        return pa.schema(merged).empty_table() if merged else None

    def whole(self) -> tuple[list[str], pa.Table | None]:
        """Every id (repeats across fragments refused) and the metadata rows, all at once."""
        tables = list(self.catalog_tables())
        ids = id_list([i for t in tables for i in t.column("id").to_pylist()], len(self))
        if not any(t.num_columns > 1 for t in tables):
            return ids, None
        try:
            merged = pa.concat_tables([t.drop_columns(["id"]) for t in tables], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise MetadataError(f"the workers' metadata columns do not agree on their types: {e}") from None
        return ids, metadata_table(merged, len(ids))

    def _open(self, path: Path) -> pa.Table:
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise InvalidInputError(f"staged fragment {path} cannot be read: {e}") from None
        names = table.column_names
        vectors_fit = VECTOR_FIELD not in names or (
            names[1] == VECTOR_FIELD
            and getattr(table.schema.field(VECTOR_FIELD).type, "list_size", -1) == self.shape.dim
        )
        if names[:1] != [ID_FIELD] or not vectors_fit:
            raise InvalidInputError(f"{path} is not a staged fragment of this store (columns {names[:3]}...)")
        return table


def _unified(name: str, fields: list[pa.Field], existing: bool) -> pa.Field | None:
    """One metadata column's type over the fragments that have it, the same whatever order they came in;
    None for an existing column whose fragments disagree (the catalog's type rules then apply)."""
    plain = (f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in fields)
    ordered = sorted({str(f.type): f for f in plain}.items())
    try:
        return pa.unify_schemas([pa.schema([f]) for _, f in ordered], promote_options="permissive").field(0)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        if existing:
            return None
        types = ", ".join(kind for kind, _ in ordered)
        raise MetadataError(
            f"metadata column {name!r} has types that do not unify in the workers' blocks ({types}): "
            "give it one type in every block"
        ) from None


def new_staging_dir(root: Path) -> Path:
    """A fresh folder for one staged write under ``root`` (usually the store's ``staging`` folder)."""
    return root / uuid.uuid4().hex


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
