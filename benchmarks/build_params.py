"""Index construction settings: build time against shortlist recall, for the first-stage HNSW.

    python benchmarks/build_params.py [--data 100000] [--settings 8:40:32 16:40:32 ...]

Uses the synthetic data of benchmarks/compare.py (made there, or here on first use). Each setting
``M:ef_construction:prefix`` builds a float16 store indexing that one prefix, then times single queries at
shortlists 50, 100, 200 and 400 (dims = [prefix, dim], metadata off) and their recall@10 against exact
full-dimension search. Writes benchmarks/results/build_params.md (100k) or build_params_<data>.md. This is the
measurement behind the defaults M (16, and 8 on the 16-d prefix), ef_construction=40 (200 on prefixes of more
than 32 dims) and index_dims=(16, 32) (mrlstore/tiers/params.py): compare settings at equal recall, not at
equal shortlist.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import compare  # noqa: E402

import mrlstore  # noqa: E402

SETTINGS = ["16:200:16", "16:64:16", "16:40:16", "8:40:16", "16:200:32", "16:64:32", "16:40:32", "8:40:32", "8:40:64"]
SHORTLISTS = (50, 100, 200, 400)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="100000")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--settings", nargs="+", default=SETTINGS, help="M:ef_construction:prefix")
    args = ap.parse_args()
    d = compare.prepare(args.work, args.data, 200)
    base = np.load(d / "base.npy", mmap_mode="r")
    queries, truth = np.load(d / "queries.npy"), np.load(d / "truth.npy")
    dim = base.shape[1]  # 2048, or the second generator's 1024
    lines = [
        f"N={len(base):,} x {dim} synthetic (benchmarks/compare.py data), float16, one index per store; "
        f"`python benchmarks/build_params.py --data {args.data} --settings {' '.join(args.settings)}`",
        "",
        "| M | ef_construction | index | build s | "
        + " | ".join(f"shortlist {n}: recall / p50 ms" for n in SHORTLISTS)
        + " |",
        "|---|---|---|---|" + "---|" * len(SHORTLISTS),
    ]
    path = args.work / "build_params_store"
    for setting in args.settings:
        m, efc, prefix = (int(v) for v in setting.split(":"))
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        store = mrlstore.open(path, dim=dim, hnsw_m=m, ef_construction=efc, index_dims=(prefix,))
        for lo in range(0, len(base), compare.ADD_BATCH):
            hi = min(len(base), lo + compare.ADD_BATCH)
            store.add_vectors(base[lo:hi], ids=[str(i) for i in range(lo, hi)])
        store.checkpoint()
        build = time.perf_counter() - t0
        cells = []
        for shortlist in SHORTLISTS:
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                hits = store.query(q, k=10, dims=[prefix, dim], shortlist=shortlist, metadata=False)
                times.append(time.perf_counter() - t0)
                found.append([int(i) for i in hits.ids])
            cells.append(f"{compare.recall(found, truth):.3f} / {1e3 * np.median(times):.2f}")
        store.close()
        lines.append(f"| {m} | {efc} | {prefix}-d | {build:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    shutil.rmtree(path, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "build_params.md" if args.data == "100000" else f"build_params_{args.data}.md"
    (args.out / name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
