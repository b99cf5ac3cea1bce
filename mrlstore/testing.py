"""For tests and benchmarks, yours included: seeded synthetic data with Matryoshka-like structure, and exact
references to check the funnel against (``import mrlstore.testing``; ``import mrlstore`` does not load it).

The generator: ``n_clusters`` centres in ``dim`` dimensions; each vector is its centre plus Gaussian noise,
and dimension ``j`` (0-based) of both is scaled by ``(j + 1) ** -decay``. So, as in an MRL embedding, the
leading numbers carry most of the signal (a short prefix already separates the clusters), and later
numbers add finer detail that decides the order among close neighbours. ``spectrum="gentle"`` scales
dimension ``j``'s variance by ``(1 + j / 16) ** -0.5`` instead (``decay`` unused): far more of every
distance lies past a short prefix, and with many small clusters a prefix shortlists much worse.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mrlstore.scoring import prefix_scores, top


def mrl_like(
    n: int,
    dim: int = 2048,
    *,
    n_clusters: int = 100,
    noise: float = 0.6,
    decay: float = 0.5,
    seed: int = 0,
    sample: int = 0,
    spectrum: str = "power",
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 vectors of length ``dim`` and their cluster labels (deterministic).

    ``seed`` fixes the clusters; ``sample`` picks an independent draw from them (0: database, 1: queries).
    """
    return _generate(n, dim, n_clusters, noise, _scale(dim, decay, spectrum), seed, seed + 1 + sample)


def mrl_like_split(
    n_base: int,
    n_queries: int,
    dim: int = 2048,
    *,
    n_clusters: int = 100,
    noise: float = 0.6,
    decay: float = 0.5,
    seed: int = 0,
    spectrum: str = "power",
) -> tuple[np.ndarray, np.ndarray]:
    """A database and held-out queries: the same clusters, independent samples."""
    kw: dict[str, Any] = {"n_clusters": n_clusters, "noise": noise, "decay": decay, "seed": seed, "spectrum": spectrum}
    return mrl_like(n_base, dim, **kw)[0], mrl_like(n_queries, dim, sample=1, **kw)[0]


def mrl_like_blocks(
    n: int,
    dim: int = 2048,
    *,
    n_clusters: int = 100,
    noise: float = 0.6,
    decay: float = 0.5,
    seed: int = 0,
    sample: int = 0,
    block_rows: int = 65536,
    spectrum: str = "power",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of ``mrl_like`` (same arguments, same values) as (vectors, labels) blocks of at most
    ``block_rows`` rows (a multiple of 65,536), for data too large to hold at once."""
    return _blocks(n, dim, n_clusters, noise, _scale(dim, decay, spectrum), seed, seed + 1 + sample, block_rows)


_STEP = 65536  # the generator's draw size: fixed, so values never depend on how the caller blocks them


def _scale(dim: int, decay: float, spectrum: str) -> np.ndarray:
    """Each dimension's scale (standard deviation) for the spectrum."""
    if spectrum == "power":
        return (np.arange(1, dim + 1, dtype=np.float32) ** -decay).astype(np.float32)
    if spectrum == "gentle":
        return ((1 + np.arange(dim, dtype=np.float32) / 16) ** -0.25).astype(np.float32)
    raise ValueError(f"spectrum must be 'power' or 'gentle', got {spectrum!r}")


def _blocks(
    n: int, dim: int, n_clusters: int, noise: float, scale: np.ndarray, cluster_seed: int, sample_seed: int, rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if rows % _STEP:
        raise ValueError(f"block_rows must be a multiple of {_STEP}")
    centres = np.random.default_rng(cluster_seed).standard_normal((n_clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(sample_seed)
    labels = rng.integers(0, n_clusters, size=n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out = np.empty((stop - start, dim), dtype=np.float32)
        for lo in range(start, stop, _STEP):
            hi = min(stop, lo + _STEP)
            block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            block *= noise
            block += centres[labels[lo:hi]]
            block *= scale
            out[lo - start : hi - start] = block
        yield out, labels[start:stop]


def _generate(
    n: int, dim: int, n_clusters: int, noise: float, scale: np.ndarray, cluster_seed: int, sample_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    lo = 0
    for block, block_labels in _blocks(n, dim, n_clusters, noise, scale, cluster_seed, sample_seed, _STEP):
        out[lo : lo + len(block)] = block
        labels[lo : lo + len(block)] = block_labels
        lo += len(block)
    return out, labels


def exact_funnel(
    base: np.ndarray, queries: np.ndarray, dims: list[int], shortlists: list[int], k: int, metric: str = "cosine"
) -> list[np.ndarray]:
    """Per query, the row indices of the exact funnel: exact top-``shortlists[0]`` on ``dims[0]`` over all
    rows, then an exact re-rank on each longer prefix, best first."""
    queries = np.atleast_2d(queries)
    keeps = [*shortlists, k]
    first = prefix_scores(base, queries, dims[0], metric)
    out = []
    for j, q in enumerate(queries):
        rows = top(first[:, j], keeps[0], metric)
        for d, keep in zip(dims[1:], keeps[1:]):
            rows = rows[top(prefix_scores(base[rows], q, d, metric)[:, 0], keep, metric)]
        out.append(rows)
    return out


def exact_search(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine") -> list[np.ndarray]:
    """Per query, the row indices of the exact top-``k`` on the full vectors."""
    return exact_funnel(base, queries, [base.shape[1]], [], k, metric)


def recall_at_k(found: Sequence[Iterable[Any]], truth: Sequence[Sequence[Any]]) -> float:
    """Mean over queries of |found ∩ truth| / |truth|."""
    vals = [len(set(map(str, f)) & set(map(str, t))) / max(1, len(t)) for f, t in zip(found, truth)]
    return float(np.mean(vals)) if vals else 0.0
