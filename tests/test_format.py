"""Stores written by format version 1 keep opening: storage/v1_fixture.mrl is such a store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import mrlstore

STORAGE = Path(__file__).resolve().parents[1] / "storage"


@pytest.fixture
def fixture_copy(tmp_path):
    dest = tmp_path / "v1.mrl"
    shutil.copytree(STORAGE / "v1_fixture.mrl", dest)
    return dest, json.loads((STORAGE / "v1_fixture.expected.json").read_text())


@pytest.mark.parametrize("read_only", [True, False])
def test_v1_fixture_reopens_with_every_value(fixture_copy, read_only):
    path, expected = fixture_copy
    with mrlstore.open(path, read_only=read_only) as store:
        info = store.info()
        assert (info["dim"], list(info["bands"]), info["metric"], info["dtype"], list(info["index_dims"])) == (
            expected["dim"],
            expected["bands"],
            expected["metric"],
            expected["dtype"],
            expected["index_dims"],
        )
        assert info["index_status"] == {8: "loaded"}  # the committed cache is still trusted
        assert store.sql("SELECT * FROM items ORDER BY id").to_pylist() == expected["items"]
        ids = list(expected["vectors"])
        got = np.stack(store.get(ids).column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(got, np.array([expected["vectors"][i] for i in ids], dtype=np.float32))
        for i in ids[::5]:
            assert store.query(np.array(expected["vectors"][i]), k=1, dims=[8, 32]).ids == [i]
        assert {"item-03", "item-04"}.isdisjoint(ids)


def test_v1_fixture_accepts_writes(fixture_copy):
    path, expected = fixture_copy
    with mrlstore.open(path, dim=32, metric="cosine") as store:
        store.add_vectors(np.ones((2, 32)), ids=["later-1", "later-2"], metadata=[{"label": "x"}] * 2)
        assert len(store) == len(expected["items"]) + 2
    group = zarr.open_group(str(path / "vectors"), mode="r")
    assert group["band_00016_00032"].shape == (expected["rows"] + 2, 16)
    assert "row_norms" not in group.array_keys()  # a version 1 store stays version 1 until compacted


def test_compacting_a_v1_store_makes_it_v2_with_row_norms(fixture_copy):
    path, expected = fixture_copy
    with mrlstore.open(path) as store:
        assert store.manifest["format_version"] == 1
        before = {i: store.query(np.array(v), k=3, dims=[8, 32]).ids for i, v in list(expected["vectors"].items())[:6]}
        store.compact()
        assert store.manifest["format_version"] == 2
        assert store._vectors.norms is not None
        after = {i: store.query(np.array(v), k=3, dims=[8, 32]).ids for i, v in list(expected["vectors"].items())[:6]}
    assert after == before
    group = zarr.open_group(str(path / "vectors"), mode="r")
    assert group["row_norms"].shape == (len(expected["items"]), len(expected["bands"]))
