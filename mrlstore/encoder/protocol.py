"""The seam between the store and an image encoder (the engine-specific encoder lives elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns inputs (images) into Matryoshka vectors of length ``dim``."""

    # read-only, so a class attribute, a property or a list of prefixes all satisfy it
    @property
    def dim(self) -> int: ...

    @property
    def nesting(self) -> Sequence[int]: ...

    def encode(self, images: Any) -> np.ndarray:
        """float32 array (n, dim), one row per image, in order. The store passes a list of decoded images
        (uint8 HxWx3 arrays), at most an add's ``batch_size`` at a time; the bundled encoder also takes
        paths, folders and the other inputs of :mod:`mrlstore.inputs.images`."""
        ...
