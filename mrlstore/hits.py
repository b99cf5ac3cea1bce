"""Query results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa


@dataclass
class Hits:
    """The results of one query, best first.

    ``scores`` are cosine similarity or inner product (higher is better) or Euclidean distance for
    ``l2`` (lower is better), computed exactly on the last prefix of ``dims``.
    """

    ids: list[str]
    scores: np.ndarray
    metadata: list[dict[str, Any]] = field(default_factory=list)
    dims: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[str, float, dict[str, Any]]]:
        meta = self.metadata or [{} for _ in self.ids]
        return iter(zip(self.ids, self.scores.tolist(), meta))

    def to_arrow(self) -> pa.Table:
        cols: dict[str, Any] = {
            "id": pa.array(self.ids, pa.string()),
            "score": pa.array(np.asarray(self.scores, dtype=np.float64)),
        }
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
