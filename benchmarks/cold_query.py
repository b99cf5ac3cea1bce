"""Queries against a cold page cache, against hnswlib's in-memory full-dimension HNSW at equal recall.

Two protocols, in the same run:

- ``open`` (issue 25's): the store opened once as users open it, the page cache dropped before each query.
  A store below a quarter of RAM reads its rows at open and keeps them mapped, and ``drop_caches`` leaves
  mapped pages, so its rows stay in memory as hnswlib's index does; the run prints how much stayed.
- reopened before each query with nothing read at open (as for a store past a quarter of RAM, or the first
  query after a reboot), in three modes: as before issue 25 (the kernel's read-around on every fault, one
  fault at a time: ``before``), without read-around (MADV_RANDOM: ``random``), and without it plus the
  parallel page-in of a stage's rows (``parallel``). Each times one ``query`` (cold), then the same again.

    sudo python benchmarks/cold_query.py --work /tmp/cmpwork                  # compare.py's 100k store
    sudo python benchmarks/cold_query.py --work W --data 1000000 --modes open parallel

Needs root (``echo 1 > /proc/sys/vm/drop_caches``) and the store compare.py's mrlstore system left in
``--work`` for ``--data``. hnswlib (M=16, ef_construction=200, as compare.py) is loaded from where
``compare.py --keep-hnsw`` kept it (else built here), and timed at the ef whose recall first reaches the
store's in the first protocol run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
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


def store_maps(under: Path) -> Iterator[tuple[int, int, dict[str, str]]]:
    """This process's maps of files under ``under``: start, end and their /proc/self/smaps fields."""
    prefix, span, fields = str(under.resolve()), None, {}
    for line in [*Path("/proc/self/smaps").read_text().splitlines(), "0-0 end"]:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            if span:
                yield span[0], span[1], fields
            inside = len(head) == 6 and head[5].startswith(prefix)
            span, fields = (tuple(int(x, 16) for x in head[0].split("-")) if inside else None), {}
        elif span and ":" in line:
            name, value = line.split(":", 1)
            fields[name] = value.strip()


def evict_mapped(under: Path, only_random: bool = False) -> int:
    """Reclaim the pages this process maps from files under ``under``: ``drop_caches`` leaves pages that are
    mapped into a process, so an open store's rows read once would stay in memory. ``only_random``: only
    maps advised random access (``rr`` in /proc/self/smaps), the rows a store leaves to disk rather than
    reading them at open. Returns bytes advised."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end, fields in store_maps(under):
        if " rr" in f" {fields.get('VmFlags', '')}" or not only_random:
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


def open_store_cold(
    store_path: Path, queries: np.ndarray, dims: list[int] | None
) -> tuple[list[float], list[list[str]], int]:
    """The issue's protocol on a store opened once as users do (rows read at open below a quarter of RAM):
    the page cache dropped before each query. Returns the times, the hits, and what of the store's files
    stayed in memory after the first drop (mapped by the open store: ``drop_caches`` leaves those)."""
    times, found = [], []
    with mrlstore.open(store_path, read_only=True) as store:
        store.query(queries[0], dims=dims)
        drop_page_cache()
        resident = mapped_resident_bytes(store_path)
        for q in queries:
            drop_page_cache()
            t0 = time.perf_counter()
            hits = store.query(q, dims=dims)
            times.append(time.perf_counter() - t0)
            found.append(hits.ids)
    return times, found, resident


def mapped_resident_bytes(under: Path) -> int:
    """Bytes of this process's maps of files under ``under`` that are in memory (``Rss`` in smaps)."""
    return sum(int(fields.get("Rss", "0 kB").split()[0]) * 1024 for _, _, fields in store_maps(under))


def hnswlib_index(base: np.ndarray, saved: Path):  # noqa: ANN201 - hnswlib ships no types
    """compare.py's full-dimension HNSW (M=16, ef_construction=200): loaded where ``compare.py --keep-hnsw``
    kept it, else built here."""
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    if saved.exists():
        index.load_index(str(saved), max_elements=len(base))
        return index
    index.init_index(max_elements=len(base), M=16, ef_construction=200)
    index.add_items(base, np.arange(len(base)))
    return index


def hnswlib_p50(index, queries: np.ndarray, truth: np.ndarray, target: float) -> tuple[int, float, float]:  # noqa: ANN001
    """The first ef whose recall reaches ``target``, its recall and p50 (page cache dropped before each query,
    as for the store: hnswlib holds everything in its own memory, so that changes nothing)."""
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        index.set_ef(ef)
        labels = [index.knn_query(q, k=10)[0][0] for q in queries]
        got = recall([[str(x) for x in lab] for lab in labels], truth)
        if got >= target:
            break
    times = []
    for q in queries:
        drop_page_cache()
        t0 = time.perf_counter()
        index.knn_query(q, k=10)
        times.append(time.perf_counter() - t0)
    return ef, got, 1e3 * statistics.median(times)


MODES = ("open", "before", "random", "parallel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmpwork"), help="compare.py's --work folder")
    ap.add_argument("--data", default="100000", help="compare.py's data set, whose store compare.py left in --work")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--no-hnswlib", action="store_true")
    args = ap.parse_args()
    data = args.work / f"data_{args.data}"
    store_path = args.work / "mrlstore_store"
    queries = np.load(data / "queries.npy")[: args.queries]
    truth = np.load(data / "truth.npy")[: args.queries]
    with mrlstore.open(store_path, read_only=True) as store:
        if len(store) != len(np.load(data / "base.npy", mmap_mode="r")):
            raise SystemExit(f"{store_path} does not hold data_{args.data}: run compare.py --data {args.data} first")
    results = {}
    if "open" in args.modes:
        for dims in (None, [16, 2048]):
            times, found, resident = open_store_cold(store_path, queries, dims)
            name = f"store open, page cache dropped before each query, {'default' if dims is None else dims}"
            results[name] = (1e3 * statistics.median(times), float("nan"), recall(found, truth))
            print(f"{name}: cold p50 {results[name][0]:.3f} ms, recall@10 {results[name][2]:.3f}; "
                  f"{resident / 2**30:.2f} GiB of the store's files stayed mapped in memory", flush=True)  # fmt: skip
    harsh(args, store_path, queries, truth, results)
    if not args.no_hnswlib:
        now = next(iter(results))
        target = results[now][2]
        base = np.load(data / "base.npy", mmap_mode="r")
        ef, got, p50 = hnswlib_p50(hnswlib_index(base, data / "hnswlib.hnsw"), queries, truth, target)
        print(f"hnswlib 2048-d in memory, ef={ef}: p50 {p50:.3f} ms, recall@10 {got:.3f}")
        for name, (cold, _, _) in results.items():
            if "default" in name:
                print(f"{name}: cold p50 / hnswlib in-memory p50 at equal or better recall: {cold:.3f} / {p50:.3f} = "
                      f"{cold / p50:.2f}")  # fmt: skip


def harsh(args: argparse.Namespace, store_path: Path, queries: np.ndarray, truth: np.ndarray, results: dict) -> None:
    """Reopened before each query with nothing read at open, as for a store past a quarter of RAM."""
    bands._resident_budget = lambda: 0  # as for a store past a quarter of RAM: nothing read at open
    opened = bands.BandedVectors.__init__
    modes = (("before", "before: read-around, faults one by one", False, 0), ("random", "no read-around", True, 0),
             ("parallel", "no read-around + parallel page-in", True, kernels.COLD_READ_THREADS))  # fmt: skip
    for key, label, random_access, threads in modes:
        if key not in args.modes:
            continue
        kernels.COLD_READ_THREADS = threads

        def init(self, *a, _random=random_access, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
            opened(self, *a, **kw)
            for band in self.arrays:
                band.random_from_row = 0 if _random else 1 << 62

        bands.BandedVectors.__init__ = init
        for dims in (None, [16, 2048]):
            cold, warm, found = cold_and_warm(store_path, queries, dims)
            name = f"reopened, {label}, {'default' if dims is None else dims}"
            results[name] = (1e3 * statistics.median(cold), 1e3 * statistics.median(warm), recall(found, truth))
            print(f"{name}: cold p50 {results[name][0]:.3f} ms, warm p50 {results[name][1]:.3f} ms, "
                  f"recall@10 {results[name][2]:.3f}", flush=True)  # fmt: skip
    bands.BandedVectors.__init__ = opened


if __name__ == "__main__":
    main()
