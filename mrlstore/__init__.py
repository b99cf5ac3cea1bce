"""mrlstore: a tiered embeddings store for Matryoshka (MRL) vectors.

Zarr v3 dimension bands on disk, hnswlib HNSW over short prefixes in memory, DuckDB for ids and metadata,
and coarse-to-fine ("funnel") queries: ``store.query(vector, k=10, dims=[16, 2048])``.
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    ReadOnlyError,
    ShapeError,
    StoreAccessError,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    TuningError,
    UnknownIdError,
    UnreadableImageError,
    UnsupportedStorageError,
    ZeroVectorError,
)
from mrlstore.results import CompactResult, Hits, HitsBatch, StoreInfo, TuneResult
from mrlstore.store import Store, open


def load_encoder(path=None, device=None):  # noqa: ANN001, ANN201 - typed in mrlstore.encoder.model
    """The bundled MRL image encoder, or one saved at ``path`` (imports torch on first use)."""
    from mrlstore.inputs.images import load_bundled_encoder

    return load_bundled_encoder(path, device=device)


__all__ = [
    "ConfigMismatchError",
    "CorruptStoreError",
    "DuplicateIdError",
    "EmptyStoreError",
    "Encoder",
    "EncoderUnavailableError",
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
    "ReadOnlyError",
    "ShapeError",
    "StoreAccessError",
    "Store",
    "StoreClosedError",
    "StoreLockedError",
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
