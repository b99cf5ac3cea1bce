"""hnswlib's saved index file (``Index.save_index``), read with numpy into the arrays of hnswlib's state
dict (what its ``__getstate__`` returns and its state constructor takes).

hnswlib's own ``load_index`` reads the file element by element through a C++ stream, seeking twice per
element: 3.6 s for a 4M-row 64-d index, against 1.5 s this way (benchmarks/results/hugepages.md); the
state constructor copies whole arrays. The one sequential step, the walk over the upper links' byte counts,
runs in C without the GIL when built (_hnsw_walk.c), in its Python twin otherwise.
The file is checked as it is read: every size must add up to the file's, or ``HnswFileError`` says where not.

Layout (hnswlib 0.8, little-endian): a 96-byte header, then every element's level-0 block (its links, its
vector, its label), then for each element a uint32 byte count of its upper-level links and those links.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_native: Any  # the native walk (_hnsw_walk.c), or None
try:
    from mrlstore.tiers import _hnsw_walk as _native
except ImportError:  # built without a C compiler: the Python twin gives the same levels
    _native = None

HEADER = np.dtype(
    [
        ("offset_level0", "<u8"),
        ("max_elements", "<u8"),
        ("cur_element_count", "<u8"),
        ("size_data_per_element", "<u8"),
        ("label_offset", "<u8"),
        ("offset_data", "<u8"),
        ("max_level", "<i4"),
        ("enterpoint_node", "<u4"),
        ("max_M", "<u8"),
        ("max_M0", "<u8"),
        ("M", "<u8"),
        ("mult", "<f8"),
        ("ef_construction", "<u8"),
    ]
)
STATE_VERSION = 1  # hnswlib's ser_version for this dict


class HnswFileError(ValueError):
    """The file is not a whole hnswlib index."""


def read_state(path: Path, space: str, dim: int, capacity: int) -> dict[str, Any]:
    """The state dict of the index saved at ``path``, with room for ``capacity`` elements. Its large arrays
    are views of a read-only memory map of the file (the state constructor copies them)."""
    head, level0, upper, levels = _parsed(path, capacity)
    count, per_element, link_words = len(levels), int(head["size_data_per_element"]), int(head["max_M"]) + 1
    label_at = int(head["label_offset"])
    labels = level0.reshape(count, per_element)[:, label_at : label_at + 8]
    return {
        **{key: head[key].item() for key in HEADER.names or ()},
        "ser_version": STATE_VERSION,
        "space": space,
        "dim": dim,
        "index_inited": True,
        "normalize": space == "cosine",
        "ep_added": count > 0,
        "num_threads": 1,
        "seed": 100,  # hnswlib's default: only new elements' levels depend on it
        "ef": 10,
        "max_elements": capacity,
        "size_links_per_element": link_words * 4,
        "has_deletions": True,  # hnswlib then counts the marked elements itself
        "allow_replace_deleted": False,
        "label_lookup_external": np.ascontiguousarray(labels).view("<u8").ravel(),
        "label_lookup_internal": np.arange(count, dtype=np.uint32),
        "element_levels": np.pad(levels, (0, capacity - count)),
        "data_level0": level0.view(np.int8),
        "link_lists": _without_counts(upper, levels, link_words).view(np.int8),
    }


def check_file(path: Path, count: int) -> None:
    """Raise HnswFileError unless ``path`` holds a whole index of ``count`` elements: hnswlib's save_index
    does not report failed writes (a full disk leaves a short file)."""
    if _parsed(path, count)[0]["cur_element_count"] != count:
        raise HnswFileError(f"{path}: the header does not count {count} elements")


def _parsed(path: Path, capacity: int) -> tuple[np.void, np.ndarray, np.ndarray, np.ndarray]:
    """The header, the level-0 blocks, the upper links (as uint32 words) and each element's upper levels,
    every size checked against the file's."""
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    if len(data) < HEADER.itemsize:
        raise HnswFileError(f"{path}: {len(data)} bytes, shorter than hnswlib's header")
    head = data[: HEADER.itemsize].view(HEADER)[0]
    count, per_element = int(head["cur_element_count"]), int(head["size_data_per_element"])
    links_end = HEADER.itemsize + count * per_element
    if count > capacity or links_end > len(data) or (len(data) - links_end) % 4:
        raise HnswFileError(f"{path}: the header's {count} elements do not fit the file or the capacity")
    upper = data[links_end:].view("<u4")
    levels = _upper_levels(upper, count, int(head["max_M"]) + 1, int(head["max_level"]), path)
    return head, data[HEADER.itemsize : links_end], upper, levels


def _upper_levels(upper: np.ndarray, count: int, link_words: int, max_level: int, path: Path) -> np.ndarray:
    """Each element's number of upper levels, walking the byte counts (natively when built)."""
    levels = np.zeros(count, dtype=np.int32)
    walk = _native.upper_levels if _native is not None else walk_upper_levels
    element, end, bad = walk(upper, levels, count, link_words * 4, max_level)
    if bad >= 0:
        raise HnswFileError(f"{path}: element {element} has {bad} bytes of upper links")
    if end != len(upper):
        raise HnswFileError(f"{path}: the upper links end at byte {end * 4} of {len(upper) * 4}")
    return levels


def walk_upper_levels(
    upper: np.ndarray, levels: np.ndarray, count: int, link_bytes: int, max_level: int
) -> tuple[int, int, int]:
    """The Python twin of ``_hnsw_walk.upper_levels`` (see _hnsw_walk.c): fills ``levels``; returns the
    element with a bad byte count (``count``: none), the word after the last element and that count (-1:
    none). Most counts are 0 (about one element in M has upper levels), so the walk jumps from one non-zero
    count to the next: a run of zero words at a count is a run of elements without upper levels."""
    is_nonzero = upper != 0
    nonzero = np.flatnonzero(is_nonzero)
    rank = np.cumsum(is_nonzero, dtype=np.int64) - is_nonzero  # non-zero words before each word
    # memoryviews: item access returns Python ints, several times faster than numpy scalars in this loop
    words, next_nonzero, nonzero_before = upper.data, nonzero.data, rank.data
    element = word = 0
    while element < count and word < len(upper):
        at = nonzero_before[word]
        nxt = next_nonzero[at] if at < len(nonzero) else len(upper)
        if nxt - word >= count - element:  # only empty counts are left
            break
        element, word = element + nxt - word, nxt
        size = words[word]
        if size % link_bytes or size // link_bytes > max_level:
            return element, word, size
        levels[element] = size // link_bytes
        element, word = element + 1, word + 1 + size // 4
    return count, word + count - element, -1


def _without_counts(upper: np.ndarray, levels: np.ndarray, link_words: int) -> np.ndarray:
    """The upper links of every element, in order, without the byte counts between them."""
    words = levels.astype(np.int64) * link_words
    counts_at = np.arange(len(levels), dtype=np.int64) + np.cumsum(words) - words
    keep = np.ones(len(upper), dtype=bool)
    keep[counts_at] = False
    return np.ascontiguousarray(upper[keep])
