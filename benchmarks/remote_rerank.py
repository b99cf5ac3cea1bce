"""Warm queries on a store read from object storage against the same store on local disk, in one process:
the default query's p50 once every row it needs is cached, with the near bands' re-ranks in the native
kernels (what a reader does) and, in alternating rounds, through the numpy twins (what it did before).

    python benchmarks/remote_rerank.py STORE                 # STORE: a tuned local store (compare.py's)
    python benchmarks/remote_rerank.py STORE --queries 200 --rounds 5

Queries are the store's own rows (every 997th). The store is published to a moto server on 127.0.0.1. Each
round times every query once per setting, in turns, and the p50 of each setting over all rounds is printed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import objectstore  # benchmarks/objectstore.py: the moto server

import mrlstore


def timings(store: mrlstore.Store, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        store.query(q, k=10)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    proc, host = objectstore.start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="mrl-rerank-"))
    try:
        url, options = objectstore.bench_url(host)
        with mrlstore.open(args.store, read_only=True) as source:
            source.snapshot(tmp / "store")  # a copy: the store may be open elsewhere
            rows = np.arange(0, len(source), 997)[: args.queries]
            queries = np.array(source.get([str(i) for i in rows]).column("vector").to_pylist(), dtype=np.float32)
        with mrlstore.open(tmp / "store") as local:
            local.publish(url, storage_options=options)
        settings = {}
        with (
            mrlstore.open(tmp / "store", read_only=True) as local,
            mrlstore.open(url, read_only=True, storage_options=options, cache_dir=tmp / "cache") as remote,
        ):
            bands = remote._state.vectors  # the RemoteBands tier (a benchmark may look inside)
            native_dims = bands.native_dims
            print(f"{len(queries)} queries; tuned {local.info().tuned['dims']}; near bands up to {native_dims}")
            timings(remote, queries)  # every row the queries need, into the row cache
            timings(local, queries)
            for _ in range(args.rounds):
                settings.setdefault("local disk", []).extend(timings(local, queries))
                bands.native_dims = native_dims
                settings.setdefault("remote, near bands native", []).extend(timings(remote, queries))
                bands.native_dims = 0
                settings.setdefault("remote, numpy twins only", []).extend(timings(remote, queries))
        local_p50 = statistics.median(settings["local disk"])
        for name, times in settings.items():
            p50 = statistics.median(times)
            print(f"{name}: p50 {p50:.3f} ms ({p50 / local_p50:.2f}x local disk), {len(times)} queries timed")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
