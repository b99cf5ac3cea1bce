"""Cold reads: chunk maps advised random access (a query's scattered rows read one page each), sequential
readers reading ahead, and the kernel's parallel page-in of a stage's rows changing no result."""

from __future__ import annotations

import ctypes
import gc
import os
import resource
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import mrlstore
from mrlstore import kernels
from mrlstore.query import tuning
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


def _mapped_rss(path_part: str) -> dict[str, tuple[int, int]]:
    """(size, Rss) in bytes of this process's mappings of files whose path contains ``path_part``, by file."""
    out, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[5] if len(fields) >= 6 and path_part in fields[5] else None
            if current:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out[current] = (end - start, 0)
        elif line.startswith("Rss:") and current:
            out[current] = (out[current][0], int(fields[1]) * 1024)
    return out


def _evict(store_path: Path) -> None:
    """Drop the chunk files' pages from the page cache where nobody maps them (no root needed)."""
    for f in (store_path / "vectors").rglob("*"):
        if f.is_file() and f.name != "zarr.json":
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages would stay
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
def test_every_band_map_is_advised_random(store_path):
    """A query's rows fault in one page each, also in rows read at open and pushed out since (no read-around:
    up to read_ahead_kb, 8 MiB here, per fault at 12M rows)."""
    query = mrl_like(1, 256, seed=4, sample=1)[0][0]
    with mrlstore.open(store_path, read_only=True) as store:
        store.query(query)
        flags = _mapped_flags(str(store_path / "vectors"))
        assert len(flags) == 4 and all(" rr" in f for f in flags.values())  # three bands and row_norms


def _major_faults(read: Callable[[], object]) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    read()
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before


def _cold_layout(store_path: Path) -> bands.BandedVectors:
    """The store's bands as past a quarter of RAM (no row held in memory), mapped by nobody else and out of
    the page cache."""
    gc.collect()  # maps of earlier layouts go with them: mapped pages stay in the page cache
    _evict(store_path)
    budget, bands._resident_budget = bands._resident_budget, lambda: 0
    try:
        return bands.BandedVectors(store_path, 256, (16, 64, 256), "float16")
    finally:
        bands._resident_budget = budget


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise to evict")
def test_sequential_reads_of_cold_rows_read_ahead(store_path):
    """Band maps advise random access, so a sequential reader asks for its rows ahead (MADV_WILLNEED):
    without it a cold exact scan faulted one page at a time (6x slower over the 2048-wide band at 12M)."""
    query = mrl_like(1, 256, seed=4, sample=1)[0][:1]
    every = np.arange(6000)
    one_by_one = _major_faults(lambda: kernels.scan(_cold_layout(store_path), query, 256, 10, "cosine", rows=every))
    scanned = _major_faults(lambda: kernels.scan(_cold_layout(store_path), query, 256, 10, "cosine", stop=6000))
    in_blocks = _major_faults(lambda: _cold_layout(store_path).read_range(0, 6000, 0, 256))
    dense = _major_faults(lambda: _cold_layout(store_path).gather(every[::2], 0, 256))  # an export, a compaction
    sparse = _major_faults(lambda: _cold_layout(store_path).gather(every[::40], 0, 256))  # a shortlist
    assert one_by_one > 200  # the scan kernel reads a row list as it comes: about a fault a page
    assert scanned * 4 < one_by_one and in_blocks * 4 < one_by_one and dense * 4 < one_by_one
    assert sparse > 100  # one page a row, without read-around


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise to evict")
def test_the_rows_read_at_open_are_read_ahead(store_path):
    gc.collect()
    _evict(store_path)
    with mrlstore.open(store_path, read_only=True) as store:  # reads every row at open (prefault)
        faults = _major_faults(lambda: store.query(mrl_like(1, 256, seed=4, sample=1)[0][0], dims=[256]))
    assert faults < 20  # the exact 256-d scan found every row in memory
    gc.collect()
    _evict(store_path)
    opened = _major_faults(lambda: mrlstore.open(store_path, read_only=True).close())
    assert opened < 200  # about 770 pages of rows: faulted one by one without reading ahead


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
    layout = bands.BandedVectors(store_path, 256, (16, 64, 256), dtype)
    widest = max(layout.arrays, key=lambda a: a.row_bytes)
    others = sum(a.row_bytes for a in layout.arrays if a is not widest)
    rows_bytes = {a.dir.name: 6000 * a.row_bytes for a in layout.arrays}  # each array's rows
    monkeypatch.setattr(bands, "_resident_budget", lambda: 6000 * others)  # every row but the widest band's
    del layout
    gc.collect()
    _evict(store_path)
    with mrlstore.open(store_path, read_only=True) as past:
        hits = past.query(query, dims=[16, 64, 256], shortlist=300)
        resident = _mapped_rss(str(store_path / "vectors"))
        assert hits.ids == expected.ids
        np.testing.assert_allclose(hits.scores, expected.scores, rtol=1e-6)
    assert widest.dir.name == "band_00064_00256"
    assert len(resident) == 4
    for name, (_, rss) in resident.items():
        array = Path(name).parent.parent.parent.name
        held = rss >= rows_bytes[array] // 4096 * 4096  # read at open: in memory whole
        assert not held if array == widest.dir.name else held, (array, rss)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_tune_reads_back_the_held_rows_its_exact_search_pushed_out(store_path, monkeypatch):
    """tune's reference search reads every row; in a store past RAM the page cache makes room with the rows
    held in memory. MADV_PAGEOUT stands in for that memory pressure here."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    layout = bands.BandedVectors(store_path, 256, (16, 64, 256), "float16")
    widest = max(layout.arrays, key=lambda a: a.row_bytes)
    budget = 6000 * sum(a.row_bytes for a in layout.arrays if a is not widest)
    del layout
    monkeypatch.setattr(bands, "_resident_budget", lambda: budget)  # every row but the widest band's

    def narrow_rss() -> int:
        maps = _mapped_rss(str(store_path / "vectors"))
        return sum(rss for name, (_, rss) in maps.items() if widest.dir.name not in name)

    sample = tuning.Probe.sample

    def pushed_out(*args, **kwargs):  # noqa: ANN002, ANN003
        probe = sample(*args, **kwargs)
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 6 and str(store_path / "vectors") in fields[5]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                assert libc.madvise(start, end - start, 21) == 0  # MADV_PAGEOUT (Linux 5.4)
        assert narrow_rss() == 0
        return probe

    measured_with = []
    choose = tuning.tune_prefixes

    def measure(*args, **kwargs):  # noqa: ANN002, ANN003
        measured_with.append(narrow_rss())
        return choose(*args, **kwargs)

    monkeypatch.setattr(tuning.Probe, "sample", pushed_out)
    monkeypatch.setattr(tuning, "tune_prefixes", measure)
    with mrlstore.open(store_path) as store:
        held = narrow_rss()
        store.tune(recall=0.9, sample=20)
    assert held > 0 and measured_with == [held]  # read back before tune measured the funnels on them
