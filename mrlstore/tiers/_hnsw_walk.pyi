"""Types of the optional native walk (mrlstore/tiers/_hnsw_walk.c); hnsw_file.py has its Python twin."""

from typing import Any

import numpy as np

def upper_levels(
    upper: np.ndarray[Any, Any],  # uint32 words of the upper-link section
    levels: np.ndarray[Any, Any],  # int32, count items, zeroed; filled in
    count: int,
    link_bytes: int,
    max_level: int,
) -> tuple[int, int, int]: ...  # the element with the bad count (count: none), the end word, the bad count (-1: none)
