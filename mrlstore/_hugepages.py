"""Transparent huge pages for the large arrays a library allocates where we cannot reach them (hnswlib's
graph), on Linux; elsewhere, or where the kernel refuses, nothing happens.

An HNSW search jumps between rows spread over the whole graph: at 4M 64-d rows (1.5 GiB) with 4 KiB pages
nearly every step misses the TLB; on 2 MiB pages a search took 303 us against 376 (0.81x,
benchmarks/results/hugepages.md). Most kernels give huge pages only to memory that asks for them
(``madvise`` mode). hnswlib allocates with malloc, so the regions it maps are found by comparing the
process's mappings before and after the call, then advised (``MADV_HUGEPAGE``: later page faults get huge
pages); pages already filled (a loaded index) are collapsed into huge pages in a background thread
(``MADV_COLLAPSE``, Linux 6.1+), 2 MiB at a time and only where all of a block is resident, so no memory is
added.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE_PAGE = 2 << 20
PAGE = 4096
MIN_REGION = 64 << 20  # smaller regions gain little: the TLB covers much of them anyway

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        _libc = None
_collapse_works = True  # cleared at the first refusal (old kernel, huge pages off)


def large_anonymous_regions() -> set[tuple[int, int]]:
    """This process's private anonymous mappings of at least MIN_REGION bytes, as (start, end)."""
    if _libc is None:
        return set()
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    regions = set()
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and fields[1] == "rw-p":  # no path: anonymous
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start >= MIN_REGION:
                regions.add((start, end))
    return regions


@contextmanager
def huge_pages_for_new_regions(collapse: bool = False) -> Iterator[None]:
    """Advise huge pages for the large regions mapped inside the block; ``collapse``: also turn the pages
    already filled there into huge pages, in the background."""
    before = large_anonymous_regions()
    yield
    fresh = sorted(large_anonymous_regions() - before)
    for start, end in fresh:
        _libc.madvise(start, end - start, MADV_HUGEPAGE)  # type: ignore[union-attr]
    if collapse and fresh and _collapse_works:
        threading.Thread(target=collapse_resident, args=(fresh,), name="mrlstore-hugepages", daemon=True).start()


def collapse_resident(regions: list[tuple[int, int]]) -> int:
    """Collapse every fully resident, aligned 2 MiB block of ``regions`` into a huge page; how many were.
    A region unmapped meanwhile is skipped (mincore fails on it)."""
    global _collapse_works
    resident = ctypes.create_string_buffer(HUGE_PAGE // PAGE)
    done = refused = 0
    for start, end in regions:
        for block in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end - HUGE_PAGE + 1, HUGE_PAGE):
            if _libc.mincore(block, HUGE_PAGE, resident) != 0:  # type: ignore[union-attr]
                break
            if not all(b & 1 for b in resident.raw):
                continue
            if _libc.madvise(block, HUGE_PAGE, MADV_COLLAPSE) == 0:  # type: ignore[union-attr]
                done += 1
            elif ctypes.get_errno() == errno.EINVAL and done == 0:
                refused += 1
                if refused == 4:  # refused from the start: not supported here
                    _collapse_works = False
                    return 0
    return done
