"""Query results."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from .metadata import HitRows, records


class Hits:
    """The results of one query, best first.

    ``scores`` are cosine similarity or inner product (higher is better) or Euclidean distance for
    ``l2`` (lower is better), computed exactly on the last prefix of ``dims``. ``metadata`` is a list of
    dicts (one per hit, empty when the query asked for none), built on first access from the Arrow table
    the query returned (``to_arrow`` uses that table directly).
    """

    __slots__ = ("ids", "scores", "dims", "_table", "_rows", "_metadata")

    def __init__(
        self,
        ids: list[str],
        scores: np.ndarray,
        metadata: list[dict[str, Any]] | pa.Table | HitRows | None = None,
        dims: tuple[int, ...] = (),
    ):
        self.ids = ids
        self.scores = scores
        self.dims = dims
        self._table = metadata if isinstance(metadata, pa.Table) else None
        self._rows = metadata if isinstance(metadata, HitRows) else None
        self._metadata = None if isinstance(metadata, (pa.Table, HitRows)) else list(metadata or [])

    @property
    def metadata(self) -> list[dict[str, Any]]:
        if self._metadata is None:
            self._metadata = self._rows.records() if self._rows is not None else records(self._table, len(self.ids))
        return self._metadata

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[str, float, dict[str, Any]]]:
        meta = self.metadata or [{} for _ in self.ids]
        return iter(zip(self.ids, self.scores.tolist(), meta))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hits):
            return NotImplemented
        return (
            self.ids == other.ids
            and np.array_equal(self.scores, other.scores)
            and self.dims == other.dims
            and self.metadata == other.metadata
        )

    def to_arrow(self) -> pa.Table:
        cols: dict[str, Any] = {
            "id": pa.array(self.ids, pa.string()),
            "score": pa.array(np.asarray(self.scores, dtype=np.float64)),
        }
        if self._rows is not None:
            self._table, self._rows = self._rows.arrow(), None
        if self._table is not None and self._table.num_columns:
            for name in self._table.column_names:
                cols[name] = self._table.column(name)
            return pa.table(cols)
        names: dict[str, None] = {}
        for m in self.metadata:
            names.update(dict.fromkeys(m))
        for name in names:
            cols[name] = pa.array([m.get(name) for m in self.metadata])
        return pa.table(cols)

    def to_pandas(self):  # -> pandas.DataFrame (pandas is optional)
        return self.to_arrow().to_pandas()

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{s:.4f}" for i, s in zip(self.ids[:5], self.scores[:5]))
        more = ", ..." if len(self.ids) > 5 else ""
        return f"Hits(n={len(self.ids)}, dims={list(self.dims)}, [{shown}{more}])"
