"""Shared helpers of the error tests: a small store's parameters, vectors, and checks that a rejected call
changed nothing (the fixtures built on them are in conftest.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mrlstore

DIM = 64
BANDS = (16, 64)
CHUNK_ROWS = 128
N = 20
IDS = [f"v{i:02d}" for i in range(N)]

Call = Callable[[mrlstore.Store], Any]  # a call on a store that a test expects to be rejected


def make_store(path: Path, **kw: Any) -> mrlstore.Store:
    params: dict[str, Any] = {"dim": DIM, "bands": BANDS, "chunk_rows": CHUNK_ROWS}
    params.update(kw)
    return mrlstore.open(path, **params)


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def query_vec(seed: int = 99) -> np.ndarray:
    return vecs(1, seed)[0]


@contextmanager
def raises(cls: type[Exception], builtin: type[BaseException], match: str | None = None) -> Iterator[Any]:
    """``pytest.raises(cls)`` that also checks the error is an MRLStoreError and the matching builtin."""
    with pytest.raises(cls, match=match) as info:
        yield info
    err = info.value
    assert isinstance(err, mrlstore.MRLStoreError), f"{type(err).__name__} does not derive from MRLStoreError"
    assert isinstance(err, builtin), f"{type(err).__name__} does not derive from {builtin.__name__}"
    assert str(err), "the message is empty"


def file_hashes(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of the store folder except the LOCK file and published/ (copies
    of the catalog for readers: any open may publish one; the content users see is compared separately)."""
    return {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "LOCK" and not f.relative_to(path).as_posix().startswith("published/")
    }


def snapshot(store: mrlstore.Store) -> dict[str, Any]:
    """Files on disk (by hash) plus the logical content that users can see."""
    return {
        "files": file_hashes(store.path),
        "items": store.sql("SELECT * FROM items ORDER BY id").to_pylist(),
        "len": len(store),
    }


def logical(store: mrlstore.Store) -> dict[str, Any]:
    """The logical content only: items table, len, committed rows and every vector."""
    ids = store.sql("SELECT id FROM items ORDER BY id").column("id").to_pylist()
    return {
        "items": store.sql("SELECT * FROM items ORDER BY id").to_pylist(),
        "len": len(store),
        "rows": store.info()["rows"],
        "vectors": store.get(ids).column("vector").to_pylist() if ids else [],
    }


def listing(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def without_root_file_access() -> None:
    """In a child process before exec (``preexec_fn``): drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that even root obeys the permission bits after exec (as a user without permission would)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@contextmanager
def ctrl_c_while_closing(store: mrlstore.Store) -> Iterator[None]:
    """Ctrl-C lands while ``store``'s handle closes its tiers to move to new ones, just after its catalog
    closed (other stores, such as a compaction's new one, close as usual)."""
    from mrlstore.tiers.state import StoreState

    real, state = StoreState.close_tiers, store._state

    def closing(tiers: StoreState) -> None:
        if tiers is not state:
            return real(tiers)
        tiers.catalog.close()
        raise KeyboardInterrupt

    StoreState.close_tiers = closing  # type: ignore[method-assign]
    try:
        yield
    finally:
        StoreState.close_tiers = real  # type: ignore[method-assign]
