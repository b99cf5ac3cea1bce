"""Does a tuned store keep its recall as it grows? Tunes a store of MRL-like vectors at ``--start`` rows (on
held-out queries, ``tune(queries=...)``), adds rows from the same clusters up to each growth factor, and at
each size measures the default query on other held-out queries: recall@10 against exact search on the
stored (float16-rounded) vectors, and p50 ms one query at a time, with the shortlists grown as ``query()``
grows them, and with the shortlists as tuned (passed explicitly: what queries ran before they grew).

    python benchmarks/tune_growth.py                                      # 512-d, 20k rows, 100 clusters
    python benchmarks/tune_growth.py --clusters 1000 --spectrum gentle    # a harder generator
    python benchmarks/tune_growth.py --dim 1024 --start 25000 --clusters 10000

Prints the tuned setting, the growth exponents tune measured, and a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import mrlstore
from mrlstore.query import plan as query_plan
from mrlstore.testing import exact_search, mrl_like


def measure(store: mrlstore.Store, held: np.ndarray, truth: list[np.ndarray], **options) -> tuple[float, float]:
    """Recall@10 of ``store.query(held, **options)`` against ``truth``, and its p50 ms one query at a time."""
    found, times = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the growth warning
        for q in held:
            t0 = time.perf_counter()
            hits = store.query(q, k=10, metadata=False, **options)
            times.append(time.perf_counter() - t0)
            found.append({int(i) for i in hits.ids})
    recall = float(np.mean([len(f & set(t.tolist())) / 10 for f, t in zip(found, truth)]))
    return recall, 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--start", type=int, default=20000, help="rows when tuned")
    ap.add_argument("--growth", type=int, nargs="+", default=[1, 2, 4, 8], help="sizes, as multiples of --start")
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--spectrum", default="power", choices=["power", "gentle"])
    ap.add_argument("--recall", type=float, default=0.95)
    ap.add_argument("--work", type=Path, default=None, help="folder for the store (default: a temporary one)")
    args = ap.parse_args()
    n_max = args.start * max(args.growth)
    rows, _ = mrl_like(n_max + 400, args.dim, n_clusters=args.clusters, spectrum=args.spectrum, seed=3)
    tune_queries, held, base = rows[:200], rows[200:400], rows[400:]
    stored = base.astype(np.float16).astype(np.float32)
    work = Path(tempfile.mkdtemp()) if args.work is None else args.work
    path = work / "tune_growth_store"
    shutil.rmtree(path, ignore_errors=True)
    with mrlstore.open(path, dim=args.dim) as store:
        store.add_vectors(base[: args.start], ids=[str(i) for i in range(args.start)])
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shapes that miss the target
            tuned = store.tune(recall=args.recall, queries=tune_queries)
        print(f"tuned at {args.start:,} rows in {time.perf_counter() - t0:.1f} s: dims={tuned.dims} shortlist "
              f"{tuned.shortlist} ({tuned.prefixes} prefixes), growth exponents {tuned.growth}")  # fmt: skip
        as_tuned = query_plan.tapered_sizes(tuned.shortlist, 10, len(tuned.dims), tuned.taper)
        print("\n| rows | shortlists as tuned | recall | p50 ms | grown shortlists | recall | p50 ms |")
        print("|---|---|---|---|---|---|---|")
        added = args.start
        for factor in sorted(args.growth):
            n = args.start * factor
            if n > added:
                store.add_vectors(base[added:n], ids=[str(i) for i in range(added, n)])
                added = n
            truth = exact_search(stored[:n], held, 10)
            kept = measure(store, held, truth, dims=tuned.dims, shortlist=as_tuned or None)
            grown = measure(store, held, truth)
            live = tuned.live or args.start
            exponent = (tuned.growth or {}).get(str(tuned.dims[0]), 1.0)
            first = query_plan.grown_size(tuned.shortlist, live, exponent, n)
            sizes = query_plan.tapered_sizes(first, 10, len(tuned.dims), tuned.taper)
            print(f"| {n:,} | {as_tuned} | {kept[0]:.3f} | {kept[1]:.3f} | {sizes} | {grown[0]:.3f} | {grown[1]:.3f} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
