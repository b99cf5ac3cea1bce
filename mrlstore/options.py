""":class:`StoreConfig`: everything ``mrlstore.open()`` takes besides the path, as one frozen value."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mrlstore.encoder.protocol import Encoder

# The fields persisted at creation (a reopen that passes another value raises ConfigMismatchError).
CREATION_FIELDS = (
    "dim", "bands", "metric", "dtype", "index_dims", "chunk_rows", "hnsw_m", "ef_construction", "prefixes",
)  # fmt: skip


@dataclass(frozen=True)
class StoreConfig:
    """How to open a store and, for a new one, how to create it (see :func:`mrlstore.open` for each field).

    ``mrlstore.open(path, config=StoreConfig(dim=768, metric="ip"))`` is ``mrlstore.open(path, dim=768,
    metric="ip")``; keywords given with ``config`` override its fields. ``store.config`` is the config a
    store was opened with, its creation parameters filled in from the store."""

    dim: int | None = None
    bands: Sequence[int] | None = None  # kept as a tuple of ints
    metric: str | None = None
    dtype: str | None = None
    index_dims: Sequence[int] | None = None  # kept as a tuple of ints
    chunk_rows: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    prefixes: str | None = None
    read_only: bool = False
    encoder: Encoder | None = field(default=None, compare=False)
    storage_options: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    cache_dir: str | os.PathLike[str] | None = None
    local_dims: int | None = None  # None: every band but the widest, as a local store's open reads

    def __post_init__(self) -> None:
        for name in ("bands", "index_dims"):  # lists and arrays are welcome; kept as tuples (the value is frozen)
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)) and isinstance(value, Iterable):
                ints = (int(v) if isinstance(v, Integral) and not isinstance(v, bool) else v for v in value)
                object.__setattr__(self, name, tuple(ints))  # numpy's int64 as int; others fail their check

    def creation(self) -> dict[str, Any]:
        """The creation parameters asked for (None where the caller left the choice to the store)."""
        requested = {name: getattr(self, name) for name in CREATION_FIELDS}
        if requested["dim"] is None and self.encoder is not None:
            requested["dim"] = self.encoder.dim
        return requested

    def replaced(self, **changes: Any) -> StoreConfig:
        """This config with the fields ``changes`` (keywords of ``open``) sets to other than their default."""
        defaults = {f.name: f.default for f in fields(self)}
        unknown = sorted(set(changes) - set(defaults))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; StoreConfig has {sorted(defaults)}")
        given = {k: v for k, v in changes.items() if v is not None and not _is_default(v, defaults[k])}
        return self if not given else type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **given})


def _is_default(value: Any, default: Any) -> bool:
    """``read_only=False`` passed to ``open`` leaves a config's own value alone."""
    return isinstance(value, (bool, int)) and type(value) is type(default) and value == default
