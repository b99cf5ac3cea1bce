"""The Zarr tier: files stay valid Zarr v3 that zarr-python reads, and the fast path agrees with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import mrlstore
from mrlstore.errors import CorruptStoreError
from mrlstore.tiers.bands import BandedVectors, auto_chunk_rows, band_edges, create_bands


def test_every_band_reads_back_with_zarr_python(tmp_path, rng):
    x = rng.standard_normal((300, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 16, 64), chunk_rows=32) as store:
        store.add_vectors(x[:100])
        store.add_vectors(x[100:])
        via_store = np.stack(
            store.get(store.sql("SELECT id FROM items").column("id").to_pylist(), dims=64)
            .column("vector")
            .to_numpy(zero_copy_only=False)
        )
    group = zarr.open_group(str(tmp_path / "s" / "vectors"), mode="r")
    assert group.attrs["mrlstore"]["bands"] == [8, 16, 64]
    names = sorted(n for n in group.array_keys() if n.startswith("band_"))
    full = np.concatenate([group[name][:] for name in names], axis=1)
    assert full.shape == (300, 64) and full.dtype == np.float16
    np.testing.assert_array_equal(full, x.astype(np.float16))
    stored = full.astype(np.float64)
    want = np.stack([(stored[:, a:b] ** 2).sum(1) for a, b in ((0, 8), (8, 16), (16, 64))], axis=1)
    np.testing.assert_allclose(group["row_norms"][:], want, rtol=1e-5)  # the bands' norms, row for row
    assert sorted(map(tuple, via_store.tolist())) == sorted(map(tuple, full.astype(np.float32).tolist()))


def test_gather_matches_zarr_oindex(tmp_path, rng):
    create_bands(tmp_path, 64, (8, 16, 64), "float16", [16, 16, 16], attributes={})
    bands = BandedVectors(tmp_path, 64, (8, 16, 64), "float16")
    x = rng.standard_normal((100, 64)).astype(np.float32)
    bands.append(0, x[:37])
    bands.append(37, x[37:])
    rows = rng.choice(100, size=40, replace=True)
    for lo, hi in [(0, 64), (0, 8), (5, 30), (16, 64), (9, 10)]:
        got = bands.gather(rows, lo, hi)
        np.testing.assert_array_equal(got, x[rows, lo:hi].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(bands.read_range(10, 90, lo, hi), x[10:90, lo:hi].astype(np.float16))
    arr = zarr.open_array(str(tmp_path / "vectors" / "band_00016_00064"), mode="r")
    np.testing.assert_array_equal(arr.oindex[np.sort(rows), :], x[np.sort(rows), 16:].astype(np.float16))


def test_truncate_hides_and_drops_uncommitted_rows(tmp_path, rng):
    create_bands(tmp_path, 16, (16,), "float32", [8], attributes={})
    bands = BandedVectors(tmp_path, 16, (16,), "float32")
    bands.append(0, rng.standard_normal((20, 16)))
    bands.truncate(10)
    assert bands.physical_rows() == 10
    assert not (tmp_path / "vectors" / "band_00000_00016" / "c" / "2").exists()  # rows 16..23: wholly past
    assert (tmp_path / "vectors" / "band_00000_00016" / "c" / "1").exists()  # rows 8..15: partly committed
    assert zarr.open_array(str(tmp_path / "vectors" / "band_00000_00016"), mode="r").shape == (10, 16)


def test_layout_is_checked_on_open(tmp_path):
    create_bands(tmp_path, 16, (16,), "float16", [8], attributes={})
    meta_path = tmp_path / "vectors" / "band_00000_00016" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match="layout"):
        BandedVectors(tmp_path, 16, (16,), "float16")


def test_missing_or_truncated_chunk_is_an_error(tmp_path, rng):
    create_bands(tmp_path, 16, (16,), "float16", [8], attributes={})
    bands = BandedVectors(tmp_path, 16, (16,), "float16")
    bands.append(0, rng.standard_normal((12, 16)))
    chunk = tmp_path / "vectors" / "band_00000_00016" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    with pytest.raises(CorruptStoreError, match="bytes"):
        BandedVectors(tmp_path, 16, (16,), "float16").gather(np.array([9]), 0, 16)
    chunk.unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        BandedVectors(tmp_path, 16, (16,), "float16").gather(np.array([9]), 0, 16)


def test_band_helpers():
    assert band_edges(2048, (16, 64, 256, 2048)) == [(0, 16), (16, 64), (64, 256), (256, 2048)]
    assert auto_chunk_rows(1792, "float16") == 16384
    assert auto_chunk_rows(16, "float16") == 1 << 20


def test_gather_bands_reads_sorted_rows_band_by_band(tmp_path, rng):
    create_bands(tmp_path, 64, (8, 16, 64), "float16", [16, 16, 16], attributes={})
    bands = BandedVectors(tmp_path, 64, (8, 16, 64), "float16")
    x = rng.standard_normal((100, 64)).astype(np.float32)
    bands.append(0, x)
    rows = np.sort(rng.choice(100, size=30, replace=False))
    for lo, hi in [(0, 64), (4, 40), (8, 16), (20, 21)]:
        blocks = bands.gather_bands(rows, lo, hi)
        stops = [stop for stop, _ in blocks]
        assert stops == sorted(stops) and stops[-1] == hi
        got = np.concatenate([b for _, b in blocks], axis=1)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, x[rows, lo:hi].astype(np.float16))
    same_chunk = np.array([3, 5, 9])
    np.testing.assert_array_equal(bands.gather_bands(same_chunk, 16, 64)[0][1], x[same_chunk, 16:].astype(np.float16))


def test_inner_chunks_divide_the_chunk_and_stay_near_64_kib():
    from mrlstore.tiers.bands import inner_rows_for

    assert inner_rows_for(16, 2, 1 << 20) == 2048 and inner_rows_for(1792, 2, 16384) == 16  # 64 KiB, 56 KiB
    assert inner_rows_for(16, 2, 3000) == 1500  # not a power of two: the largest divisor that fits
    assert inner_rows_for(8, 2, 1_000_001) == 9901  # 101 inner chunks, not a million one-row ones
    assert inner_rows_for(48, 2, 4999) == 4999  # a prime: the whole chunk, rather than one-row inner chunks
