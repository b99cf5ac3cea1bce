"""The float16 -> float32 widening used on the read paths: bit-exact with numpy on every half value."""

from __future__ import annotations

import numpy as np
import pytest

from mrlstore import kernels

ALL_HALVES = np.arange(65536, dtype=np.uint16).view(np.float16)


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), np.flatnonzero(~same)[:10]


def test_as_float32_matches_numpy_on_every_half_value():
    assert_bit_exact(kernels.as_float32(ALL_HALVES), ALL_HALVES.astype(np.float32))


def test_as_float32_keeps_shape_and_handles_strided_and_float32_input():
    x = np.random.default_rng(0).standard_normal((50, 300)).astype(np.float16)
    view = x[::2, 7:250]  # not contiguous
    np.testing.assert_array_equal(kernels.as_float32(view), view.astype(np.float32))
    y = x.astype(np.float32)
    assert kernels.as_float32(y) is y
    assert kernels.as_float32(x[:1, :3]).dtype == np.float32  # below the native threshold: numpy


def test_native_kernel_both_paths_are_bit_exact():
    kernels = pytest.importorskip("mrlstore._kernels", reason="built without a C compiler: numpy path only")
    want = ALL_HALVES.astype(np.float32)
    for convert in (kernels.f16_to_f32, kernels.f16_to_f32_portable):
        out = np.empty(65536, dtype=np.float32)
        convert(ALL_HALVES, out)
        assert_bit_exact(out, want)
    with pytest.raises(ValueError):
        kernels.f16_to_f32(ALL_HALVES, np.empty(10, dtype=np.float32))
