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
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import mrlstore
from mrlstore import kernels
from mrlstore.tiers import bands


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


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
    bands._prefault_budget = lambda row_bytes: 0  # as for a store past a quarter of RAM: nothing read at open
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
