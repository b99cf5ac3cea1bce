"""Errors of what goes in: vectors (length, rank, NaN/inf, float16 range, zero vectors, empty batches), ids
and metadata.
Fixtures: conftest.py; helpers: errors_support.py."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from errors_support import (
    DIM,
    N,
    logical,
    make_store,
    raises,
    snapshot,
    vecs,
)

import mrlstore


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


@pytest.mark.parametrize("name", ["id", "score", "vector", "query", "rank", "_row", "_private"])
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


@pytest.mark.parametrize(
    "metadata,match",
    [
        (
            [{"n": 1.7}, {"n": 2}],
            r"metadata\[0\]\['n'\] = 1.7 does not fit column 'n' of type BIGINT.* set by the "
            "first values written",
        ),
        ([{"n": 1}, {"n": 2**63}], "cannot form typed columns"),
        ([{"Tag": "x"}, {"Tag": "y"}], "'Tag' differs from the store's column 'tag' only in case"),
        ([{"a": 1, "A": 2}, {"a": 1}], "DuckDB's names ignore case"),
        ([{"ID": "x"}, {"ID": "y"}], "column name 'ID' is reserved"),
        ([{1: "x"}, {}], "metadata keys must be strings, got 1"),
        (pa.table({"d": pa.array([1, 2], pa.decimal256(50, 2))}), "type the catalog cannot store .*decimal256"),
    ],
    ids=["float-into-bigint", "int-past-64-bits", "case-of-a-column", "case-within", "ID", "int-key", "decimal256"],
)
def test_metadata_that_would_change_or_collide_is_refused(store: mrlstore.Store, metadata: Any, match: str) -> None:
    before = logical(store)
    with raises(mrlstore.MetadataError, ValueError, match=match):
        store.add_vectors(vecs(2, seed=5), ids=["new1", "new2"], metadata=metadata)
    assert logical(store) == before


def test_metadata_that_casts_without_change_is_stored(store: mrlstore.Store) -> None:
    """Text is parsed as DuckDB parses it, whole floats go into integer columns, and half floats are widened
    (DuckDB reads none); only values that would change are refused."""
    store.add_vectors(vecs(1, seed=5), ids=["f"], metadata=[{"n": "12"}])
    store.add_vectors(vecs(1, seed=6), ids=["g"], metadata=[{"n": 3.0}])
    store.add_vectors(vecs(1, seed=7), ids=["h"], metadata=pa.table({"half": pa.array([0.5], pa.float16())}))
    got = store.sql("SELECT id, n, half FROM items WHERE id IN ('f', 'g', 'h') ORDER BY id").to_pylist()
    assert got == [
        {"id": "f", "n": 12, "half": None},
        {"id": "g", "n": 3, "half": None},
        {"id": "h", "n": None, "half": 0.5},
    ]


def test_ids_that_are_not_valid_unicode(store: mrlstore.Store) -> None:
    with raises(mrlstore.InvalidIdError, TypeError, match=r"valid Unicode.*ids\[1\]"):
        store.add_vectors(vecs(2), ids=["fine", "\ud800"])
    assert len(store) == N


@pytest.mark.parametrize(
    "kwargs,match",
    [({"recall": "high"}, "recall must be a number"), ({"recall": 1.5}, "recall must be a number in"),
     ({"seed": -1}, "seed must be a non-negative integer"), ({"seed": 0.5}, "seed must be")],
)  # fmt: skip
def test_bad_tune_arguments(store: mrlstore.Store, kwargs: dict, match: str) -> None:
    with raises(mrlstore.InvalidInputError, ValueError, match=match):
        store.tune(sample=5, **kwargs)
    assert store.info()["tuned"] is None


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_add_arrow_batch_size(store: mrlstore.Store, batch_size: Any) -> None:
    table = pa.table({"id": ["x"], "vector": pa.array([vecs(1)[0].tolist()], pa.list_(pa.float32()))})
    with raises(mrlstore.InvalidInputError, ValueError, match="batch_size must be a positive integer"):
        store.add_arrow(table, vector="vector", id="id", batch_size=batch_size)
    assert len(store) == N


# -- found by a review: inputs that reached the engines raw -----------------------------------------------
@pytest.mark.parametrize(
    "metadata,match",
    [
        ({"p": "bad\udc80"}, "valid Unicode"),  # a lone surrogate: bytes decoded with surrogateescape
        ({"bad\udc80": 1}, "valid Unicode"),
        ({"e": {}}, "empty dict"),  # DuckDB stores no struct without fields
        ({"e": [{}]}, "empty dict"),
        ({"tag\x00x": 1}, "NUL"),  # DuckDB cut the name at NUL: the value went into another column 'tag'
        ({"e": {"a\x00b": 1}}, "NUL"),
        ({"exif": {"Make": "a", "make": "b"}}, "differ only in case"),  # a raw duckdb BinderException
        ({"e": [{"x": 1, "X": 2}]}, "differ only in case"),
        ({"wait": datetime.timedelta(seconds=90)}, "durations"),  # export_parquet then raised pyarrow's error
    ],
    ids=[
        "value",
        "key",
        "empty-dict",
        "list-of-empty-dicts",
        "nul-key",
        "nested-nul-key",
        "case-keys",
        "nested-case",
        "timedelta",
    ],  # fmt: skip
)
def test_metadata_duckdb_cannot_store_is_refused_and_changes_nothing(store: mrlstore.Store, metadata, match) -> None:
    before = logical(store)
    with raises(mrlstore.MetadataError, ValueError, match=match):
        store.add_vectors(vecs(1), ids=["new"], metadata=[metadata])
    assert logical(store) == before


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True])
def test_a_scan_batch_size_is_checked_when_the_scan_is_asked_for(store: mrlstore.Store, batch_size) -> None:
    with raises(mrlstore.InvalidKError, ValueError, match="batch_size must be a positive integer"):
        store.scan(batch_size=batch_size)  # -1 returned no rows at all, 0 failed only once iterated


@pytest.mark.parametrize("query", [None, 123, b"SELECT 1"])
def test_sql_of_no_text_is_an_invalid_filter(store: mrlstore.Store, query) -> None:
    with raises(mrlstore.InvalidFilterError, ValueError, match="takes SQL text"):
        store.sql(query)
