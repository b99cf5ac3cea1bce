"""Huge pages for large regions a library maps (hnswlib's graph): advised when fresh, filled blocks collapsed,
nothing added to memory, nothing done where the kernel does not offer them."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from mrlstore import _hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are not offered here",
)


def _region(size: int) -> tuple[mmap.mmap, np.ndarray]:
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mapping, np.frombuffer(mapping, dtype=np.uint8)


def _smaps(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding ``address``."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_a_fresh_large_region_is_advised_and_its_filled_blocks_collapse():
    size = _hugepages.MIN_REGION + (8 << 20)
    with _hugepages.huge_pages_for_new_regions():
        mapping, view = _region(size)
    address = view.ctypes.data
    assert "hg" in _smaps(address)["VmFlags"].split()
    mapping.madvise(mmap.MADV_NOHUGEPAGE)  # fill it with small pages, as a library's memcpy would
    view[::4096] = 1
    mapping.madvise(mmap.MADV_HUGEPAGE)
    before = int(_smaps(address)["AnonHugePages"].split()[0])
    collapsed = _hugepages.collapse_resident([(address, address + size)])
    if not _hugepages._collapse_works:
        pytest.skip("this kernel refuses MADV_COLLAPSE (before Linux 6.1)")
    # the whole aligned blocks; on a crowded machine the kernel may find no free huge page for a few of them
    blocks = size // _hugepages.HUGE_PAGE - 1 - before // 2048
    assert collapsed >= blocks * 3 // 4
    assert int(_smaps(address)["AnonHugePages"].split()[0]) >= collapsed * 2048  # blocks huge already count too
    assert view[::4096].all() and not view[1::4096].any()  # contents kept
    del view
    mapping.close()


def test_blocks_not_wholly_in_memory_are_left_alone():
    size = _hugepages.MIN_REGION
    mapping, view = _region(size)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    view[: size // 2 : 8192] = 1  # every other page of the first half
    mapping.madvise(mmap.MADV_HUGEPAGE)
    address = view.ctypes.data
    rss = _smaps(address)["Rss"]
    assert _hugepages.collapse_resident([(address, address + size)]) == 0
    assert _smaps(address)["Rss"] == rss
    del view
    mapping.close()


def test_regions_below_the_minimum_are_not_touched():
    with _hugepages.huge_pages_for_new_regions():
        mapping, view = _region(4 << 20)
    assert "hg" not in _smaps(view.ctypes.data)["VmFlags"].split()
    del view
    mapping.close()
