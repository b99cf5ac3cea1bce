"""Print the funnel's recall@k against the exact funnel and against exact full-dim search.

    python benchmarks/funnel_recall.py [--n 20000] [--queries 200] [--noise 0.6]

Data: mrlstore.testing.mrl_like_split (seeded, documented there). The "exact funnel" is the same funnel
computed exactly in numpy on the stored (float16-rounded) vectors: exact top-shortlist on the first prefix,
exact re-rank on each longer one. The store's funnel differs from it only where HNSW misses a candidate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import mrlstore  # noqa: E402
from mrlstore.query.plan import shortlist_sizes  # noqa: E402
from mrlstore.testing import exact_funnel, exact_search, mrl_like_split, recall_at_k  # noqa: E402

FUNNELS = ([16, 2048], [16, 64, 256, 2048], [32, 2048], [64, 2048])


def measure(n: int, n_queries: int, noise: float, k: int = 10, dim: int = 2048, seed: int = 0) -> list[dict]:
    base, queries = mrl_like_split(n, n_queries, dim, seed=seed, noise=noise)
    stored = base.astype(np.float16).astype(np.float32)
    truth_full = exact_search(stored, queries, k)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with mrlstore.open(Path(tmp) / "s", dim=dim) as store:
            store.add_vectors(base, ids=[str(i) for i in range(n)])
            for dims in FUNNELS:
                sizes = shortlist_sizes(None, k, len(dims))
                t0 = time.perf_counter()
                hits = store.query(queries, k=k, dims=dims, metadata=False)
                elapsed = time.perf_counter() - t0
                found = [h.ids for h in hits]
                truth_funnel = exact_funnel(stored, queries, dims, sizes, k)
                rows.append(
                    {
                        "dims": dims,
                        "shortlist": sizes,
                        "recall_vs_exact_funnel": recall_at_k(found, truth_funnel),
                        "recall_vs_exact_full": recall_at_k(found, truth_full),
                        "ms_per_query": 1e3 * elapsed / n_queries,
                    }
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.6)
    args = ap.parse_args()
    print(f"N={args.n} queries={args.queries} dim=2048 noise={args.noise} k=10 metric=cosine float16")
    print("| dims | shortlist | recall@10 vs exact funnel | recall@10 vs exact 2048-d | ms/query (batch) |")
    print("|---|---|---|---|---|")
    for r in measure(args.n, args.queries, args.noise):
        print(
            f"| {r['dims']} | {r['shortlist']} | {r['recall_vs_exact_funnel']:.4f} | "
            f"{r['recall_vs_exact_full']:.4f} | {r['ms_per_query']:.2f} |"
        )


if __name__ == "__main__":
    main()
