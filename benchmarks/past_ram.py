"""A store larger than the machine's memory (issue 25, item 2): build it in bounded memory from generated
MRL-like rows, tune it, and measure recall on held-out queries, warm and cold p50, and anonymous memory.

    python benchmarks/past_ram.py --n 12000000 --work /path/with/60GB    # as root (cold queries drop the cache)
    python benchmarks/past_ram.py --n 200000 --work /tmp/pastram         # a quick check of the script

Rows: ``mrlstore.testing.mrl_like_blocks(n, 2048, noise=1.0, seed=0)`` (compare.py's generator), stored as
float16 with the default bands, added 16,384 rows at a time with ids and a label column. One HNSW index, over
the 64-d prefix (``--index-dims``): at 12M rows the 32-d prefix needs a shortlist of 500 for recall 0.95 (2.2 ms
a query), the 64-d one 175 (1.1 ms) for 1.4 GiB more memory; the default 16-d index would add about 3 GB at
12M rows for ``dims=[16, ...]`` funnels this run does not use.
Held-out queries: ``mrl_like(q, 2048, noise=1.0, seed=0, sample=1)``; their exact top 10 (cosine, float32 over
the float16 rows) is computed block by block while the rows are generated, so nothing is read twice. The
store is created with ``prefixes="raw"`` unless ``--fit``: fitting codes projects every row again, a second
pass over all bands. ``tune(recall=0.95)`` runs on the store's own rows, as a user's would.

Measured: build time and peak anonymous memory (the heap; the bands are page cache), tune time, anonymous
memory of a fresh process that opened and tuned the store, and per held-out query: cold (the store stays open
with its HNSW indexes and the bands it reads at open in memory; before the query the page cache is dropped and
the pages of the rows it leaves to disk, which ``drop_caches`` keeps while they are mapped, are reclaimed with
MADV_PAGEOUT), warm (the same query again) and bare (every page the store maps reclaimed first, a reboot's
first queries without the open's reads) latency of the default query and the recall of its hits; and the
disk's own cold random reads. Writes ``--out`` (default benchmarks/results/past_ram.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from cold_query import disk_read_bytes, disk_reads, drop_page_cache, evict_mapped, held_by_store
from compare import rss_anon_mib  # benchmarks/compare.py
from ingest import PeakAnon
from tqdm import tqdm

import mrlstore
from mrlstore.testing import mrl_like, mrl_like_blocks

ROOT = Path(__file__).resolve().parents[1]
DIM, K, BLOCK, ADD_ROWS = 2048, 10, 65536, 16384


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class TopK:
    """The exact top k rows of each query, merged block by block."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = unit(queries).T.copy(), k
        self.rows = np.empty((len(queries), 0), np.int64)
        self.scores = np.empty((len(queries), 0), np.float32)

    def add(self, first_row: int, block: np.ndarray) -> None:
        s = unit(block) @ self.q  # (rows, queries)
        top = np.argpartition(-s, self.k, axis=0)[: self.k].T  # (queries, k)
        scores = np.concatenate([self.scores, np.take_along_axis(s.T, top, axis=1)], axis=1)
        rows = np.concatenate([self.rows, top + first_row], axis=1)
        keep = np.argsort(-scores, axis=1)[:, : self.k]
        self.scores, self.rows = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)


def build(path: Path, n: int, queries: np.ndarray, args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    shutil.rmtree(path, ignore_errors=True)
    truth = TopK(queries, K)
    mem = PeakAnon()
    t0 = time.perf_counter()
    generate_s = 0.0
    prefixes = "auto" if args.fit else "raw"
    made = {"index_dims": args.index_dims, "ef_construction": args.ef_construction}
    with mrlstore.open(path, dim=DIM, dtype="float16", prefixes=prefixes, **made) as store:
        lo = 0
        blocks = mrl_like_blocks(n, DIM, noise=1.0, seed=0, block_rows=BLOCK)
        for block, labels in tqdm(blocks, total=-(-n // BLOCK), desc="build", unit="block"):
            for at in range(0, len(block), ADD_ROWS):  # a quarter block at a time: less transient memory
                g0 = time.perf_counter()
                part = block[at : at + ADD_ROWS].astype(np.float16)
                truth.add(lo, part)
                generate_s += time.perf_counter() - g0
                meta = pa.table({"label": pa.array(np.char.add("c", labels[at : at + ADD_ROWS].astype(str)))})
                store.add_vectors(part, ids=np.arange(lo, lo + len(part)).astype(str).tolist(), metadata=meta)
                lo += len(part)
            del block
        store.checkpoint()
    total = time.perf_counter() - t0
    return {"build_s": total - generate_s, "generate_s": generate_s, "build_peak_anon_mib": mem.stop()}, truth.rows


def measure(path: Path, queries: np.ndarray, truth: np.ndarray, cold: bool, bare_queries: int) -> dict:
    """In a process of its own (after the build's): the open store's memory is all this process holds."""
    t0 = time.perf_counter()
    store = mrlstore.open(path)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = store.tune(recall=0.95)
    tune_s = time.perf_counter() - t0
    held = rss_anon_mib()
    read_at_open = held_by_store(path, store.info())
    cold_ms, warm_ms, bare_ms, hits, cold_faults, cold_kib = [], [], [], [], [], []
    for q in tqdm(queries, desc="queries", unit="query"):
        if cold:  # drop_caches leaves mapped pages: reclaim those of rows the store left to disk too
            evict_mapped(path, held=read_at_open)
            drop_page_cache()
        faults, read = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, disk_read_bytes()
        t0 = time.perf_counter()
        found = store.query(q, k=K)
        cold_ms.append((time.perf_counter() - t0) * 1e3)
        cold_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults)
        cold_kib.append((disk_read_bytes() - read) / 1024)
        t0 = time.perf_counter()
        store.query(q, k=K)
        warm_ms.append((time.perf_counter() - t0) * 1e3)
        hits.append([int(i) for i in found.ids])
    for q in tqdm(queries[:bare_queries] if cold else [], desc="bare", unit="query"):  # seconds each at 12M
        evict_mapped(path)  # every page, also of the bands the store holds in memory
        drop_page_cache()
        t0 = time.perf_counter()
        store.query(q, k=K)
        bare_ms.append((time.perf_counter() - t0) * 1e3)
    info = store.info()
    store.close()
    disk = disk_reads(path) if cold else {}
    recall = float(np.mean([len(set(h) & set(t.tolist())) / K for h, t in zip(hits, truth)]))
    return {
        "open_s": open_s, "tune_s": tune_s, "held_anon_mib": held, "recall": recall,
        "cold_p50_ms": statistics.median(cold_ms) if cold else None, "warm_p50_ms": statistics.median(warm_ms),
        "bare_p50_ms": statistics.median(bare_ms) if cold else None,
        "cold_major_faults_p50": statistics.median(cold_faults), "cold_read_kib_p50": statistics.median(cold_kib),
        "tuned": {key: tuned[key] for key in ("dims", "shortlist", "prefixes") if key in tuned},
        "tune_exact_s": tuned["exact_ms_per_query"] * tuned["sample"] / 1e3,
        "prefixes": info["prefixes"], **disk,
    }  # fmt: skip


def du_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12_000_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "past_ram")
    ap.add_argument("--fit", action="store_true", help="let tune fit codes (a second pass over every row)")
    ap.add_argument("--index-dims", type=int, nargs="+", default=[64], help="prefixes with an HNSW index")
    ap.add_argument("--ef-construction", type=int, help="HNSW ef_construction of every index (default: the store's)")
    ap.add_argument("--bare-queries", type=int, default=20, help="queries timed with nothing in memory")
    ap.add_argument("--skip-build", action="store_true", help="measure the store and truth already in --work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "past_ram.md")
    args = ap.parse_args()
    path = args.work / "store"
    args.work.mkdir(parents=True, exist_ok=True)
    queries, _ = mrl_like(args.queries, DIM, noise=1.0, seed=0, sample=1)
    if not args.skip_build:
        built, truth = build(path, args.n, queries, args)
        np.save(args.work / "truth.npy", truth)
        (args.work / "build.json").write_text(json.dumps(built))
        subprocess.run([sys.executable, *sys.argv, "--skip-build"], check=True)  # measured in a fresh process
        return
    built = json.loads((args.work / "build.json").read_text())
    truth = np.load(args.work / "truth.npy")
    cold = os.geteuid() == 0
    measured = measure(path, queries, truth, cold, args.bare_queries)
    result = {**built, **measured, "disk_gib": du_gib(path), "n": args.n}
    print(json.dumps(result, indent=1))
    report(args, result)


def report(args: argparse.Namespace, r: dict) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cold = f"{r['cold_p50_ms']:.2f} ms" if r["cold_p50_ms"] is not None else "not measured (needs root)"
    lines = [
        f"# A store past RAM: {r['n']:,} x {DIM} float16",
        "",
        f"`python benchmarks/past_ram.py --n {r['n']} --queries {args.queries}"
        f"{' --fit' if args.fit else ''} --index-dims {' '.join(map(str, args.index_dims))}"
        f"{f' --ef-construction {args.ef_construction}' if args.ef_construction else ''} --work {args.work}`"
        f" on {platform.machine()}, {os.cpu_count()} cores, "
        f"{ram:.1f} GiB RAM, {time.strftime('%Y-%m-%d')}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| store on disk | {r['disk_gib']:.1f} GiB ({r['disk_gib'] / ram:.2f}x RAM) |",
        f"| build (adds, indexes, catalog; generation excluded) | {r['build_s']:.0f} s "
        f"({r['n'] / r['build_s']:,.0f} rows/s; generation {r['generate_s']:.0f} s) |",
        f"| peak anonymous memory while building | {r['build_peak_anon_mib'] / 1024:.2f} GiB |",
        f"| open | {r['open_s']:.1f} s |",
        f"| tune(recall=0.95) | {r['tune_s']:.0f} s (its exact reference search: {r['tune_exact_s']:.0f} s): "
        f"{r['tuned']} |",
        f"| anonymous memory of the process holding the open, tuned store | {r['held_anon_mib'] / 1024:.2f} GiB |",
        f"| default query recall@10 on {args.queries} held-out queries | {r['recall']:.3f} |",
        f"| default query p50, warm | {r['warm_p50_ms']:.2f} ms |",
        f"| default query p50, cold (page cache dropped; pages of rows left to disk reclaimed) | {cold} |",
    ]
    if r.get("cold_read_kib_p50") is not None and r["cold_p50_ms"] is not None:
        lines.append(
            f"| a cold query's disk reads, p50 (major page faults; KiB read from disk, any thread) | "
            f"{r['cold_major_faults_p50']:.0f} faults; {r['cold_read_kib_p50']:.0f} KiB |"
        )
    if r.get("bare_p50_ms") is not None:
        bare = f"{r['bare_p50_ms']:.2f} ms"
        lines.append(
            f"| default query p50, nothing in memory (every mapped page reclaimed; first {args.bare_queries} "
            f"queries) | {bare} |"
        )
    if "read_p50_ms" in r:
        lines += [
            f"| the disk, cold: one random 4 KiB read of a band file, p50 | {r['read_p50_ms']:.3f} ms |",
            f"| the disk, cold: {r['parallel_reads']} random 4 KiB reads from {r['parallel_threads']} threads | "
            f"{r['parallel_round_ms']:.1f} ms |",
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
