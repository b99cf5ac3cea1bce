"""What the user passed: one function, :func:`classify`, turns a query or an add's input into a typed value
(:class:`Vectors` or :class:`Images`) that the rest of the path trusts.

The rule: a 1-D numeric array or list is one vector; a 2-D numeric array (not uint8) whose width is the
store's ``dim``, a list of such rows, or a vector column (Arrow, pandas) is a batch of vectors; everything
else is an image or a collection of images: paths and folders (recursive, image files only, sorted),
``bytes`` and binary file objects holding an encoded image, PIL images, uint8 arrays of any shape (HxW,
HxWx3, HxWx4, NxHxWx3), other arrays of 3 or 4 dimensions or 2-D with another width (HxW grayscale),
tensors likewise. A store without an encoder takes every numeric input as vectors (a wrong shape then gets
the vectors' ShapeError).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrlstore.errors import EncoderUnavailableError, InvalidInputError
from mrlstore.inputs.arrow import is_table, is_vector_column
from mrlstore.inputs.images import ImageItem, check, expand, is_column, is_pil, is_tensor, is_url
from mrlstore.inputs.vectors import query_batch


@dataclass(frozen=True)
class Vectors:
    """Checked query vectors: float32 (m, need), finite (and non-zero for cosine); ``single``: one was given."""

    matrix: np.ndarray
    single: bool


@dataclass(frozen=True)
class Images:
    """Image inputs, expanded (folders to files) and their headers checked; ``single``: one was given."""

    items: list[ImageItem]
    single: bool


def classify(
    x: Any, dim: int, need: int, metric: str, images: Callable[[], bool], what: str = "query()"
) -> Vectors | Images:
    """``x`` as vectors (checked: ``need`` numbers each, of a ``dim``-d store) or as images (expanded, headers
    checked; only when the store can encode them: ``images()``, asked only when ``x`` is not plainly vectors).
    Tables are refused: they need a column name."""
    if looks_like_vectors(x, dim) or (not images() and looks_like_vectors(x)):
        matrix, single = query_batch(x, need, dim, metric)
        return Vectors(matrix, single)
    if is_table(x):
        raise InvalidInputError(
            f"{what} takes vectors or images, got a {type(x).__name__}: for a table of queries use "
            "query_table(table, vector='embedding') (or image='<column>')"
        )
    if not images():
        raise EncoderUnavailableError(
            f"{what} got something that is not vectors of length {dim} (images?), and this store has no encoder "
            "for images: pass encoder=... to mrlstore.open(), or give vectors"
        )
    return Images(check(expand(x), skip_errors=False)[0], is_single(x))


def looks_like_vectors(x: Any, dim: int | None = None) -> bool:
    """True when ``x`` is vectors by the module's rule; False for images and other encoder inputs. With
    ``dim=None`` every numeric array that is not uint8 counts as vectors (a store without an encoder: a
    wrong shape then gets the vectors' ShapeError)."""
    if type(x) is np.ndarray and x.ndim == 1 and x.dtype.kind == "f":  # the common query: decided at once
        return True
    if isinstance(x, (str, bytes, bytearray, os.PathLike)) or is_pil(x) or hasattr(x, "read"):
        return False
    if is_vector_column(x):  # Arrow list columns and pandas Series hold vectors, never images
        return True
    if is_tensor(x):
        if str(x.dtype) == "torch.uint8":
            return False
        return dim is None or x.ndim == 1 or (x.ndim == 2 and x.shape[-1] == dim)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fciub" or x.dtype == np.uint8:
            return x.dtype.kind not in "fciub" and dim is None  # object arrays: the vectors' error
        return dim is None or x.ndim == 1 or (x.ndim == 2 and x.shape[-1] == dim)
    if isinstance(x, (list, tuple)) and x:
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x):
            return True
        return all(isinstance(v, (list, tuple, np.ndarray)) and _is_vector_row(v) for v in x)
    return False


def _is_vector_row(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.dtype.kind in "fciu" and v.dtype != np.uint8
    return bool(v) and all(isinstance(a, (int, float, np.number)) and not isinstance(a, bool) for a in v)


def is_single(query: Any) -> bool:
    """Whether a query input is one image (a result) rather than a collection (a list of results)."""
    if isinstance(query, (list, tuple)) or is_column(query):
        return False
    if isinstance(query, (str, os.PathLike)) and not is_url(query):
        return not Path(query).is_dir()
    return not ((isinstance(query, np.ndarray) or is_tensor(query)) and query.ndim == 4)
