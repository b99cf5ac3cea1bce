"""float16 -> float32 for the read paths: the optional native kernel (F16C) when it was built, numpy
otherwise (numpy's cast is a scalar loop, about 3 ns a value, which dominated float16 re-ranks)."""

from __future__ import annotations

import numpy as np

try:
    from ._kernels import HAVE_F16C as NATIVE_F16C
    from ._kernels import f16_to_f32 as _f16_to_f32
except ImportError:  # built without a C compiler: the numpy path is correct, only slower
    _f16_to_f32 = None
    NATIVE_F16C = 0

_MIN_NATIVE = 64  # below this the call overhead beats the conversion


def as_float32(block: np.ndarray) -> np.ndarray:
    """``block`` as float32 (no copy when it already is)."""
    if block.dtype == np.float32:
        return block
    if block.dtype == np.float16 and _f16_to_f32 is not None and block.size >= _MIN_NATIVE:
        src = np.ascontiguousarray(block)
        out = np.empty(block.shape, dtype=np.float32)
        _f16_to_f32(src, out)
        return out
    return block.astype(np.float32)
