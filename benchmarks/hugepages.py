"""HNSW search with the graph on 4 KiB pages against transparent huge pages, and the index's load time
against hnswlib's own ``load_index`` (mrlstore.tiers.hnsw, mrlstore._hugepages).

    python benchmarks/hugepages.py --n 4000000 --work /path/with/3GB     # about 4 minutes of build on 2 cores
    python benchmarks/hugepages.py --n 100000 --work /tmp/hp             # a quick check of the script

One index over ``--dim`` numbers of ``mrl_like_blocks(n, dim, noise=1.0)`` rows (M=16, ef_construction 80),
built once and saved in ``--work``. Each measurement is a fresh process that loads the saved index (as a
store's open does) and times ``--queries`` held-out queries, one at a time on one thread, with a beam and
shortlist of ``--ef``: with huge pages off (the library's madvise calls disabled) or on (it waits for the
background collapse first), alternating, ``--rounds`` times each. Another process times hnswlib's own
``load_index`` of the same file. Writes ``--out`` (default benchmarks/results/hugepages.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mrlstore import _hugepages
from mrlstore.testing import mrl_like, mrl_like_blocks
from mrlstore.tiers.hnsw import PrefixIndex

ROOT = Path(__file__).resolve().parents[1]
M, EF_CONSTRUCTION = 16, 80


def build(n: int, dim: int, base: Path) -> float:
    index = PrefixIndex(dim, "cosine", M, EF_CONSTRUCTION, capacity=n)
    t0 = time.perf_counter()
    for rows, _ in mrl_like_blocks(n, dim, noise=1.0, seed=0):
        start = index.covered_rows
        index.add(rows, np.arange(start, start + len(rows)), covered_rows=start + len(rows))
        print(f"built {index.covered_rows:,} rows", flush=True)
    seconds = time.perf_counter() - t0
    index.save(base)
    return seconds


def anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def measure(base: Path, dim: int, mode: str, queries: int, ef: int) -> dict:
    """In this process: load the index (``mode`` off, on, or hnswlib's loader) and time the queries."""
    if mode == "off":
        _hugepages._libc = None  # large_anonymous_regions() then finds nothing to advise
    t0 = time.perf_counter()
    if mode == "hnswlib-load":
        import hnswlib

        reference = hnswlib.Index(space="cosine", dim=dim)
        reference.load_index(str(base.with_suffix(".hnsw")))
        return {"mode": mode, "load_s": time.perf_counter() - t0}
    side = json.loads(base.with_suffix(".json").read_text())
    index = PrefixIndex.load(base, dim, "cosine", M, EF_CONSTRUCTION, checked_digest=side["blake2b"])
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for thread in threading.enumerate():
        if thread.name == "mrlstore-hugepages":
            thread.join()
    collapse_wait_s = time.perf_counter() - t1
    q = mrl_like(queries, dim, noise=1.0, seed=0, sample=1)[0]
    index.search(q[:20], ef, ef)  # warm-up
    times = []
    for row in q:
        t = time.perf_counter()
        index.search(row, ef, ef)
        times.append(time.perf_counter() - t)
    return {
        "mode": mode,
        "load_s": load_s,
        "collapse_wait_s": collapse_wait_s,
        "anon_huge_mib": anon_huge_kib() / 1024,
        "p50_us": statistics.median(times) * 1e6,
        "mean_us": statistics.fmean(times) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--ef", type=int, default=175, help="beam and shortlist (past_ram.md's 12M tuned shortlist)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "hugepages")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hugepages.md")
    ap.add_argument("--measure", choices=["off", "on", "hnswlib-load"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    base = args.work / f"index_{args.n}_{args.dim}"
    if args.measure:
        print(json.dumps(measure(base, args.dim, args.measure, args.queries, args.ef)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    build_s = None if base.with_suffix(".json").exists() else build(args.n, args.dim, base)
    runs = []
    for mode in ["off", "on"] * args.rounds + ["hnswlib-load"]:
        cmd = [sys.executable, __file__, "--measure", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    write_report(args, build_s, runs, base.with_suffix(".hnsw").stat().st_size)


def write_report(args: argparse.Namespace, build_s: float | None, runs: list[dict], file_bytes: int) -> None:
    def p50s(mode: str) -> list[float]:
        return [r["p50_us"] for r in runs if r["mode"] == mode]

    off, on = statistics.median(p50s("off")), statistics.median(p50s("on"))
    loads = {mode: [r["load_s"] for r in runs if r["mode"] == mode] for mode in ("off", "on", "hnswlib-load")}
    lines = [
        f"# HNSW graph on huge pages, and its load ({args.n:,} x {args.dim}, M={M}, ef_construction {EF_CONSTRUCTION})",
        "",
        f"`python benchmarks/hugepages.py --n {args.n} --dim {args.dim} --queries {args.queries} --ef {args.ef} "
        f"--rounds {args.rounds}`; index file {file_bytes / 2**20:,.0f} MiB"
        + (f", built in {build_s:,.0f} s" if build_s is not None else " (built by an earlier run)")
        + f". Machine: {platform.machine()}, Python {platform.python_version()}, {platform.system()}.",
        "",
        f"- search p50, one query at a time, beam and shortlist {args.ef}: **{off:.0f} us on 4 KiB pages, "
        f"{on:.0f} us on huge pages ({on / off:.2f}x)**",
        f"- load: mrlstore {statistics.median(loads['off']):.2f} s (huge pages off), "
        f"{statistics.median(loads['on']):.2f} s (on; the collapse runs after it, in the background); "
        f"hnswlib's load_index {statistics.median(loads['hnswlib-load']):.2f} s",
        "",
        "| process | pages | load s | collapse wait s | AnonHugePages MiB | p50 us | mean us |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        if r["mode"] == "hnswlib-load":
            lines.append(f"| {i + 1} | hnswlib's load_index | {r['load_s']:.2f} | | | | |")
        else:
            lines.append(
                f"| {i + 1} | {'huge' if r['mode'] == 'on' else '4 KiB'} | {r['load_s']:.2f} | "
                f"{r['collapse_wait_s']:.2f} | {r['anon_huge_mib']:,.0f} | {r['p50_us']:.0f} | {r['mean_us']:.0f} |"
            )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
