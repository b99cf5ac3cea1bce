"""mrlstore: a tiered embeddings store for Matryoshka (MRL) vectors.

Zarr v3 dimension bands on disk, hnswlib HNSW over short prefixes in memory, DuckDB for ids and metadata,
and coarse-to-fine ("funnel") queries: ``store.query(vector, k=10, dims=[16, 2048])``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mrlstore._version import __version__
from mrlstore.encoder.protocol import Encoder
from mrlstore.errors import (
    ConfigMismatchError,
    CorruptStoreError,
    DuplicateIdError,
    EmptyStoreError,
    EncoderUnavailableError,
    ForbiddenSQLError,
    InvalidDimsError,
    InvalidFilterError,
    InvalidIdError,
    InvalidInputError,
    InvalidKError,
    MetadataError,
    MRLStoreError,
    NonFiniteError,
    NotAStoreError,
    ObjectStorageError,
    OutOfMemoryError,
    ReadOnlyError,
    ShapeError,
    StorageError,
    StoreAccessError,
    StoreChangedError,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    TuningError,
    UnknownIdError,
    UnreadableImageError,
    UnsupportedStorageError,
    WriteEndedError,
    ZeroVectorError,
)
from mrlstore.options import StoreConfig
from mrlstore.results import AddResult, CompactResult, Failure, Hits, HitsBatch, StoreInfo, TuneResult
from mrlstore.store import Store, open

if TYPE_CHECKING:  # torch loads on the first load_encoder(), or the first use of the name
    from mrlstore.encoder.model import ImageEncoder as ImageEncoder  # named, not in __all__: a * import
    # would load torch


def __getattr__(name: str) -> object:
    if name == "ImageEncoder":  # the type load_encoder() returns, named without importing torch at import
        try:
            from mrlstore.encoder.model import ImageEncoder
        except ImportError as e:  # hasattr() and getattr(..., None) say no, as for any missing name
            raise AttributeError(f"mrlstore.ImageEncoder needs torch: pip install 'mrlstore[images]' ({e})") from e
        return ImageEncoder
    raise AttributeError(f"module 'mrlstore' has no attribute {name!r}")


def load_encoder(
    path: str | os.PathLike[str] | None = None, device: str | None = None, image_size: int | None = None
) -> ImageEncoder:
    """The bundled MRL image encoder, or one saved at ``path`` (imports torch on first use); ``image_size``
    resizes inputs to that many px instead of the size the weights name."""
    from mrlstore.encoder.runner import load_bundled_encoder

    return load_bundled_encoder(path, device=device, image_size=image_size)


__all__ = [
    "ConfigMismatchError",
    "CorruptStoreError",
    "DuplicateIdError",
    "EmptyStoreError",
    "Encoder",
    "EncoderUnavailableError",
    "AddResult",
    "Failure",
    "CompactResult",
    "Hits",
    "HitsBatch",
    "StoreInfo",
    "TuneResult",
    "InvalidDimsError",
    "ForbiddenSQLError",
    "InvalidFilterError",
    "InvalidIdError",
    "InvalidInputError",
    "InvalidKError",
    "MRLStoreError",
    "MetadataError",
    "NonFiniteError",
    "NotAStoreError",
    "ObjectStorageError",
    "OutOfMemoryError",
    "ReadOnlyError",
    "ShapeError",
    "StorageError",
    "StoreAccessError",
    "Store",
    "StoreChangedError",
    "StoreClosedError",
    "StoreConfig",
    "StoreLockedError",
    "WriteEndedError",
    "StoreNotFoundError",
    "TuningError",
    "UnknownIdError",
    "UnreadableImageError",
    "UnsupportedStorageError",
    "ZeroVectorError",
    "__version__",
    "load_encoder",
    "open",
]
