"""Side-by-side: mrlstore funnels against full-dimension search, on one machine in one run.

    python benchmarks/compare.py [--n 100000] [--queries 200] [--out benchmarks/results]

Data: mrlstore.synthetic.mrl_like (seeded; 100 clusters, per-dimension scale (j+1)^-0.5, noise 1.0),
dim 2048; queries are an independent draw from the same clusters. Ground truth: exact top-10 by cosine on
the float16-rounded vectors (what every system below is given). Systems:

- mrlstore, several funnels and shortlists, and the ``tune(recall=0.95)`` default;
- hnswlib HNSW on the full 2048-d vectors (M=16, ef_construction=200; ef swept);
- exact brute force at 2048-d (numpy float32 matmul over all vectors).

Measured per system: recall@10, p50/p99 single-query latency, batch queries/s, build time, resident
memory added by the system (RSS growth while it is built and held), bytes on disk. Writes a markdown table
(and a PNG of recall against latency when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mrlstore  # noqa: E402
from mrlstore.synthetic import exact_search, mrl_like, recall_at_k  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def du_mb(path: Path) -> float:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 2**20


def latency(fn, queries: np.ndarray) -> tuple[float, float, list]:
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - t0)
    ms = 1e3 * np.array(times)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--skip-hnsw-full", action="store_true", help="skip full-dim HNSW (slow to build)")
    args = ap.parse_args()
    dim, k = 2048, 10
    base, _ = mrl_like(args.n, dim, noise=1.0, seed=0)
    queries, _ = mrl_like(args.queries, dim, noise=1.0, seed=0, sample=1)
    stored = base.astype(np.float16).astype(np.float32)
    truth = [[str(r) for r in t] for t in exact_search(stored, queries, k)]
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="mrl-bench-"))
    try:
        # -- mrlstore ---------------------------------------------------------------------------------
        gc.collect()
        rss0 = rss_mb()
        t0 = time.perf_counter()
        store = mrlstore.open(tmp / "store", dim=dim)
        for lo in range(0, args.n, 10_000):
            store.add_vectors(base[lo : lo + 10_000], ids=[str(i) for i in range(lo, min(args.n, lo + 10_000))])
        store.checkpoint()
        build = time.perf_counter() - t0
        mem = rss_mb() - rss0
        disk = du_mb(tmp / "store")
        settings = [
            ([16, 2048], 100),
            ([16, 2048], 200),
            ([16, 2048], 400),
            ([16, 64, 256, 2048], 400),
            ([32, 2048], 200),
        ]
        for dims, shortlist in settings:
            rows.append(
                _measure(
                    f"mrlstore {dims} shortlist {shortlist}",
                    store,
                    queries,
                    truth,
                    k,
                    dict(dims=dims, shortlist=shortlist),
                    build,
                    mem,
                    disk,
                )
            )
        tuned = store.tune(recall=0.95, k=k)
        rows.append(
            _measure(
                f"mrlstore tuned default (shortlist {tuned['shortlist']})",
                store,
                queries,
                truth,
                k,
                {},
                build,
                mem,
                disk,
            )
        )
        store.close()
        del store
        # -- exact brute force ------------------------------------------------------------------------
        gc.collect()
        rss0 = rss_mb()
        t0 = time.perf_counter()
        norm = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        build_bf = time.perf_counter() - t0
        mem_bf = rss_mb() - rss0

        def brute(q):
            return np.argpartition(-(norm @ (q / np.linalg.norm(q))), k)[:k]

        p50, p99, res = latency(brute, queries)
        t0 = time.perf_counter()
        sims = norm @ (queries / np.linalg.norm(queries, axis=1, keepdims=True)).T
        np.argpartition(-sims, k, axis=0)
        qps = len(queries) / (time.perf_counter() - t0)
        rows.append(
            dict(
                system="exact brute force 2048-d (numpy)",
                recall=recall_at_k([[str(i) for i in r] for r in res], truth),
                p50=p50,
                p99=p99,
                qps=qps,
                build=build_bf,
                mem=mem_bf,
                disk=args.n * dim * 4 / 2**20,
            )
        )
        norm = sims = None  # free before the next system is measured
        # -- hnswlib full-dim -------------------------------------------------------------------------
        if not args.skip_hnsw_full:
            import hnswlib

            gc.collect()
            rss0 = rss_mb()
            t0 = time.perf_counter()
            index = hnswlib.Index(space="cosine", dim=dim)
            index.init_index(max_elements=args.n, M=16, ef_construction=200)
            index.add_items(stored, np.arange(args.n), num_threads=-1)
            build_h = time.perf_counter() - t0
            mem_h = rss_mb() - rss0
            index.save_index(str(tmp / "full.hnsw"))
            disk_h = du_mb(tmp) - disk
            for ef in (50, 100, 200):
                index.set_ef(ef)
                p50, p99, res = latency(lambda q: index.knn_query(q, k=k, num_threads=1)[0][0], queries)
                t0 = time.perf_counter()
                index.knn_query(queries, k=k, num_threads=-1)
                qps = len(queries) / (time.perf_counter() - t0)
                rows.append(
                    dict(
                        system=f"hnswlib HNSW 2048-d ef={ef}",
                        recall=recall_at_k([[str(i) for i in r] for r in res], truth),
                        p50=p50,
                        p99=p99,
                        qps=qps,
                        build=build_h,
                        mem=mem_h,
                        disk=disk_h,
                    )
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args)


def _measure(name, store, queries, truth, k, kw, build, mem, disk) -> dict:
    p50, p99, res = latency(lambda q: store.query(q, k=k, metadata=False, **kw).ids, queries)
    t0 = time.perf_counter()
    store.query(queries, k=k, metadata=False, **kw)
    qps = len(queries) / (time.perf_counter() - t0)
    return dict(system=name, recall=recall_at_k(res, truth), p50=p50, p99=p99, qps=qps, build=build, mem=mem, disk=disk)


def report(rows: list[dict], args) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"N={args.n:,} dim=2048 float16-rounded vectors, {args.queries} queries, k=10, cosine; "
        f"machine: {os.cpu_count()} cores; process peak RSS {peak:.0f} MiB",
        "",
        "| system | recall@10 | p50 ms | p99 ms | batch q/s | build s | memory MiB | disk MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['recall']:.3f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['qps']:.0f} | "
            f"{r['build']:.1f} | {r['mem']:.0f} | {r['disk']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compare_{args.n}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
