"""The seam between the store and an image encoder (the engine-specific encoder lives elsewhere)."""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns inputs (images) into Matryoshka vectors of length ``dim``."""

    dim: int
    nesting: tuple[int, ...]

    def encode(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """float32 array (n, dim), one row per input, in input order."""
        ...


def looks_like_vectors(x: Any) -> bool:
    """True for numeric arrays meant as vectors; False for paths, images and other encoder inputs."""
    if isinstance(x, (str, bytes, os.PathLike)):
        return False
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "fc" or (x.dtype.kind in "iu" and x.ndim <= 2)
    if hasattr(x, "dtype") and hasattr(x, "ndim") and hasattr(x, "detach"):  # torch tensor
        return x.dtype.is_floating_point and x.ndim <= 2
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(v, (int, float, np.number)) for v in x) or all(
            isinstance(v, (list, tuple, np.ndarray)) and looks_like_vectors(v) for v in x
        )
    return False


def source_paths(images: Any) -> list[str] | None:
    """The file paths of path inputs (kept as metadata), or None when the inputs are not all paths."""
    items = [images] if isinstance(images, (str, os.PathLike)) else images
    if isinstance(items, (list, tuple)) and items and all(isinstance(p, (str, os.PathLike)) for p in items):
        return [os.fspath(p) for p in items]
    return None
