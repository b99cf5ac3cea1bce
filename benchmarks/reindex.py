"""A store whose short prefixes shortlist poorly, indexed again in place: the default store (16- and 32-d
indexes) built from compare.py's data, then ``store.set_index_dims((32, 128))`` and ``tune``, measured as
compare.py measures its systems (the default query with its metadata, one at a time, on the held-out queries,
against exact search). Compare with ``compare.py --systems mrlstore-wide``, which builds the same indexes at
creation.

    python benchmarks/reindex.py --data /work/benchdata/gentle/data_gentle1000000
    python benchmarks/reindex.py --data DIR --tune-first     # also the default store's own tune (may fail)

DIR holds compare.py's base.npy, queries.npy and truth.npy (``compare.py --data gentle1000000`` makes them).
The store is written to DIR/../reindex_store and left there.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from compare import K, PeakMemory, add_rows, measure, rss_anon_mib  # benchmarks/compare.py

import mrlstore


def build(path: Path, base: np.ndarray) -> float:
    """The default store of ``base`` at ``path`` (as compare.py builds it: ids, one label column)."""
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    with mrlstore.open(path, dim=base.shape[1]) as store:
        add_rows(store, base, np.arange(len(base)) % 100)  # compare.py's labels for data without classes
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--to", default="32,128", help="the prefixes indexed after (comma-separated)")
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--tune-first", action="store_true", help="tune the default store first (at 1M: it fails)")
    args = ap.parse_args()
    base = np.load(args.data / "base.npy", mmap_mode="r")
    queries, truth = np.load(args.data / "queries.npy"), np.load(args.data / "truth.npy")
    path = args.data.parent / "reindex_store"
    to = tuple(int(d) for d in args.to.split(","))
    lines = [f"{len(base):,} x {base.shape[1]} from {args.data}"]
    lines.append(f"default store built (16- and 32-d indexes): {build(path, base):.0f} s")
    with mrlstore.open(path) as store:
        if args.tune_first:
            t0 = time.perf_counter()
            try:
                first = store.tune(recall=0.95, k=K)
                lines.append(f"default tune: {first['dims']} shortlist {first['shortlist']}")
            except mrlstore.TuningError as e:
                lines.append(f"default tune failed: {e}")
            lines.append(f"default tune took {time.perf_counter() - t0:.0f} s")
        mem = PeakMemory()
        t0 = time.perf_counter()
        store.set_index_dims(to)
        lines.append(
            f"set_index_dims({to}): {time.perf_counter() - t0:.0f} s, peak anonymous memory +{mem.stop():.0f} MiB, "
            f"indexes {store.index_status}"
        )
        t0 = time.perf_counter()
        tuned = store.tune(recall=0.95, k=K)
        lines.append(
            f"tune: {time.perf_counter() - t0:.0f} s, {tuned['dims']} shortlist {tuned['shortlist']} "
            f"({tuned['prefixes']} prefixes)"
        )

        def single(q):
            hits = store.query(q, k=K)
            _ = hits.metadata  # as compare.py: the caller reads the hits' metadata
            return [int(i) for i in hits.ids]

        def batch(qs):
            return [[int(i) for i in h.ids] for h in store.query(qs, k=K)]

        row = measure("default query(v)", single, batch, queries, truth, args.latency_queries)
        lines.append(
            f"default query: recall {row['recall']:.3f}, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
            f"{row['qps']:.0f} q/s batched; anonymous memory of this process {rss_anon_mib():.0f} MiB"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
