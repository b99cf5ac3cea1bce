"""mrlstore demo: build a store of Matryoshka-style vectors, query it coarse-to-fine, show the results.

    python examples/vector_demo.py [--store vector_demo_store] [--n 20000]

The vectors are synthetic with MRL-like structure (mrlstore.testing: 100 clusters, signal concentrated in
the leading dimensions), so the demo runs anywhere without downloads. It builds ./vector_demo_store (Zarr bands +
HNSW over the 16- and 32-d prefixes + DuckDB metadata), runs a 16-d shortlist -> 2048-d re-rank query, a filtered
query and a SQL aggregate, and compares the funnel with exact 2048-d search on the same vectors.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import mrlstore  # noqa: E402
from mrlstore.testing import exact_search, mrl_like, recall_at_k  # noqa: E402

COLOURS = ["red", "green", "blue", "amber"]


def main() -> None:
    ap = argparse.ArgumentParser(description="mrlstore demo")
    ap.add_argument("--store", default="vector_demo_store", help="folder for the store (recreated)")
    ap.add_argument("--n", type=int, default=20000, help="vectors to add")
    args = ap.parse_args()

    path = Path(args.store)
    shutil.rmtree(path, ignore_errors=True)
    base, labels = mrl_like(args.n, 2048, seed=0)
    queries, _ = mrl_like(50, 2048, seed=0, sample=1)
    print(f"mrlstore {mrlstore.__version__}: building {path}/ with {args.n:,} vectors of 2048 dims")

    t0 = time.perf_counter()
    with mrlstore.open(path, dim=2048, bands=(16, 64, 256, 2048)) as store:
        step = 2500
        for lo in tqdm(range(0, args.n, step), desc="add_vectors", unit="batch"):
            hi = min(args.n, lo + step)
            store.add_vectors(
                base[lo:hi],
                ids=[f"vec-{i:06d}" for i in range(lo, hi)],
                metadata=[{"cluster": int(labels[i]), "colour": COLOURS[i % 4]} for i in range(lo, hi)],
            )
        print(f"built in {time.perf_counter() - t0:.1f} s: {store.info()}")

        q = queries[0]
        t0 = time.perf_counter()
        hits = store.query(q, k=10, dims=[16, 2048])
        ms = 1e3 * (time.perf_counter() - t0)
        print(f"\nquery k=10 dims=[16, 2048] (16-d HNSW shortlist of 200, exact 2048-d re-rank): {ms:.1f} ms")
        print(hits.to_pandas().to_string(index=False) if _has_pandas() else hits.to_arrow())

        hits = store.query(q, k=5, dims=[16, 64, 256, 2048], where="colour = 'blue' AND cluster < 50")
        print("\nquery k=5 dims=[16, 64, 256, 2048] where colour = 'blue' AND cluster < 50")
        for i, score, meta in hits:
            print(f"  {i}  {score:.4f}  {meta}")

        print("\nstore.sql: SELECT colour, count(*) FROM items GROUP BY 1 ORDER BY 1")
        print(store.sql("SELECT colour, count(*) AS n FROM items GROUP BY 1 ORDER BY 1").to_pylist())

        stored = base.astype(np.float16).astype(np.float32)
        t0 = time.perf_counter()
        funnel = store.query(queries, k=10, dims=[16, 2048], metadata=False)
        t_funnel = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = store.query(queries, k=10, dims=[2048], metadata=False)
        t_exact = time.perf_counter() - t0
        truth = exact_search(stored, queries, 10)
        print(
            f"\n{len(queries)} queries: funnel [16, 2048] recall@10 vs exact 2048-d = "
            f"{recall_at_k([h.ids for h in funnel], [[f'vec-{r:06d}' for r in t] for t in truth]):.3f} "
            f"({1e3 * t_funnel / len(queries):.2f} ms/query); exact scan [2048] recall@10 = "
            f"{recall_at_k([h.ids for h in exact], [[f'vec-{r:06d}' for r in t] for t in truth]):.3f} "
            f"({1e3 * t_exact / len(queries):.2f} ms/query)"
        )
    print(f"\nThe store stays in {path}/ ; reopen it with mrlstore.open({str(path)!r}).")


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
