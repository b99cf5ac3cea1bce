"""The package's shape (ARCHITECTURE.md): imports run one way through the packages, Store is a facade over
components, and StoreConfig opens stores like open()'s keywords."""

from __future__ import annotations

import dataclasses
import inspect

import architecture  # benchmarks/architecture.py: the import graph
import numpy as np
import pytest

import mrlstore
from mrlstore.store import Store


def test_imports_have_no_cycles_and_never_point_up_a_layer():
    graph = architecture.graph()
    assert architecture.cycles(graph) == []
    assert architecture.upward(graph) == []


def test_every_package_is_in_a_layer():
    packages = {m.split(".")[1] for m in architecture.graph() if m.count(".") >= 2}
    assert packages <= set(architecture.LAYERS), packages - set(architecture.LAYERS)


def test_the_store_is_a_facade_without_mixins_and_components_leave_its_private_parts_alone():
    assert Store.__bases__ == (object,)
    package = architecture.PACKAGE
    for path in package.rglob("*.py"):
        if path.name in ("store.py", "__init__.py"):
            continue
        text = path.read_text()
        for private in ("store._state", "store._writer", "store._search", "store._versions", "store._upkeep"):
            assert private not in text, f"{path.relative_to(package)} reaches into {private}"


def test_store_config_opens_like_the_keywords(tmp_path):
    config = mrlstore.StoreConfig(dim=32, bands=[8, 32], index_dims=[8], metric="ip")
    assert config.bands == (8, 32) and config.index_dims == (8,)  # lists kept as tuples: the value is frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 64  # type: ignore[misc]
    rng = np.random.default_rng(0)
    with mrlstore.open(tmp_path / "a", config=config) as store:
        store.add_vectors(rng.standard_normal((20, 32)).astype(np.float32))
        opened = store.config
        assert (opened.dim, opened.bands, opened.metric, opened.index_dims) == (32, (8, 32), "ip", (8,))
        assert opened.dtype == "float16" and opened.hnsw_m is None and opened.ef_construction is None  # defaults
    with mrlstore.open(tmp_path / "a", config=config, read_only=True) as reader:  # keywords override fields
        assert reader.read_only and len(reader) == 20
    with pytest.raises(mrlstore.ConfigMismatchError):
        mrlstore.open(tmp_path / "a", config=dataclasses.replace(config, metric="l2"))
    with mrlstore.open(tmp_path / "b", config=opened) as copy:  # a store's config makes a store like it
        assert copy.config == opened and copy.manifest["hnsw_M_by_prefix"] == store.manifest["hnsw_M_by_prefix"]
        given = ("hnsw_m_given", "ef_construction_given")  # a default's values were given: new prefixes took them
        assert [copy.manifest[key] for key in given] == [store.manifest[key] for key in given] == [False, False]


def test_open_takes_every_config_field_by_keyword():
    keywords = set(inspect.signature(mrlstore.open).parameters) - {"path", "config"}
    assert keywords == {f.name for f in dataclasses.fields(mrlstore.StoreConfig)}


def test_open_and_store_take_arrays_keywords_and_dims_as_before(tmp_path):
    with mrlstore.open(tmp_path / "a", dim=32, bands=np.array([8, 32]), index_dims=np.array([8])) as store:
        assert store.bands == (8, 32) and store.index_dims == (8,)
    with Store(tmp_path / "a", 32, bands=[8, 32], read_only=True) as reader:  # Store's own keywords, as before
        assert reader.read_only and reader.dim == 32
    with Store(tmp_path / "a", mrlstore.StoreConfig(read_only=True)) as reader:
        assert reader.read_only
    with pytest.raises(TypeError, match="unexpected keyword"):
        Store(tmp_path / "a", 32, band=[8, 32])


def test_a_closed_store_says_so_before_looking_at_the_query(tmp_path):
    store = mrlstore.open(tmp_path / "a", dim=32, bands=(8, 32), index_dims=(8,))
    store.close()
    for bad in (np.ones(5, np.float32), "photo.jpg"):
        with pytest.raises(mrlstore.StoreClosedError):
            store.query(bad)
    with pytest.raises(mrlstore.StoreClosedError):
        store.query(np.ones(32, np.float32), k=0)
