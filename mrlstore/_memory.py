"""Handing freed heap memory back to the operating system after large writes (no engine imports)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pyarrow as pa

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        _trim = None


def release_freed_memory() -> None:
    """glibc keeps the pages of freed medium-sized blocks (an add's validation and write temporaries) in
    its heap, and Arrow's allocator those of replaced in-memory tables: at 100k rows they held 37 and
    10 MB of resident memory after the build. Both are handed back."""
    if _trim is not None:
        _trim(0)
    pa.default_memory_pool().release_unused()
