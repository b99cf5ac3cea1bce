"""Errors of opening: missing paths and things that are not stores, conflicting parameters on reopen,
read-only and closed stores, corrupt stores.
Fixtures: conftest.py; helpers: errors_support.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from errors_support import (
    BANDS,
    DIM,
    Call,
    N,
    file_hashes,
    listing,
    make_store,
    query_vec,
    raises,
    snapshot,
    vecs,
)

import mrlstore


# -- opening: missing paths, things that are not stores ---------------------------------------------------
def test_read_only_open_of_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "parent" / "s"
    with raises(mrlstore.StoreNotFoundError, FileNotFoundError, match="read_only=True never creates one"):
        mrlstore.open(path, read_only=True)
    assert not path.exists()
    assert not path.parent.exists()
    assert listing(tmp_path) == []


def test_open_of_missing_path_without_dim_makes_a_store_for_the_bundled_encoder(tmp_path: Path) -> None:
    path = tmp_path / "s"
    code = (
        "import sys, mrlstore\n"
        f"s = mrlstore.open({str(path)!r})\n"
        "print(s.dim, s.info()['encoder'], 'torch' in sys.modules)\n"
        "s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2048", "bundled", "False"], out.stderr  # torch loads only to encode
    with mrlstore.open(path, dim=2048) as store:
        assert store.info()["encoder"] == "bundled"


def test_read_only_open_of_empty_folder(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir()
    with raises(mrlstore.StoreNotFoundError, FileNotFoundError, match="no store at"):
        mrlstore.open(path, read_only=True)
    assert listing(path) == []


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_open_a_plain_file(tmp_path: Path, read_only: bool) -> None:
    path = tmp_path / "s"
    path.write_text("not a store")
    with raises(mrlstore.NotAStoreError, ValueError, match="not an mrlstore store"):
        mrlstore.open(path, dim=DIM, read_only=read_only)
    assert path.read_text() == "not a store"


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_open_a_non_empty_folder_that_is_not_a_store(tmp_path: Path, read_only: bool) -> None:
    path = tmp_path / "s"
    path.mkdir()
    (path / "notes.txt").write_text("hello")
    with raises(mrlstore.NotAStoreError, ValueError, match="not an mrlstore store"):
        mrlstore.open(path, dim=DIM, read_only=read_only)
    assert listing(path) == ["notes.txt"]


def _foreign_duckdb(path: Path) -> None:
    import duckdb

    path.mkdir()
    con = duckdb.connect(str(path / "catalog.duckdb"))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_open_a_folder_with_a_foreign_duckdb_catalog(tmp_path: Path, read_only: bool) -> None:
    path = tmp_path / "s"
    _foreign_duckdb(path)
    with raises(mrlstore.NotAStoreError, ValueError, match="not an mrlstore catalog"):
        mrlstore.open(path, dim=DIM, read_only=read_only)


def test_read_only_open_of_a_store_without_its_lock_file(closed_path: Path) -> None:
    # LOCK is an advisory lock file that writers recreate; a copy of a store without it is still a store.
    (closed_path / "LOCK").unlink()
    with mrlstore.open(closed_path, read_only=True) as s:
        assert len(s) == N


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_failed_open_of_a_foreign_folder_creates_nothing(tmp_path: Path, read_only: bool) -> None:
    path = tmp_path / "s"
    _foreign_duckdb(path)
    before = {"files": file_hashes(path), "listing": listing(path)}
    with pytest.raises(mrlstore.NotAStoreError):
        mrlstore.open(path, dim=DIM, read_only=read_only)
    assert {"files": file_hashes(path), "listing": listing(path)} == before  # no LOCK file left behind


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"dim": 0}, "dim must be a positive integer"),
        ({"dim": DIM, "bands": (64, 16)}, "bands must be increasing"),
        ({"dim": DIM, "bands": (16, 32)}, "finishing at dim=64"),
        ({"dim": DIM, "metric": "dot"}, "metric must be one of"),
        ({"dim": DIM, "dtype": "int8"}, "dtype must be 'float16' or 'float32'"),
        ({"dim": DIM, "index_dims": (128,)}, "index_dims must be distinct prefix lengths within 1..64"),
        ({"dim": DIM, "chunk_rows": -1}, "chunk_rows must be a positive integer"),
        ({"dim": DIM, "chunk_rows": 2.5}, "chunk_rows must be a positive integer"),
        ({"dim": DIM, "chunk_rows": 0}, "chunk_rows must be a positive integer"),
    ],
    ids=[
        "dim",
        "bands-order",
        "bands-end",
        "metric",
        "dtype",
        "index-dims",
        "chunk-rows-neg",
        "chunk-rows-float",
        "chunk-rows-zero",
    ],
)
def test_invalid_creation_parameters_create_nothing(tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with raises(mrlstore.InvalidInputError, ValueError, match=match):
        mrlstore.open(tmp_path / "s", **kw)
    assert listing(tmp_path) == []  # neither the store nor its temporary ".s.creating-*" folder


# -- reopening with conflicting parameters --------------------------------------------------------------
CONFLICTS = [
    ({"dim": 32}, "dim=64, not 32"),
    ({"metric": "l2"}, "metric='cosine', not 'l2'"),
    ({"bands": (32, 64)}, r"bands=\(16, 64\), not \(32, 64\)"),
    ({"dtype": "float32"}, "dtype='float16', not 'float32'"),
    ({"index_dims": (16, 64)}, r"index_dims=\(16, 32\), not \(16, 64\)"),
    ({"hnsw_m": 8}, "hnsw_M=16, not 8"),
    ({"ef_construction": 100}, "hnsw_ef_construction=40, not 100"),
]


@pytest.mark.parametrize("kw,match", CONFLICTS, ids=[next(iter(kw)) for kw, _ in CONFLICTS])
@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_reopen_with_conflicting_parameters(closed_path: Path, kw: dict[str, Any], match: str, read_only: bool) -> None:
    before = file_hashes(closed_path)
    with raises(mrlstore.ConfigMismatchError, ValueError, match=match):
        mrlstore.open(closed_path, read_only=read_only, **kw)
    assert file_hashes(closed_path) == before
    with mrlstore.open(closed_path) as s:  # the failed open released the lock
        assert len(s) == N


def test_reopen_with_conflicting_chunk_rows(closed_path: Path) -> None:
    # open()'s docstring lists chunk_rows among the persisted parameters that must match on reopen.
    with raises(mrlstore.ConfigMismatchError, ValueError, match="chunk_rows"):
        mrlstore.open(closed_path, chunk_rows=256)


def test_reopen_with_the_same_values(closed_path: Path) -> None:
    with make_store(closed_path, metric="cosine", dtype="float16", index_dims=[32, 16]) as s:
        assert (s.dim, s.bands, s.metric, s.dtype, len(s)) == (DIM, BANDS, "cosine", "float16", N)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_reopen_without_values(closed_path: Path, read_only: bool) -> None:
    with mrlstore.open(closed_path, read_only=read_only) as s:
        assert (s.dim, s.bands, len(s)) == (DIM, BANDS, N)


# -- read-only and closed stores --------------------------------------------------------------------------
READ_ONLY_WRITES: list[tuple[str, Call]] = [
    ("add_vectors", lambda s: s.add_vectors(vecs(1, seed=3), ids=["x"])),
    ("upsert_vectors", lambda s: s.upsert_vectors(vecs(1, seed=3), ids=["v01"])),
    ("delete", lambda s: s.delete(["v01"])),
    ("delete-unknown", lambda s: s.delete(["nope"])),
    ("checkpoint", lambda s: s.checkpoint()),
]


@pytest.mark.parametrize("call", [c for _, c in READ_ONLY_WRITES], ids=[n for n, _ in READ_ONLY_WRITES])
def test_writes_on_a_read_only_store(closed_path: Path, call: Call) -> None:
    with mrlstore.open(closed_path, read_only=True) as s:
        before = snapshot(s)
        with raises(mrlstore.ReadOnlyError, PermissionError, match="read_only=True"):
            call(s)
        assert snapshot(s) == before
        assert len(s.query(query_vec(), k=3)) == 3  # reads still work


def test_read_only_store_rejects_sql_writes(closed_path: Path) -> None:
    with mrlstore.open(closed_path, read_only=True) as s:
        with raises(mrlstore.InvalidFilterError, ValueError):
            s.sql("DELETE FROM _items")


CLOSED_CALLS: list[tuple[str, Call]] = [
    ("len", len),
    ("info", lambda s: s.info()),
    ("add_vectors", lambda s: s.add_vectors(vecs(1, seed=3), ids=["x"])),
    ("upsert_vectors", lambda s: s.upsert_vectors(vecs(1, seed=3), ids=["v01"])),
    ("delete", lambda s: s.delete(["v01"])),
    ("get", lambda s: s.get(["v01"])),
    ("query", lambda s: s.query(query_vec())),
    ("sql", lambda s: s.sql("SELECT 1")),
    ("checkpoint", lambda s: s.checkpoint()),
]


@pytest.mark.parametrize("call", [c for _, c in CLOSED_CALLS], ids=[n for n, _ in CLOSED_CALLS])
def test_operations_on_a_closed_store(store: mrlstore.Store, call: Call) -> None:
    store.close()
    before = file_hashes(store.path)
    with raises(mrlstore.StoreClosedError, RuntimeError, match="is closed"):
        call(store)
    assert file_hashes(store.path) == before
    store.close()  # closing twice is fine
    assert "closed" in repr(store)


# -- corrupt stores -------------------------------------------------------------------------------------
GARBAGE = {
    "random-4k": bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
    "short-text": b"this is not a database",
    "empty": b"",
}


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_corrupt_catalog_file(closed_path: Path, garbage: bytes, read_only: bool) -> None:
    (closed_path / "catalog.duckdb").write_bytes(garbage)
    with pytest.raises((mrlstore.CorruptStoreError, mrlstore.NotAStoreError), match="catalog") as info:
        mrlstore.open(closed_path, read_only=read_only)
    assert isinstance(info.value, mrlstore.MRLStoreError)
    assert type(info.value).__module__ == "mrlstore.errors"  # never a raw duckdb exception
    assert (closed_path / "catalog.duckdb").read_bytes() == garbage


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_truncated_catalog_file(closed_path: Path, read_only: bool) -> None:
    # A valid DuckDB header but missing blocks: DuckDB only notices when the manifest is read.
    db = closed_path / "catalog.duckdb"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    with raises(mrlstore.CorruptStoreError, OSError, match="catalog"):
        mrlstore.open(closed_path, read_only=read_only)


@pytest.mark.parametrize("band", ["band_00000_00016", "band_00016_00064"])
@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_deleted_chunk_file(closed_path: Path, band: str, read_only: bool) -> None:
    chunk = closed_path / "vectors" / band / "c" / "0" / "0"
    assert chunk.exists()
    chunk.unlink()
    before = file_hashes(closed_path)
    with raises(mrlstore.CorruptStoreError, OSError, match=f"{band}.*holding committed rows is missing"):
        mrlstore.open(closed_path, read_only=read_only)
    assert file_hashes(closed_path) == before


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_truncated_chunk_file(closed_path: Path, read_only: bool) -> None:
    chunk = closed_path / "vectors" / "band_00000_00016" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with raises(mrlstore.CorruptStoreError, OSError, match="has 100 bytes, expected"):
        mrlstore.open(closed_path, read_only=read_only)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_zarr_metadata_with_a_compressor(closed_path: Path, read_only: bool) -> None:
    meta_path = closed_path / "vectors" / "band_00016_00064" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].append({"name": "zstd", "configuration": {"level": 0, "checksum": False}})
    meta_path.write_text(json.dumps(meta))
    before = file_hashes(closed_path)
    with raises(mrlstore.CorruptStoreError, OSError, match="does not describe the band layout"):
        mrlstore.open(closed_path, read_only=read_only)
    assert file_hashes(closed_path) == before


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_unreadable_zarr_metadata(closed_path: Path, read_only: bool) -> None:
    (closed_path / "vectors" / "band_00000_00016" / "zarr.json").write_text("{not json")
    with raises(mrlstore.CorruptStoreError, OSError, match="unreadable Zarr array metadata"):
        mrlstore.open(closed_path, read_only=read_only)


def test_missing_zarr_group(closed_path: Path) -> None:
    (closed_path / "vectors" / "zarr.json").unlink()
    with raises(mrlstore.CorruptStoreError, OSError, match="missing Zarr group"):
        mrlstore.open(closed_path, read_only=True)


def test_a_relative_path_stays_the_same_store_after_chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks of adds after os.chdir went to a new folder under the new working directory, while the
    catalog (open in DuckDB) committed them: the store reopened as corrupt."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    rng = np.random.default_rng(0)
    with mrlstore.open("rel.mrl", dim=8) as store:
        store.add_vectors(rng.standard_normal((100, 8)).astype(np.float32))
        monkeypatch.chdir(tmp_path / "b")
        store.add_vectors(rng.standard_normal((200, 8)).astype(np.float32))
        assert store.path == tmp_path / "a" / "rel.mrl"
    assert not (tmp_path / "b" / "rel.mrl").exists()
    with mrlstore.open(tmp_path / "a" / "rel.mrl") as store:
        assert len(store) == 300 and store.verify() == []


def test_a_path_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB expands "~" and Python does not: the catalog went to the home folder, the rest under a folder
    named "~" (the open failed and left it)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    with mrlstore.open("~/photos.mrl", dim=8) as store:
        store.add_vectors(np.ones((3, 8), dtype=np.float32))
        store.snapshot("~/snap.mrl")
    assert not (tmp_path / "~").exists()
    for name in ("photos.mrl", "snap.mrl"):
        with mrlstore.open(tmp_path / "home" / name, read_only=True) as store:
            assert len(store) == 3
