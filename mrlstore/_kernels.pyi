"""Types of the optional native kernels (mrlstore/_kernels.c); mrlstore.kernels wraps them with numpy twins.

A band description is (chunk base addresses as uint64, chunk_rows, first column, width, is_float16), as
``BandedVectors.kernel_bands`` makes it. Buffers are C-contiguous numpy arrays of the dtype named.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

Buffer = np.ndarray[Any, Any]  # C-contiguous, of the dtype each parameter names

Band = tuple[np.ndarray, int, int, int, int]

HAVE_F16C: int
HAVE_SIMD: int
BOUND_MIN_PER_KEPT: int

def refine(
    bands: Sequence[Band],
    rows: Buffer,  # int64 candidate rows, query after query
    offsets: Buffer,  # int64, len(queries) + 1: query q's candidates are rows[offsets[q]:offsets[q + 1]]
    queries: Buffer,  # float32, queries x query_stride
    query_stride: int,
    dims: Buffer,  # int32 prefix length of each stage
    keeps: Buffer,  # int32 rows kept after each stage
    metric: int,
    out_rows: Buffer,  # int64, writable
    out_scores: Buffer,  # float32, writable
    out_counts: Buffer,  # int64, writable
    threads: int,
    norms: Sequence[Band] | None,
    bounds: Buffer,  # int32 band edges from 0 to the dimension (used with norms)
    warm_threads: int = 0,  # one query: page a stage's rows in from this many threads when they are cold
) -> None: ...
def scan(
    bands: Sequence[Band],
    rows: Buffer | None,  # int64 rows to scan, or None for the range lo..hi
    lo: int,
    hi: int,
    live: Buffer | None,  # bool per row, or None for every row
    queries: Buffer,
    query_stride: int,
    dims: int,
    query_norms: Buffer,
    metric: int,
    keep: int,
    out_rows: Buffer,
    out_scores: Buffer,
    out_counts: Buffer,
    threads: int,
    norms: Sequence[Band] | None,
) -> None: ...
def sum_squares(x: Buffer) -> float: ...  # float32 values
def project(x: Buffer, rows: Buffer, shift: Buffer, scale: float, out: Buffer) -> None: ...  # all float32
def f16_to_f32(src: Buffer, dst: Buffer) -> None: ...
def f16_to_f32_portable(src: Buffer, dst: Buffer) -> None: ...
def set_simd(enabled: object) -> bool: ...
