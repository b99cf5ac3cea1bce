"""Queries against a cold page cache: the store's rows on disk, not in memory (a store larger than memory,
or the first queries after a reboot), in three modes in the same run, against hnswlib's in-memory
full-dimension HNSW: as before issue 25 (the kernel's read-around on every fault, one fault at a time),
without read-around (MADV_RANDOM), and without it plus the parallel page-in of a stage's rows.

    sudo python benchmarks/cold_query.py --work /tmp/cmpwork     # compare.py's 100k data and tuned store

Needs root (``echo 1 > /proc/sys/vm/drop_caches``). Per query: close the store, drop the page cache, open it
again (its rows mapped but not read: the open-time prefault, which reads stores below a quarter of RAM, is
turned off here as for a larger store), then time one ``query`` (cold) and the same query again (warm).
hnswlib (M=16, ef_construction=200, as compare.py) is built once, in memory, and timed at the ef whose
recall first reaches the store's.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import mrlstore
from mrlstore import kernels
from mrlstore.tiers import bands


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages of a range (file pages leave the page cache)


def evict_mapped(under: Path, only_random: bool = False) -> int:
    """Reclaim the pages this process maps from files under ``under``: ``drop_caches`` leaves pages that are
    mapped into a process, so an open store's rows read once would stay in memory. ``only_random``: only
    maps advised random access (``rr`` in /proc/self/smaps), the rows a store leaves to disk rather than
    reading them at open. Returns bytes advised."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prefix, advised, span = str(under.resolve()), 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
            span = fields[0] if len(fields) == 6 and fields[5].startswith(prefix) else None
        elif span and line.startswith("VmFlags:") and (" rr" in line or not only_random):
            start, end = (int(x, 16) for x in span.split("-"))
            if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
                advised += end - start
    return advised


def disk_reads(store: Path, reads: int = 256, threads: int = 16, seed: int = 0) -> dict:
    """The disk under a store, cold: p50 of single random 4 KiB reads of its widest band's chunk files one
    after another, and the time of ``reads`` such reads from ``threads`` threads (one round of parallel I/O)."""
    files = sorted((store / "vectors").glob("band_*"))[-1].glob("c/*/0")
    sizes = [(f, f.stat().st_size) for f in files if f.stat().st_size > 1 << 20]
    rng = np.random.default_rng(seed)
    picks = [
        (sizes[i][0], int(rng.integers(0, sizes[i][1] // 4096)) * 4096) for i in rng.integers(0, len(sizes), reads)
    ]
    fds = {f: os.open(f, os.O_RDONLY) for f, _ in sizes}
    try:
        evict_mapped(store)
        drop_page_cache()
        single = []
        for f, at in picks[: reads // 2]:
            t0 = time.perf_counter()
            os.pread(fds[f], 4096, at)
            single.append((time.perf_counter() - t0) * 1e3)
        drop_page_cache()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: os.pread(fds[p[0]], 4096, p[1]), picks))
        round_ms = (time.perf_counter() - t0) * 1e3
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"read_p50_ms": statistics.median(single), "parallel_reads": reads, "parallel_threads": threads,
            "parallel_round_ms": round_ms}  # fmt: skip


def recall(found: list[list[str]], truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len({int(i) for i in f} & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def cold_and_warm(
    store_path: Path, queries: np.ndarray, dims: list[int] | None
) -> tuple[list[float], list[float], list[list[str]]]:
    cold, warm, found = [], [], []
    for q in queries:
        drop_page_cache()
        with mrlstore.open(store_path, read_only=True) as store:
            t0 = time.perf_counter()
            hits = store.query(q, dims=dims)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.query(q, dims=dims)
            warm.append(time.perf_counter() - t0)
            found.append(hits.ids)
    return cold, warm, found


def hnswlib_p50(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, target: float) -> tuple[int, float, float]:
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=16, ef_construction=200)
    index.add_items(base, np.arange(len(base)))
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        index.set_ef(ef)
        labels = [index.knn_query(q, k=10)[0][0] for q in queries]
        got = recall([[str(x) for x in lab] for lab in labels], truth)
        if got >= target:
            break
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.knn_query(q, k=10)
        times.append(time.perf_counter() - t0)
    return ef, got, 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmpwork"), help="compare.py's --work folder")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--no-hnswlib", action="store_true")
    args = ap.parse_args()
    data = args.work / "data_100000"
    store_path = args.work / "mrlstore_store"
    queries = np.load(data / "queries.npy")[: args.queries]
    truth = np.load(data / "truth.npy")[: args.queries]
    bands._resident_budget = lambda: 0  # as for a store past a quarter of RAM: nothing read at open
    opened = bands.BandedVectors.__init__
    results = {}
    modes = (("before: read-around, faults one by one", False, 0), ("no read-around", True, 0),
             ("no read-around + parallel page-in", True, kernels.COLD_READ_THREADS))  # fmt: skip
    for label, random_access, threads in modes:
        kernels.COLD_READ_THREADS = threads

        def init(self, *a, _random=random_access, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
            opened(self, *a, **kw)
            for band in self.arrays:
                band.random_from_row = 0 if _random else 1 << 62

        bands.BandedVectors.__init__ = init
        for dims in (None, [16, 2048]):
            cold, warm, found = cold_and_warm(store_path, queries, dims)
            name = f"{label}, {'default' if dims is None else dims}"
            results[name] = (1e3 * statistics.median(cold), 1e3 * statistics.median(warm), recall(found, truth))
            print(f"{name}: cold p50 {results[name][0]:.3f} ms, warm p50 {results[name][1]:.3f} ms, "
                  f"recall@10 {results[name][2]:.3f}", flush=True)  # fmt: skip
    if not args.no_hnswlib:
        now = f"{modes[-1][0]}, default"
        target = results[now][2]
        base = np.load(data / "base.npy")
        ef, got, p50 = hnswlib_p50(base, queries, truth, target)
        print(f"hnswlib 2048-d in memory, ef={ef}: p50 {p50:.3f} ms, recall@10 {got:.3f}")
        cold = results[now][0]
        print(
            f"cold default p50 / hnswlib in-memory p50 at equal or better recall: {cold:.3f} / {p50:.3f} = "
            f"{cold / p50:.2f}"
        )


if __name__ == "__main__":
    main()
