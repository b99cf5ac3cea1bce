"""Stores written by format version 1 keep opening: storage/v1_fixture.mrl is such a store."""

from __future__ import annotations

import json
import shutil
import time
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


def test_compacting_a_v1_store_makes_it_v4_with_row_norms(fixture_copy):
    path, expected = fixture_copy
    with mrlstore.open(path) as store:
        assert store.manifest["format_version"] == 1
        before = {i: store.query(np.array(v), k=3, dims=[8, 32]).ids for i, v in list(expected["vectors"].items())[:6]}
        store.compact()
        assert store.manifest["format_version"] == 4
        assert store._state.vectors.norms is not None and all(a.sharded for a in store._state.vectors.arrays)
        after = {i: store.query(np.array(v), k=3, dims=[8, 32]).ids for i, v in list(expected["vectors"].items())[:6]}
    assert after == before
    group = zarr.open_group(str(path / "vectors"), mode="r")
    assert group["row_norms"].shape == (len(expected["items"]), len(expected["bands"]))


def _apparent_and_disk(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def test_chunk_files_grow_with_their_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 2048)).astype(np.float32)
    with mrlstore.open(tmp_path / "s") as store:  # the default 2048-d store: chunks of about 64 MiB
        store.add_vectors(x)
        assert store.manifest["format_version"] == 4
    apparent, disk = _apparent_and_disk(tmp_path / "s")
    assert apparent <= 2 * disk, (apparent, disk)  # full-size chunk files made it 25x
    widest = tmp_path / "s" / "vectors" / "band_00256_02048" / "c" / "0" / "0"
    assert widest.stat().st_size < 2 * 300 * 1792 * 2 + 65536


def test_a_growing_chunk_is_mapped_again_and_reads_stay_exact(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    path = tmp_path / "s"
    sizes = []
    with mrlstore.open(path, dim=64, bands=(16, 64), index_dims=(16,), chunk_rows=2048) as store:
        reader = None
        for lo in range(0, 3000, 100):  # 30 appends into growing chunk files, queried as they grow
            store.add_vectors(x[lo : lo + 100], ids=[str(i) for i in range(lo, lo + 100)])
            sizes.append((path / "vectors" / "band_00016_00064" / "c" / "0" / "0").stat().st_size)
            probe = int(rng.integers(0, lo + 100))
            assert store.query(x[probe], k=1, dims=[64]).ids == [str(probe)]
            assert store.query(x[probe], k=1, dims=[16, 64]).ids == [str(probe)]
            if lo == 1000:
                reader = mrlstore.open(path, read_only=True)
        assert len(set(sizes[:21])) < 8  # capacity doubles: the first chunk file changed size a few times
        assert reader is not None
        deadline = time.monotonic() + 20
        while len(reader) < 3000 and time.monotonic() < deadline:  # the writer publishes about every second
            reader.refresh()
            time.sleep(0.05)
        assert len(reader) == 3000
        for probe in (5, 1500, 2999):  # the reader's maps grow with the files it reads
            assert reader.query(x[probe], k=1, dims=[64]).ids == [str(probe)]
        reader.close()
    group = zarr.open_group(str(path / "vectors"), mode="r")
    got = np.concatenate([group["band_00000_00016"][:], group["band_00016_00064"][:]], axis=1)
    np.testing.assert_array_equal(got, x.astype(np.float16))


def test_a_version_2_store_keeps_its_layout_until_compacted(tmp_path, monkeypatch):
    from mrlstore.tiers import params as config

    x = np.random.default_rng(2).standard_normal((50, 32)).astype(np.float32)
    path = tmp_path / "v2"
    monkeypatch.setattr(config, "FORMAT_VERSION", 2)  # what earlier releases made
    with mrlstore.open(path, dim=32, bands=(8, 32), index_dims=(8,), chunk_rows=64) as store:
        store.add_vectors(x[:20], ids=[str(i) for i in range(20)])
    monkeypatch.undo()
    chunk = path / "vectors" / "band_00008_00032" / "c" / "0" / "0"
    assert chunk.stat().st_size == 64 * 24 * 2  # plain: full-size
    with mrlstore.open(path) as store:
        assert store.manifest["format_version"] == 2 and not any(a.sharded for a in store._state.vectors.arrays)
        store.add_vectors(x[20:], ids=[str(i) for i in range(20, 50)])
        assert store.verify() == [] and store.query(x[33], k=1, dims=[32]).ids == ["33"]
    assert chunk.stat().st_size == 64 * 24 * 2
    group = zarr.open_group(str(path / "vectors"), mode="r")
    np.testing.assert_array_equal(group["band_00008_00032"][:], x[:, 8:].astype(np.float16))
    with mrlstore.open(path) as store:
        store.compact()
        assert store.manifest["format_version"] == 4 and all(a.sharded for a in store._state.vectors.arrays)
        assert store.query(x[33], k=1, dims=[32]).ids == ["33"]
    np.testing.assert_array_equal(
        zarr.open_group(str(path / "vectors"), mode="r")["band_00008_00032"][:], x[:, 8:].astype(np.float16)
    )


def test_concurrent_reads_of_a_grown_chunk_keep_every_kernel_address_mapped(tmp_path, monkeypatch):
    import threading

    from mrlstore.tiers import bands as zarr_bands

    x = np.random.default_rng(3).standard_normal((5010, 16)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=16, bands=(8, 16), index_dims=(8,), chunk_rows=65536) as store:
        store.add_vectors(x[:10], ids=[f"a{i}" for i in range(10)])
        store.query(x[0], k=3, dims=[8, 16])  # the kernels' addresses of chunk 0 at its first size
        store._state.vectors.resident_bytes = 0  # as in a store past a quarter of RAM: appends do not map again
        store.add_vectors(x[10:], ids=[f"b{i}" for i in range(5000)])  # chunk 0's file grows
        real = np.memmap

        def slow_memmap(*args, **kwargs):  # widens the window in which two threads map the same chunk
            time.sleep(0.05)
            return real(*args, **kwargs)

        monkeypatch.setattr(zarr_bands.np, "memmap", slow_memmap)
        failures: list[BaseException] = []

        def run(read):  # a thread's exception would only be a warning
            try:
                read()
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [
            threading.Thread(target=run, args=(lambda: store.query(x[7], k=3, dims=[8, 16]),)),
            threading.Thread(target=run, args=(lambda: store.get(["b4999"]),)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        monkeypatch.setattr(zarr_bands.np, "memmap", real)
        for band in store._state.vectors.bands:
            alive = {int(m.ctypes.data) for m in [*band._maps.values(), *band._retired]}
            assert {int(a) for a in band._kernel[1]} <= alive  # a dropped map would leave a dangling pointer
        assert store.query(x[4000], k=1, dims=[8, 16]).ids == ["b3990"]


def test_verify_names_lost_row_norms(tmp_path):
    """A store of format 2 or later without row_norms opens (re-ranks read whole rows), so only verify()
    can tell that they were lost; it said nothing."""
    path = tmp_path / "s"
    with mrlstore.open(path, dim=32, bands=(8, 32), index_dims=(8,)) as store:
        store.add_vectors(np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32))
        assert store.verify() == []
    shutil.rmtree(path / "vectors" / "row_norms")
    with mrlstore.open(path) as store:
        assert any("row_norms is missing" in p for p in store.verify())
