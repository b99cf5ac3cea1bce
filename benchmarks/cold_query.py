"""Queries against a cold page cache, against hnswlib's in-memory full-dimension HNSW at equal recall.

Two protocols, in the same run:

- ``open`` (issue 25's): the store opened once as users open it, the page cache dropped before each query.
  A store below a quarter of RAM reads its rows at open and keeps them mapped, and ``drop_caches`` leaves
  mapped pages, so its rows stay in memory as hnswlib's index does; the run prints how much stayed.
- reopened before each query with nothing read at open (as for a store past a quarter of RAM, or the first
  query after a reboot), in three modes: as before issue 25 (the kernel's read-around on every fault, one
  fault at a time: ``before``), without read-around (MADV_RANDOM: ``random``), and without it plus the
  parallel page-in of a stage's rows (``parallel``). Each times one ``query`` (cold), then the same again.
- ``pause`` (a control for ``open``): the store opened once, a 50 ms sleep before each query instead of the
  drop, hnswlib likewise. No file is read in either (the ``open`` rows print the major faults and disk bytes
  per query), so what slows both is the CPU's caches going cold while the process waits, and a funnel runs
  more distinct code (Python, numpy, two HNSW searches) than one hnswlib call.

    sudo python benchmarks/cold_query.py --work /tmp/cmpwork                  # compare.py's 100k store
    sudo python benchmarks/cold_query.py --work W --data 1000000 --modes open parallel
    sudo python benchmarks/cold_query.py --work W --modes open pause      # the drop against a pause

Needs root (``echo 1 > /proc/sys/vm/drop_caches``) and the store compare.py's mrlstore system left in
``--work`` for ``--data``. hnswlib (M=16, ef_construction=200, as compare.py) is loaded from where
``compare.py --keep-hnsw`` kept it (else built here), and timed at the ef whose recall first reaches the
store's in the first protocol run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
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
PAGE = os.sysconf("SC_PAGE_SIZE")


def store_maps(under: Path) -> Iterator[tuple[int, int, Path, int, dict[str, str]]]:
    """This process's maps of files under ``under``: start, end, the file, the file offset of the start,
    and their /proc/self/smaps fields."""
    prefix, span, fields = str(under.resolve()), None, {}
    for line in [*Path("/proc/self/smaps").read_text().splitlines(), "0-0 end"]:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            if span:
                yield *span, fields
            inside = len(head) == 6 and head[5].startswith(prefix)
            start, end = (int(x, 16) for x in head[0].split("-"))
            span, fields = ((start, end, Path(head[5]), int(head[2], 16)) if inside else None), {}
        elif span and ":" in line:
            name, value = line.split(":", 1)
            fields[name] = value.strip()


def evict_mapped(under: Path, held: Callable[[Path], int] | None = None) -> int:
    """Reclaim the pages this process maps from files under ``under``: ``drop_caches`` leaves pages that are
    mapped into a process, so an open store's rows read once would stay in memory. ``held``: the bytes at
    the start of a file to leave in memory (the rows a store reads at open); the rest is reclaimed.
    Returns bytes advised."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end, path, offset, _ in store_maps(under):
        keep = 0 if held is None else held(path) - offset
        first = start + max(0, -(-keep // PAGE) * PAGE)
        if first < end and libc.madvise(first, end - first, MADV_PAGEOUT) == 0:
            advised += end - first
    return advised


def held_by_store(store: Path, info: dict) -> Callable[[Path], int]:
    """For ``evict_mapped``: the bytes of each chunk file the store at ``store`` (``info``: its
    ``Store.info()``) reads at open and keeps in memory."""
    layout = bands.BandedVectors(store, info["dim"], tuple(info["bands"]), info["dtype"])
    by_dir = {array.dir.resolve(): (array, rows) for array, rows in zip(layout.arrays, layout.held_rows)}
    layout.close()

    def held(path: Path) -> int:
        array, rows = by_dir[path.parent.parent.parent.resolve()]  # <array>/c/<chunk>/0
        chunk = int(path.parent.name)
        return array.data_offset + min(array.chunk_rows, max(0, rows - chunk * array.chunk_rows)) * array.row_bytes

    return held


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


def pause() -> None:
    time.sleep(0.05)


def disk_read_bytes() -> int:
    """Bytes this process has had read from disk (``read_bytes`` of /proc/self/io: page cache hits excluded)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"])


def open_store_cold(
    store_path: Path, queries: np.ndarray, dims: list[int] | None, before: Callable[[], None] = drop_page_cache
) -> tuple[list[float], list[list[str]], int, tuple[float, float]]:
    """The issue's protocol on a store opened once as users do (rows read at open below a quarter of RAM):
    the page cache dropped (or ``before`` run) before each query. Returns the times, the hits, what of the
    store's files stayed in memory after the first drop (mapped by the open store: ``drop_caches`` leaves
    those), and the mean major page faults and disk KiB per query."""
    times, found, faults, read = [], [], 0, 0
    with mrlstore.open(store_path, read_only=True) as store:
        store.query(queries[0], dims=dims)
        drop_page_cache()
        resident = mapped_resident_bytes(store_path)
        for q in queries:
            before()
            faults -= resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            read -= disk_read_bytes()
            t0 = time.perf_counter()
            hits = store.query(q, dims=dims)
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            read += disk_read_bytes()
            found.append(hits.ids)
    return times, found, resident, (faults / len(queries), read / 1024 / len(queries))


def mapped_resident_bytes(under: Path) -> int:
    """Bytes of this process's maps of files under ``under`` that are in memory (``Rss`` in smaps)."""
    return sum(int(fields.get("Rss", "0 kB").split()[0]) * 1024 for *_, fields in store_maps(under))


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


def hnswlib_p50(index, queries: np.ndarray, truth: np.ndarray, target: float, before: Callable[[], None]):  # noqa: ANN001, ANN201
    """The first ef whose recall reaches ``target``, its recall and p50 (``before`` run before each query, as
    for the store: hnswlib holds everything in its own memory, so a drop reads nothing)."""
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        index.set_ef(ef)
        labels = [index.knn_query(q, k=10)[0][0] for q in queries]
        got = recall([[str(x) for x in lab] for lab in labels], truth)
        if got >= target:
            break
    times = []
    for q in queries:
        before()
        t0 = time.perf_counter()
        index.knn_query(q, k=10)
        times.append(time.perf_counter() - t0)
    return ef, got, 1e3 * statistics.median(times)


MODES = ("open", "pause", "before", "random", "parallel")


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
    protocols = {"open": ("page cache dropped", drop_page_cache), "pause": ("a 50 ms pause", pause)}
    for mode, (label, before) in protocols.items():
        if mode not in args.modes:
            continue
        for dims in (None, [16, 2048]):
            times, found, resident, (faults, read) = open_store_cold(store_path, queries, dims, before)
            name = f"store open, {label} before each query, {'default' if dims is None else dims}"
            results[name] = (1e3 * statistics.median(times), float("nan"), recall(found, truth))
            print(f"{name}: p50 {results[name][0]:.3f} ms, recall@10 {results[name][2]:.3f}; per query "
                  f"{faults:.1f} major faults, {read:.1f} KiB read from disk; {resident / 2**30:.2f} GiB of the "
                  "store's files stayed mapped in memory", flush=True)  # fmt: skip
    harsh(args, store_path, queries, truth, results)
    if not args.no_hnswlib:
        hnswlib_rows(args, data, queries, truth, results)


def hnswlib_rows(args: argparse.Namespace, data: Path, queries: np.ndarray, truth: np.ndarray, results: dict) -> None:
    """hnswlib at the first ef whose recall reaches the store's first row, after a drop (and after a pause
    where the store was timed so); each default row of the store against it."""
    target = results[next(iter(results))][2]
    index = hnswlib_index(np.load(data / "base.npy", mmap_mode="r"), data / "hnswlib.hnsw")
    ef, got, dropped = hnswlib_p50(index, queries, truth, target, drop_page_cache)
    print(f"hnswlib 2048-d in memory, ef={ef}, page cache dropped before each query: p50 {dropped:.3f} ms, "
          f"recall@10 {got:.3f}")  # fmt: skip
    paused = float("nan")
    if "pause" in args.modes:
        paused = hnswlib_p50(index, queries, truth, target, pause)[2]
        print(f"hnswlib, a 50 ms pause before each query: p50 {paused:.3f} ms")
    for name, (cold, _, _) in results.items():
        if "default" in name:
            p50 = paused if "pause" in name else dropped
            print(f"{name}: p50 / hnswlib's at equal or better recall: {cold:.3f} / {p50:.3f} = {cold / p50:.2f}")


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
                band.random_access = _random

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
