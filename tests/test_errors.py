"""Error handling across the store: every error is a typed MRLStoreError and the matching builtin,
with a message; a rejected call (of any kind) leaves the store exactly as it was.

Every error mrlstore raises on purpose derives from ``mrlstore.MRLStoreError`` and from the matching builtin;
a rejected call must leave the store exactly as it was. Shared fixtures: conftest.py (store, empty_store,
store_path, closed_path); helpers: errors_support.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from errors_support import (
    DIM,
    Call,
    logical,
    query_vec,
    snapshot,
    vecs,
)

import mrlstore

# -- the exception hierarchy -----------------------------------------------------------------------------
HIERARCHY = [
    ("InvalidInputError", ValueError),
    ("ShapeError", ValueError),
    ("NonFiniteError", ValueError),
    ("ZeroVectorError", ValueError),
    ("DuplicateIdError", ValueError),
    ("InvalidIdError", ValueError),
    ("InvalidIdError", TypeError),
    ("MetadataError", ValueError),
    ("InvalidFilterError", ValueError),
    ("InvalidDimsError", ValueError),
    ("InvalidKError", ValueError),
    ("UnknownIdError", KeyError),
    ("EmptyStoreError", LookupError),
    ("StoreNotFoundError", FileNotFoundError),
    ("NotAStoreError", ValueError),
    ("ConfigMismatchError", ValueError),
    ("CorruptStoreError", OSError),
    ("StoreLockedError", BlockingIOError),
    ("OutOfMemoryError", MemoryError),
    ("StorageError", OSError),
    ("ObjectStorageError", OSError),
    ("StoreAccessError", PermissionError),
    ("UnreadableImageError", ValueError),
    ("ForbiddenSQLError", ValueError),
    ("TuningError", ValueError),
    ("UnsupportedStorageError", ValueError),
    ("WriteEndedError", RuntimeError),
    ("ReadOnlyError", PermissionError),
    ("StoreChangedError", RuntimeError),
    ("StoreClosedError", RuntimeError),
    ("EncoderUnavailableError", RuntimeError),
]


@pytest.mark.parametrize("name,builtin", HIERARCHY, ids=[f"{n}-{b.__name__}" for n, b in HIERARCHY])
def test_every_error_is_an_mrlstore_error_and_a_builtin(name: str, builtin: type[BaseException]) -> None:
    cls = getattr(mrlstore, name)
    assert name in mrlstore.__all__
    assert issubclass(cls, mrlstore.MRLStoreError)
    assert issubclass(cls, builtin)


def test_unknown_id_error_str_is_the_message_not_a_repr() -> None:
    assert str(mrlstore.UnknownIdError("1 id(s) not in the store")) == "1 id(s) not in the store"


# -- a failed call changes nothing on disk --------------------------------------------------------------
def _nan_batch() -> np.ndarray:
    v = vecs(2, seed=11)
    v[0, 0] = np.nan
    return v


def _f16_overflow_batch() -> np.ndarray:
    v = vecs(2, seed=11)
    v[1, 60] = 1e6
    return v


def _zero_prefix_batch() -> np.ndarray:
    v = vecs(2, seed=11)
    v[0, :16] = 0
    return v


REJECTED: list[tuple[str, Call, type[Exception]]] = [
    ("add-wrong-length", lambda s: s.add_vectors(vecs(2)[:, :48], ids=["a", "b"]), mrlstore.ShapeError),
    ("add-1d", lambda s: s.add_vectors(vecs(1)[0], ids=["a"]), mrlstore.ShapeError),
    ("add-empty", lambda s: s.add_vectors(np.zeros((0, DIM), np.float32)), mrlstore.ShapeError),
    ("add-nan", lambda s: s.add_vectors(_nan_batch(), ids=["a", "b"]), mrlstore.NonFiniteError),
    ("add-f16-overflow", lambda s: s.add_vectors(_f16_overflow_batch(), ids=["a", "b"]), mrlstore.NonFiniteError),
    ("add-zero-prefix", lambda s: s.add_vectors(_zero_prefix_batch(), ids=["a", "b"]), mrlstore.ZeroVectorError),
    ("add-dup-in-batch", lambda s: s.add_vectors(vecs(2), ids=["a", "a"]), mrlstore.DuplicateIdError),
    ("add-dup-in-store", lambda s: s.add_vectors(vecs(2), ids=["a", "v05"]), mrlstore.DuplicateIdError),
    ("add-int-id", lambda s: s.add_vectors(vecs(2), ids=["a", 7]), mrlstore.InvalidIdError),
    ("add-string-ids", lambda s: s.add_vectors(vecs(2), ids="ab"), mrlstore.InvalidIdError),
    ("add-few-ids", lambda s: s.add_vectors(vecs(2), ids=["a"]), mrlstore.InvalidIdError),
    ("add-meta-length", lambda s: s.add_vectors(vecs(2), ids=["a", "b"], metadata=[{"n": 1}]), mrlstore.MetadataError),
    (
        "add-meta-reserved",
        lambda s: s.add_vectors(vecs(2), ids=["a", "b"], metadata=[{"score": 1}, {"score": 2}]),
        mrlstore.MetadataError,
    ),
    ("upsert-no-ids", lambda s: s.upsert_vectors(vecs(1), ids=None), mrlstore.InvalidInputError),
    ("upsert-nan", lambda s: s.upsert_vectors(_nan_batch(), ids=["v01", "v02"]), mrlstore.NonFiniteError),
    ("upsert-dup", lambda s: s.upsert_vectors(vecs(2), ids=["v01", "v01"]), mrlstore.DuplicateIdError),
    ("delete-unknown", lambda s: s.delete(["v01", "nope"]), mrlstore.UnknownIdError),
    ("get-unknown", lambda s: s.get(["v01", "nope"]), mrlstore.UnknownIdError),
    ("query-k0", lambda s: s.query(query_vec(), k=0), mrlstore.InvalidKError),
    ("query-dims", lambda s: s.query(query_vec(), dims=[64, 16]), mrlstore.InvalidDimsError),
    ("query-3d", lambda s: s.query(np.ones((1, 1, DIM))), mrlstore.ShapeError),
    ("query-short", lambda s: s.query(query_vec()[:20]), mrlstore.ShapeError),
    ("query-where-column", lambda s: s.query(query_vec(), where="nope = 1"), mrlstore.InvalidFilterError),
    ("query-where-sql", lambda s: s.query(query_vec(), where="n >"), mrlstore.InvalidFilterError),
    ("query-where-drop", lambda s: s.query(query_vec(), where="1=1; DROP TABLE _items"), mrlstore.InvalidFilterError),
    ("sql-delete", lambda s: s.sql("DELETE FROM _items"), mrlstore.InvalidFilterError),
    ("sql-typo", lambda s: s.sql("SELEC * FROM items"), mrlstore.InvalidFilterError),
]


@pytest.mark.parametrize("call,cls", [(c, e) for _, c, e in REJECTED], ids=[n for n, _, _ in REJECTED])
def test_rejected_call_changes_nothing(store: mrlstore.Store, call: Call, cls: type[Exception]) -> None:
    before = snapshot(store)
    before_logical = logical(store)
    with pytest.raises(cls) as info:
        call(store)
    assert isinstance(info.value, mrlstore.MRLStoreError)
    assert snapshot(store) == before
    assert logical(store) == before_logical
