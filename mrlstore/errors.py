"""Typed exceptions. Each one is also the matching builtin, so ``except ValueError`` keeps working."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class MRLStoreError(Exception):
    """Base class of every error mrlstore raises on purpose."""


class InvalidInputError(MRLStoreError, ValueError):
    """An argument was rejected before any I/O happened."""


class ShapeError(InvalidInputError):
    """Wrong rank, wrong vector length or an empty batch."""


class NonFiniteError(InvalidInputError):
    """NaN, inf, or a value the storage dtype cannot hold."""


class ZeroVectorError(InvalidInputError):
    """A vector (or an indexed prefix of it) is all zeros under the cosine metric."""


class DuplicateIdError(InvalidInputError):
    """An id occurs twice in a batch, or already exists in the store."""


class InvalidIdError(InvalidInputError, TypeError):
    """Ids must be non-empty strings."""


class MetadataError(InvalidInputError):
    """Metadata has the wrong length, a reserved column name, or a type that conflicts with the store."""


class InvalidFilterError(InvalidInputError):
    """A ``where=`` expression or ``sql()`` statement that DuckDB rejects or that is not allowed."""


class ForbiddenSQLError(InvalidFilterError):
    """``where=`` or ``sql()`` text that reaches past the store's tables (files, the network, extensions,
    settings, ATTACH, COPY) or writes: refused before it runs, and nothing changes."""


class UnreadableImageError(InvalidInputError):
    """An image file, buffer or array that cannot be read or decoded."""


class InvalidDimsError(InvalidInputError):
    """``dims`` is not an increasing list of prefix lengths within the store's dimension."""


class InvalidKError(InvalidInputError):
    """``k`` or ``shortlist`` is not a positive integer."""


class TuningError(InvalidInputError):
    """tune() found no funnel reaching the recall target within its shortlist budget (nothing was saved)."""


class UnknownIdError(MRLStoreError, KeyError):
    """An id that is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class EmptyStoreError(MRLStoreError, LookupError):
    """A query on a store that holds no vectors."""


class StoreNotFoundError(MRLStoreError, FileNotFoundError):
    """The path does not exist and the store may not be created here (``read_only=True``, or a URL)."""


class NotAStoreError(MRLStoreError, ValueError):
    """The path exists but is not an mrlstore folder."""


class ConfigMismatchError(MRLStoreError, ValueError):
    """Reopening with creation parameters that differ from the persisted ones."""


class CorruptStoreError(MRLStoreError, OSError):
    """A file of the store is missing, truncated or inconsistent with the catalog."""


class StorageError(MRLStoreError, OSError):
    """The file system refused a write: no permission, a read-only or full disk, a path under a file. What
    was being written is not committed."""


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file would grow past the size allowed",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_error(action: str, path: str | os.PathLike[str], e: OSError) -> StorageError:
    """A StorageError saying what failed where, in words, from the OSError the file system raised."""
    reason = _REASONS.get(e.errno or 0) or (e.strerror or str(e)).lower()
    existing = Path(os.path.abspath(path))
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing != Path(os.path.abspath(path)) and not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif e.errno == errno.ENOENT and existing != Path(os.path.abspath(path)):
        reason = f"{existing} does not accept new folders"
    error = StorageError(f"cannot {action} {path}: {reason}")
    error.errno = e.errno  # callers may still test it, as for any OSError
    return error


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; True when that cannot be known (a folder this user may not read)."""
    try:
        return path.exists()
    except OSError:
        return True


class OutOfMemoryError(MRLStoreError, MemoryError):
    """The catalog's engine (DuckDB) could not get the memory a call needed. Nothing was changed: a write that
    fails so commits nothing, and the store stays open and usable."""


class ObjectStorageError(MRLStoreError, OSError):
    """Object storage failed: the endpoint is down or unreachable, or a request failed."""


class StoreAccessError(MRLStoreError, PermissionError):
    """Object storage refused the credentials (wrong key or secret, or no permission)."""


class StoreLockedError(MRLStoreError, BlockingIOError):
    """Another writer (this process or another) holds the store."""


class WriteEndedError(MRLStoreError, RuntimeError):
    """A staged write's worker found its write ended (its driver gone, or it committed or failed): it may no
    longer write rows into the store."""


class UnsupportedStorageError(MRLStoreError, ValueError):
    """What the store's storage cannot do: open a URL for writing (stores on object storage are read-only:
    ``publish()`` uploads a local one), write a snapshot or export to a URL, publish or ``report()`` a store
    that is on object storage. A URL other than ``s3://`` is ObjectStorageError."""


class ReadOnlyError(MRLStoreError, PermissionError):
    """A write on a store opened with ``read_only=True``."""


class StoreClosedError(MRLStoreError, RuntimeError):
    """The store was closed."""


class StoreChangedError(MRLStoreError, RuntimeError):
    """A read-only handle's version no longer matches the store's files (a compaction renumbered the rows):
    ``refresh()`` it first."""


class EncoderUnavailableError(MRLStoreError, RuntimeError):
    """``add``/``query`` with images, but the store has no usable encoder."""
