"""What readers beside a live writer cost: the time to publish a version (copy the catalog), a reader's open,
and a reader's refresh after the writer added a batch, on an existing store.

    python benchmarks/publish.py --store /path/to/store.mrl [--add 1000]

Adds ``--add`` rows (random vectors, ids ``publish-bench-<run>-<i>``) to the store, so use a copy you can
change. Each figure is the median of 5 runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

import numpy as np

import mrlstore


def timed(call) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--add", type=int, default=1000)
    args = ap.parse_args()
    run = uuid.uuid4().hex[:8]
    with mrlstore.open(args.store) as writer:
        rows = len(writer)
        publish = statistics.median(timed(writer._publish_version) for _ in range(5))
        catalog_mib = (args.store / "catalog.duckdb").stat().st_size / 2**20
        opens, refreshes = [], []
        for r in range(5):
            t0 = time.perf_counter()
            reader = mrlstore.open(args.store, read_only=True)
            opens.append(time.perf_counter() - t0)
            vectors = np.random.default_rng(r).standard_normal((args.add, writer.dim)).astype(np.float32)
            writer.add_vectors(vectors, ids=[f"publish-bench-{run}-{r}-{i}" for i in range(args.add)])
            writer._publisher.close()  # publish now rather than within the interval
            writer._start_publishing()
            refreshes.append(timed(reader.refresh))
            assert len(reader) == len(writer)
            reader.close()
    print(f"store: {rows:,} rows, catalog {catalog_mib:.0f} MiB")
    print(f"publish (copy the catalog, rename, HEAD): {publish * 1000:.0f} ms")
    print(f"reader open: {statistics.median(opens) * 1000:.0f} ms")
    print(f"reader refresh after {args.add:,} added rows: {statistics.median(refreshes) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
