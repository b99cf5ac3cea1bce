"""Cold reads (a store past a quarter of RAM: its rows are not read at open): chunk maps advised random
access, and the kernel's parallel page-in of a stage's rows changes no result."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

import mrlstore
from mrlstore import kernels
from mrlstore.testing import mrl_like
from mrlstore.tiers import bands


def _mapped_flags(path_part: str) -> dict[str, str]:
    """The VmFlags of this process's mappings of files whose path contains ``path_part``, by address range."""
    flags, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
            current = fields[0] if len(fields) >= 6 and path_part in fields[5] else None
        elif line.startswith("VmFlags:") and current:
            flags[current] = line
    return flags


def _evict(store_path: Path) -> None:
    """Drop the chunk files' pages from the page cache where nobody maps them (no root needed)."""
    for f in (store_path / "vectors").rglob("*"):
        if f.is_file() and f.name != "zarr.json":
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@pytest.fixture
def store_path(tmp_path):
    x, _ = mrl_like(6000, 256, noise=1.0, seed=4)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=256, bands=(16, 64, 256), index_dims=(16,)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))])
    return path


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_maps_of_rows_not_read_at_open_are_advised_random(store_path, monkeypatch):
    query = mrl_like(1, 256, seed=4, sample=1)[0][0]
    with mrlstore.open(store_path, read_only=True) as small:  # small: read at open, read-around kept
        small.query(query)
        flags = _mapped_flags(str(store_path / "vectors"))
        assert flags and not any(" rr" in f for f in flags.values())
    del small
    gc.collect()  # the closed store's maps go with it
    monkeypatch.setattr(bands, "_resident_budget", lambda: 0)  # as past a quarter of RAM
    with mrlstore.open(store_path, read_only=True) as large:
        large.query(query)
        flags = _mapped_flags(str(store_path / "vectors"))
        assert flags and all(" rr" in f for f in flags.values())


def test_the_parallel_page_in_of_cold_rows_changes_no_result(store_path, monkeypatch):
    monkeypatch.setattr(bands, "_resident_budget", lambda: 0)
    queries = mrl_like(12, 256, noise=1.0, seed=4, sample=1)[0]
    found = {}
    for threads in (kernels.COLD_READ_THREADS, 0):
        monkeypatch.setattr(kernels, "COLD_READ_THREADS", threads)
        out = []
        for q in queries:
            _evict(store_path)
            with mrlstore.open(store_path, read_only=True) as store:
                for dims in (None, [16, 256], [16, 64, 256]):
                    hits = store.query(q, dims=dims, shortlist=None if dims is None else 300)
                    out.append((hits.ids, np.round(hits.scores, 5).tolist()))
        found[threads] = out
    assert found[kernels.COLD_READ_THREADS] == found[0]


def test_resident_rows_hold_the_narrowest_arrays_whole_first():
    assert bands.resident_rows(1000, [16, 32, 96, 384], 1000 * (16 + 32 + 96) + 384 * 10) == [1000, 1000, 1000, 10]
    assert bands.resident_rows(1000, [384, 16], 16 * 1000 + 384 * 5) == [5, 1000]  # by width, not by order
    assert bands.resident_rows(1000, [16, 32], 10**9) == [1000, 1000]
    assert bands.resident_rows(1000, [16, 32], 0) == [0, 0]


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_a_store_past_its_budget_keeps_its_narrow_bands_and_leaves_the_widest_to_disk(store_path, monkeypatch):
    query = mrl_like(1, 256, seed=4, sample=1)[0][0]
    with mrlstore.open(store_path, read_only=True) as whole:
        expected = whole.query(query, dims=[16, 64, 256], shortlist=300)
        dtype = whole.info()["dtype"]
    del whole
    gc.collect()
    layout = bands.BandedVectors(store_path, 256, (16, 64, 256), dtype)
    widest = max(layout.arrays, key=lambda a: a.row_bytes)
    others = sum(a.row_bytes for a in layout.arrays if a is not widest)
    monkeypatch.setattr(bands, "_resident_budget", lambda: 6000 * others)  # every row but the widest band's
    with mrlstore.open(store_path, read_only=True) as past:
        hits = past.query(query, dims=[16, 64, 256], shortlist=300)
        maps = _mapped_flags(str(store_path / "vectors"))
        random_maps = {r for r, f in maps.items() if " rr" in f}
        assert len(random_maps) == 1  # the widest band's one chunk, not read at open; the others were
        assert hits.ids == expected.ids
        np.testing.assert_allclose(hits.scores, expected.scores, rtol=1e-6)
    assert widest.dir.name == "band_00064_00256"


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_the_chunk_where_the_rows_read_at_open_end_is_advised_random_past_them(tmp_path, monkeypatch):
    """Read-around on the cold rows of that chunk read up to read_ahead_kb per fault (8 MiB at 12M rows)."""
    x, _ = mrl_like(3000, 256, noise=1.0, seed=4)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=256, bands=(16, 256), index_dims=(16,), chunk_rows=3000) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))])
    layout = bands.BandedVectors(path, 256, (16, 256), "float16")
    wide = max(layout.arrays, key=lambda a: a.row_bytes)
    narrow = sum(a.row_bytes for a in layout.arrays if a is not wide) * 3000
    monkeypatch.setattr(bands, "_resident_budget", lambda: narrow + 1000 * wide.row_bytes)  # 1,000 wide rows
    query = mrl_like(1, 256, seed=4, sample=1)[0][0]
    with mrlstore.open(path, read_only=True) as store:
        store.query(query, dims=[16, 256], shortlist=300)
        maps = _mapped_flags(str(wide.dir))
        assert len(maps) == 2  # one chunk, its map split where the rows read at open end
        (held_span, held), (cold_span, cold) = sorted(maps.items(), key=lambda m: int(m[0].split("-")[0], 16))
        assert " rr" not in held and " rr" in cold
        held_bytes = int(held_span.split("-")[1], 16) - int(held_span.split("-")[0], 16)
        assert held_bytes == -(-(layout.bands[-1].data_offset % 4096 + 1000 * wide.row_bytes) // 4096) * 4096
