"""Error handling: typed exceptions, messages that say what was expected, failed calls that change nothing.

Every error mrlstore raises on purpose derives from ``mrlstore.MRLStoreError`` and from the matching builtin
(ValueError for bad input, TypeError too for bad ids, KeyError for unknown ids, FileNotFoundError for a
missing store, BlockingIOError for a second writer, PermissionError for writes on a read-only store,
LookupError for a query on an empty store). A rejected call must leave the store exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import mrlstore

DIM = 64
BANDS = (16, 64)
CHUNK_ROWS = 128
N = 20
IDS = [f"v{i:02d}" for i in range(N)]


# -- helpers ---------------------------------------------------------------------------------------------
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


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "s"


@pytest.fixture
def store(store_path: Path) -> Iterator[mrlstore.Store]:
    """A writable store with N rows and metadata columns n (BIGINT) and tag (VARCHAR)."""
    s = make_store(store_path)
    s.add_vectors(vecs(N), ids=IDS, metadata=[{"n": i, "tag": "even" if i % 2 == 0 else "odd"} for i in range(N)])
    yield s
    s.close()


@pytest.fixture
def empty_store(store_path: Path) -> Iterator[mrlstore.Store]:
    s = make_store(store_path)
    yield s
    s.close()


@pytest.fixture
def closed_path(store: mrlstore.Store) -> Path:
    """The path of a populated store that is closed again (so it can be reopened)."""
    store.close()
    return store.path


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
    ("ReadOnlyError", PermissionError),
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


# -- vectors: length, rank, NaN/inf, float16 range, zero vectors, empty batches --------------------------
def test_wrong_vector_length(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="length 64 .*got 32"):
        store.add_vectors(vecs(2)[:, :32], ids=["a", "b"])


@pytest.mark.parametrize(
    "shape,match",
    [((DIM,), r"2-D .*got 1-D .*vectors\[None, :\]"), ((1, 2, DIM), "2-D .*got 3-D"), ((), "2-D .*got 0-D")],
    ids=["1-D", "3-D", "scalar"],
)
def test_wrong_rank(store: mrlstore.Store, shape: tuple[int, ...], match: str) -> None:
    with raises(mrlstore.ShapeError, ValueError, match=match):
        store.add_vectors(np.ones(shape, dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values(store: mrlstore.Store, bad: float) -> None:
    v = vecs(3)
    v[2, 40] = bad
    with raises(mrlstore.NonFiniteError, ValueError, match="vector 2 .*NaN or inf"):
        store.add_vectors(v, ids=["a", "b", "c"])


def test_float16_overflow(store: mrlstore.Store) -> None:
    assert store.dtype == "float16"
    v = vecs(2)
    v[1, 5] = -70000.0
    with raises(mrlstore.NonFiniteError, ValueError, match=r"vector 1 .*float16.*65504.*float32"):
        store.add_vectors(v, ids=["a", "b"])


def test_float16_overflow_is_fine_for_float32_stores(tmp_path: Path) -> None:
    with make_store(tmp_path / "f32", dtype="float32") as s:
        v = vecs(1)
        v[0, 5] = 70000.0
        assert s.add_vectors(v, ids=["a"]) == ["a"]


def test_zero_vector_under_cosine(store: mrlstore.Store) -> None:
    v = vecs(2)
    v[0] = 0.0
    with raises(mrlstore.ZeroVectorError, ValueError, match="vector 0 .*all.zero.*cosine"):
        store.add_vectors(v, ids=["a", "b"])


def test_zero_indexed_prefix_under_cosine(store: mrlstore.Store) -> None:
    assert 16 in store.index_dims
    v = vecs(2)
    v[1, :16] = 0.0
    with raises(mrlstore.ZeroVectorError, ValueError, match="vector 1 has an all-zero 16-d prefix"):
        store.add_vectors(v, ids=["a", "b"])


def test_prefix_that_rounds_to_zero_in_float16(store: mrlstore.Store) -> None:
    v = vecs(1)
    v[0, :16] = 1e-9  # not zero in float32, zero once stored as float16
    with raises(mrlstore.ZeroVectorError, ValueError, match="16-d prefix .*after rounding to float16"):
        store.add_vectors(v, ids=["a"])


def test_zero_vector_is_fine_under_ip(tmp_path: Path) -> None:
    with make_store(tmp_path / "ip", metric="ip") as s:
        assert s.add_vectors(np.zeros((1, DIM), np.float32), ids=["z"]) == ["z"]


@pytest.mark.parametrize("method", ["add_vectors", "upsert_vectors"])
@pytest.mark.parametrize("empty", [np.zeros((0, DIM), np.float32), []], ids=["0-rows", "empty-list"])
def test_empty_batch(store: mrlstore.Store, method: str, empty: Any) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="empty batch|2-D"):
        getattr(store, method)(empty, ids=[])


def test_empty_batch_message(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="empty batch: vectors has no rows"):
        store.add_vectors(np.zeros((0, DIM), np.float32))


def test_non_numeric_vectors(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="numeric"):
        store.add_vectors(np.array([["x"] * DIM]))


# -- ids ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["add_vectors", "upsert_vectors"])
def test_duplicate_ids_within_batch(store: mrlstore.Store, method: str) -> None:
    with raises(mrlstore.DuplicateIdError, ValueError, match=r"duplicate ids within the batch: \['a'\]"):
        getattr(store, method)(vecs(3), ids=["a", "b", "a"])


def test_duplicate_id_already_in_store(store: mrlstore.Store) -> None:
    with raises(mrlstore.DuplicateIdError, ValueError, match=r"already in the store.*v03.*upsert_vectors"):
        store.add_vectors(vecs(2), ids=["new", "v03"])


@pytest.mark.parametrize(
    "ids,match",
    [
        (["a", 1], r"non-empty strings; ids\[1\] is 1"),
        ([None, "b"], r"non-empty strings; ids\[0\] is None"),
        (["a", ""], r"non-empty strings; ids\[1\] is ''"),
        ([b"a", "b"], r"non-empty strings; ids\[0\] is b'a'"),
    ],
    ids=["int", "None", "empty", "bytes"],
)
@pytest.mark.parametrize("method", ["add_vectors", "upsert_vectors"])
def test_non_string_ids(store: mrlstore.Store, method: str, ids: list[Any], match: str) -> None:
    with raises(mrlstore.InvalidIdError, TypeError, match=match) as info:
        getattr(store, method)(vecs(2), ids=ids)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("ids", ["ab", b"ab"], ids=["str", "bytes"])
def test_ids_given_as_a_single_string(store: mrlstore.Store, ids: Any) -> None:
    with raises(mrlstore.InvalidIdError, TypeError, match="sequence of strings, not a single string"):
        store.add_vectors(vecs(2), ids=ids)


@pytest.mark.parametrize("n_ids", [1, 3])
def test_wrong_number_of_ids(store: mrlstore.Store, n_ids: int) -> None:
    with raises(mrlstore.InvalidIdError, TypeError, match=f"got {n_ids} ids for 2 vectors"):
        store.add_vectors(vecs(2), ids=[f"x{i}" for i in range(n_ids)])


def test_upsert_without_ids(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidInputError, ValueError, match="upsert_vectors needs ids"):
        store.upsert_vectors(vecs(1), ids=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["delete", "get"])
def test_non_string_ids_for_delete_and_get(store: mrlstore.Store, method: str) -> None:
    # The spec's "non-string ids" holds for every call that takes ids, not only for writes.
    with raises(mrlstore.InvalidIdError, TypeError):
        getattr(store, method)([1, 2])


# -- metadata -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "metadata,match",
    [
        ([{"n": 1}], "got 1 metadata entries for 2 vectors"),
        ([{"n": 1}, {"n": 2}, {"n": 3}], "got 3 metadata entries for 2 vectors"),
        (pa.table({"n": [1, 2, 3]}), "got 3 metadata rows for 2 vectors"),
    ],
    ids=["short-list", "long-list", "arrow-table"],
)
def test_metadata_length_mismatch(store: mrlstore.Store, metadata: Any, match: str) -> None:
    with raises(mrlstore.MetadataError, ValueError, match=match):
        store.add_vectors(vecs(2), ids=["a", "b"], metadata=metadata)


def test_metadata_entry_that_is_not_a_dict(store: mrlstore.Store) -> None:
    with raises(mrlstore.MetadataError, ValueError, match=r"metadata\[1\] must be a dict, got int"):
        store.add_vectors(vecs(2), ids=["a", "b"], metadata=[{"n": 1}, 5])


@pytest.mark.parametrize("name", ["id", "score", "vector", "_row", "_private"])
def test_reserved_metadata_column_names(store: mrlstore.Store, name: str) -> None:
    with raises(mrlstore.MetadataError, ValueError, match=f"column name '{name}' is reserved"):
        store.add_vectors(vecs(2), ids=["a", "b"], metadata=[{name: 1}, {name: 2}])


def test_metadata_types_that_conflict_within_the_batch(store: mrlstore.Store) -> None:
    with raises(mrlstore.MetadataError, ValueError, match="cannot form typed columns"):
        store.add_vectors(vecs(2), ids=["a", "b"], metadata=[{"k": 1}, {"k": "x"}])


# new ids for add (an existing one would be rejected earlier, as a duplicate); upsert also replaces one row
CONFLICT_IDS = {"add_vectors": ["new1", "new2"], "upsert_vectors": ["v01", "new"]}


@pytest.mark.parametrize("method", ["add_vectors", "upsert_vectors"])
def test_metadata_type_conflicts_with_existing_column(store: mrlstore.Store, method: str) -> None:
    # Column "n" is BIGINT (from the fixture); "abc" cannot be stored in it. The conflict is found inside the
    # DuckDB transaction, after the vectors were written past the watermark: it must still be a MetadataError.
    before = logical(store)
    # the message names what was expected: the column's type (BIGINT in DuckDB's words, INT64 in Arrow's)
    with raises(mrlstore.MetadataError, ValueError, match=r"does not fit.*(BIGINT|INT64)"):
        getattr(store, method)(vecs(2, seed=5), ids=CONFLICT_IDS[method], metadata=[{"n": "abc"}, {"n": "x"}])
    assert logical(store) == before
    # and the store keeps working: the next write lands on the same row numbers
    store.add_vectors(vecs(1, seed=6), ids=["after"], metadata=[{"n": 7}])
    assert store.info()["rows"] == N + 1
    assert store.get(["after"]).column("n").to_pylist() == [7]


@pytest.mark.parametrize("method", ["add_vectors", "upsert_vectors"])
def test_metadata_type_conflict_changes_no_file(store: mrlstore.Store, method: str) -> None:
    # DuckDB leaves its file alone for this rolled-back transaction, so the file hashes must match exactly.
    # (The exception type is checked by test_metadata_type_conflicts_with_existing_column.)
    before = snapshot(store)
    try:
        getattr(store, method)(vecs(2, seed=5), ids=CONFLICT_IDS[method], metadata=[{"n": "abc"}, {"n": "x"}])
    except Exception:
        pass
    else:
        pytest.fail("a metadata type conflict was accepted")
    assert snapshot(store) == before


def test_metadata_of_empty_dicts_is_no_metadata(store: mrlstore.Store) -> None:
    # Two entries for two vectors, none with a column: not a length mismatch ("got 0 metadata rows" is wrong).
    assert store.add_vectors(vecs(2, seed=3), ids=["a", "b"], metadata=[{}, {}]) == ["a", "b"]


# -- where= and sql() ---------------------------------------------------------------------------------
def test_where_with_unknown_column(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match=r"nope.*Metadata columns: id, n, tag"):
        store.query(query_vec(), where="nope > 3")


@pytest.mark.parametrize("where", ["n >", "n > > 3", "tag = 'x", ""], ids=["dangling", "double-op", "quote", "empty"])
def test_where_with_invalid_sql(store: mrlstore.Store, where: str) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match="where="):
        store.query(query_vec(), where=where)


def test_where_with_a_second_statement_is_rejected(store: mrlstore.Store) -> None:
    before = snapshot(store)
    with raises(mrlstore.InvalidFilterError, ValueError, match="where="):
        store.query(query_vec(), where="1=1; DROP TABLE _items")
    assert snapshot(store) == before
    assert store.sql("SELECT count(*) AS c FROM _items").column("c").to_pylist() == [N]


def test_where_that_escapes_its_expression_is_rejected(store: mrlstore.Store) -> None:
    # where= is one boolean expression; closing the wrapper's parenthesis to append a UNION over another
    # table (here: the deleted rows) is not one, even though the wrapped statement is a single SELECT.
    store.delete(["v00"])
    with raises(mrlstore.InvalidFilterError, ValueError, match="where="):
        store.query(query_vec(), where="1=1) UNION (SELECT _row FROM tombstones")


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM _items",
        "DROP TABLE _items",
        "UPDATE _items SET n = 0",
        "SELECT 1; DELETE FROM _items",
        "COPY _items TO 'x.csv'",
    ],
    ids=["delete", "drop", "update", "two-statements", "copy"],
)
def test_sql_rejects_writes(store: mrlstore.Store, sql: str) -> None:
    before = snapshot(store)
    with raises(mrlstore.InvalidFilterError, ValueError, match="one read-only SELECT"):
        store.sql(sql)
    assert snapshot(store) == before


def test_sql_rejects_a_data_modifying_cte(store: mrlstore.Store) -> None:
    # DuckDB reports this statement as a SELECT, but its WITH clause deletes every row of the catalog.
    before = snapshot(store)
    with raises(mrlstore.InvalidFilterError, ValueError):
        store.sql("WITH d AS (DELETE FROM _items RETURNING id) SELECT * FROM d")
    assert snapshot(store) == before


@pytest.mark.parametrize(
    "sql,match",
    [
        ("SELEC * FROM items", "not valid SQL"),
        ("SELECT nope FROM items", "nope"),
        ("SELECT * FROM no_such_table", "no_such_table"),
    ],
    ids=["typo", "unknown-column", "unknown-table"],
)
def test_sql_with_a_mistake(store: mrlstore.Store, sql: str, match: str) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match=match):
        store.sql(sql)


# -- dims, k, shortlist, query shapes -----------------------------------------------------------------
@pytest.mark.parametrize(
    "dims,match",
    [
        ([64, 16], r"strictly increasing, got \[64, 16\]"),
        ([16, 16], r"strictly increasing, got \[16, 16\]"),
        ([16, 128], r"1\.\.64 .*got 128"),
        (65, r"1\.\.64 .*got 65"),
        ([0, 64], r"1\.\.64 .*got 0"),
        ([], "at least one prefix length"),
        ([16.0, 64], "integers, got 16.0"),
    ],
    ids=["decreasing", "repeated", "beyond-dim", "int-beyond-dim", "zero", "empty", "float"],
)
def test_invalid_dims(store: mrlstore.Store, dims: Any, match: str) -> None:
    with raises(mrlstore.InvalidDimsError, ValueError, match=match):
        store.query(query_vec(), dims=dims)


def test_get_with_dims_beyond_dim(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidDimsError, ValueError, match=r"1\.\.64 .*got 100"):
        store.get(["v01"], dims=100)


@pytest.mark.parametrize("k", [0, -1, 2.5, "3", True, None], ids=["0", "-1", "float", "str", "bool", "None"])
def test_invalid_k(store: mrlstore.Store, k: Any) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match=f"k must be a positive integer, got {k!r}"):
        store.query(query_vec(), k=k)


def test_numpy_integer_k_is_fine(store: mrlstore.Store) -> None:
    assert len(store.query(query_vec(), k=np.int64(3))) == 3


def test_shortlist_list_smaller_than_k(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="at least k=10, got 5"):
        store.query(query_vec(), k=10, dims=[16, 64], shortlist=[5])


@pytest.mark.parametrize("shortlist", [5, 0, -3], ids=["smaller-than-k", "zero", "negative"])
def test_shortlist_int_smaller_than_k(store: mrlstore.Store, shortlist: int) -> None:
    # The list form is checked; an int must be too (today it is silently clamped up to k).
    with raises(mrlstore.InvalidKError, ValueError, match="shortlist"):
        store.query(query_vec(), k=10, dims=[16, 64], shortlist=shortlist)


@pytest.mark.parametrize(
    "shortlist,match",
    [([100, 50], "needs 1 sizes"), (2.5, "float"), ("a", "invalid literal")],
    ids=["too-many", "float", "str"],
)
def test_shortlist_of_wrong_form(store: mrlstore.Store, shortlist: Any, match: str) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match=match):
        store.query(query_vec(), k=10, dims=[16, 64], shortlist=shortlist)


def test_invalid_ef(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="ef must be a positive integer, got 0"):
        store.query(query_vec(), ef=0)


def test_query_shorter_than_max_dims(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match=r"between max\(dims\)=64 and dim=64, got 32"):
        store.query(query_vec()[:32], dims=[16, 64])


def test_query_shorter_than_dim_is_fine_when_dims_allow_it(store: mrlstore.Store) -> None:
    assert len(store.query(query_vec()[:32], k=3, dims=[16, 32])) == 3


def test_query_longer_than_dim(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match=r"max\(dims\)=64 and dim=64, got 65"):
        store.query(np.ones(DIM + 1, np.float32))


def test_query_with_3d_input(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="1-D .*or 2-D .*got 3-D"):
        store.query(np.ones((1, 1, DIM), np.float32))


def test_query_with_empty_batch(store: mrlstore.Store) -> None:
    with raises(mrlstore.ShapeError, ValueError, match="empty batch"):
        store.query(np.zeros((0, DIM), np.float32))


def test_query_with_nan(store: mrlstore.Store) -> None:
    q = np.stack([query_vec(), query_vec()])
    q[1, 3] = np.nan
    with raises(mrlstore.NonFiniteError, ValueError, match="query 1 contains NaN or inf"):
        store.query(q)


def test_zero_query_under_cosine(store: mrlstore.Store) -> None:
    with raises(mrlstore.ZeroVectorError, ValueError, match="query 0 is all zeros"):
        store.query(np.zeros(DIM, np.float32))


def test_query_with_something_that_is_not_vectors_and_no_encoder(store: mrlstore.Store) -> None:
    with raises(mrlstore.EncoderUnavailableError, RuntimeError, match="no encoder"):
        store.query("a photo of a cat")


# -- k larger than the store: return what exists --------------------------------------------------------
def _prepare(store: mrlstore.Store, state: str) -> set[str]:
    """Bring the store into ``state``; returns the live ids."""
    if state == "after-delete":
        store.delete(["v00", "v01"])
        return set(IDS[2:])
    if state == "after-upsert":
        store.upsert_vectors(vecs(2, seed=7), ids=["v00", "v01"])
        return set(IDS)
    return set(IDS)


@pytest.mark.parametrize("dims", [None, [16], [64], [16, 64]], ids=["default", "16", "64", "16-64"])
@pytest.mark.parametrize("state", ["fresh", "after-delete", "after-upsert"])
def test_k_larger_than_store_returns_all_live_rows(store: mrlstore.Store, state: str, dims: Any) -> None:
    live = _prepare(store, state)
    hits = store.query(query_vec(), k=50, dims=dims)
    assert sorted(hits.ids) == sorted(live)
    assert len(hits.scores) == len(live)


@pytest.mark.parametrize("state", ["after-delete", "after-upsert"])
def test_default_query_on_a_small_store_after_a_delete(store: mrlstore.Store, state: str) -> None:
    # k=10 on 18-20 live rows: the first stage asks HNSW for its default shortlist (200), more than exist.
    _prepare(store, state)
    assert len(store.query(query_vec())) == 10


def test_k_larger_than_where_matches(store: mrlstore.Store) -> None:
    hits = store.query(query_vec(), k=10, where="n < 3")
    assert sorted(hits.ids) == ["v00", "v01", "v02"]


def test_where_matching_nothing_gives_empty_hits(store: mrlstore.Store) -> None:
    hits = store.query(query_vec(), k=10, where="n < 0")
    assert hits.ids == [] and len(hits.scores) == 0


def test_k_larger_than_store_in_a_batch_query(store: mrlstore.Store) -> None:
    out = store.query(np.stack([query_vec(1), query_vec(2)]), k=100)
    assert [sorted(h.ids) for h in out] == [sorted(IDS)] * 2


# -- empty store --------------------------------------------------------------------------------------
def test_query_on_empty_store(empty_store: mrlstore.Store) -> None:
    before = snapshot(empty_store)
    with raises(mrlstore.EmptyStoreError, LookupError, match="holds no vectors"):
        empty_store.query(query_vec())
    assert snapshot(empty_store) == before


def test_query_on_store_whose_rows_were_all_deleted(store: mrlstore.Store) -> None:
    store.delete(IDS)
    with raises(mrlstore.EmptyStoreError, LookupError, match="holds no vectors"):
        store.query(query_vec())


def test_invalid_arguments_are_reported_before_emptiness(empty_store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="k must be a positive integer"):
        empty_store.query(query_vec(), k=0)


def test_rejected_add_on_empty_store_changes_nothing(empty_store: mrlstore.Store) -> None:
    before = snapshot(empty_store)
    v = vecs(2)
    v[1, 0] = np.nan
    with raises(mrlstore.NonFiniteError, ValueError):
        empty_store.add_vectors(v)
    assert snapshot(empty_store) == before


# -- unknown ids --------------------------------------------------------------------------------------
def test_delete_unknown_ids(store: mrlstore.Store) -> None:
    before = snapshot(store)
    with raises(mrlstore.UnknownIdError, KeyError, match=r"1 id\(s\) not in the store, e\.g\. \['nope'\]") as info:
        store.delete(["v03", "nope"])
    assert isinstance(info.value, LookupError)
    assert snapshot(store) == before  # v03 was not deleted either
    assert "v03" in store.get(["v03"]).column("id").to_pylist()


def test_delete_unknown_ids_with_missing_ok(store: mrlstore.Store) -> None:
    assert store.delete(["v03", "nope"], missing_ok=True) == 1
    assert len(store) == N - 1
    assert store.delete(["nope", "v03"], missing_ok=True) == 0
    with raises(mrlstore.UnknownIdError, KeyError, match="v03"):
        store.get(["v03"])


def test_delete_twice(store: mrlstore.Store) -> None:
    store.delete(["v04"])
    with raises(mrlstore.UnknownIdError, KeyError, match="v04"):
        store.delete(["v04"])


@pytest.mark.parametrize("ids", [["nope"], ["v01", "nope"], "nope"], ids=["one", "mixed", "single-string"])
def test_get_unknown_ids(store: mrlstore.Store, ids: Any) -> None:
    with raises(mrlstore.UnknownIdError, KeyError, match=r"1 id\(s\) not in the store, e\.g\. \['nope'\]"):
        store.get(ids)


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


Call = Callable[[mrlstore.Store], Any]
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


# -- one writer at a time ---------------------------------------------------------------------------------
def test_second_writer_in_the_same_process(store: mrlstore.Store) -> None:
    held = "already open for writing by this process.*read_only=True, which works at any time"
    with raises(mrlstore.StoreLockedError, BlockingIOError, match=held):
        mrlstore.open(store.path)
    # the failed attempt did not take the lock away from the first writer
    with raises(mrlstore.StoreLockedError, BlockingIOError):
        mrlstore.open(store.path)
    store.add_vectors(vecs(1, seed=4), ids=["still-writable"])
    store.close()
    with mrlstore.open(store.path) as s:
        assert len(s) == N + 1


def test_reader_while_a_writer_is_open_in_the_same_process(store: mrlstore.Store) -> None:
    with mrlstore.open(store.path, read_only=True) as reader:  # the writer's published version
        assert len(reader) == len(store)


def test_writer_while_a_reader_is_open_in_the_same_process(closed_path: Path) -> None:
    with mrlstore.open(closed_path, read_only=True), mrlstore.open(closed_path) as writer:  # readers never block
        assert len(writer) == N


CHILD_OPEN = textwrap.dedent(
    """
    import sys
    import mrlstore
    try:
        s = mrlstore.open(sys.argv[1], read_only=sys.argv[2] == "1")
    except Exception as e:
        print(type(e).__name__, isinstance(e, mrlstore.MRLStoreError), isinstance(e, BlockingIOError))
    else:
        s.close()
        print("opened")
    """
)

CHILD_HOLD = textwrap.dedent(
    """
    import sys
    import mrlstore
    s = mrlstore.open(sys.argv[1], read_only=sys.argv[2] == "1")
    print("ready", flush=True)
    sys.stdin.read()
    s.close()
    """
)


def _run_child_open(path: Path, read_only: bool) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHILD_OPEN, str(path), "1" if read_only else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("child_read_only", [False, True], ids=["child-writer", "child-reader"])
def test_second_opener_in_another_process_while_we_write(store: mrlstore.Store, child_read_only: bool) -> None:
    expected = "opened" if child_read_only else "StoreLockedError True True"  # one writer; readers welcome
    assert _run_child_open(store.path, child_read_only) == expected
    store.add_vectors(vecs(1, seed=4), ids=["still-writable"])


@contextmanager
def _holder(path: Path, read_only: bool) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLD, str(path), "1" if read_only else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("read_only", [True, False], ids=["reader", "writer"])
def test_open_while_a_writer_in_another_process_holds_the_store(closed_path: Path, read_only: bool) -> None:
    with _holder(closed_path, read_only=False):
        if read_only:
            with mrlstore.open(closed_path, read_only=True) as s:  # the writer's published version
                assert len(s) == N
        else:
            with raises(mrlstore.StoreLockedError, BlockingIOError, match="already open"):
                mrlstore.open(closed_path)
    with mrlstore.open(closed_path, read_only=read_only) as s:  # free again once the other process is gone
        assert len(s) == N


def test_writer_while_a_reader_in_another_process_holds_the_store(closed_path: Path) -> None:
    with _holder(closed_path, read_only=True), mrlstore.open(closed_path) as writer:  # readers never block it
        writer.add_vectors(vecs(1, seed=5), ids=["while-read"])


def test_readers_in_two_processes_are_fine(closed_path: Path) -> None:
    with mrlstore.open(closed_path, read_only=True):
        assert _run_child_open(closed_path, read_only=True) == "opened"


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
