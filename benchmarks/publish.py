"""What readers beside a live writer cost: the time to publish a version (copy the catalog), a reader's open,
and a reader's refresh after the writer added a batch, on an existing store.

    python benchmarks/publish.py --store /path/to/store.mrl [--add 1000]
    python benchmarks/publish.py --ingest /path/to/base.npy [--batch 10000]    # what publishing costs an ingest

Adds ``--add`` rows (random vectors, ids ``publish-bench-<run>-<i>``) to the store, so use a copy you can
change. Each figure is the median of 5 runs. ``--ingest`` builds a new store from the vectors of a .npy file
(``add_vectors`` in batches of ``--batch``) three times each way, in child processes: with no reader open
(the writer publishes nothing), and with a reader registered for the whole ingest (the writer publishes on
its schedule).
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


def ingest(npy: Path, batch: int, with_reader: bool) -> float:
    import shutil
    import tempfile

    from mrlstore.upkeep.versions import ReaderPresence

    base = np.load(npy, mmap_mode="r")
    path = Path(tempfile.mkdtemp(prefix="mrlstore-ingest-")) / "s.mrl"
    t0 = time.perf_counter()
    with mrlstore.open(path, dim=base.shape[1]) as store:
        reader = ReaderPresence(path) if with_reader else None  # what an open reader process holds
        for lo in range(0, len(base), batch):
            hi = min(lo + batch, len(base))
            store.add_vectors(np.asarray(base[lo:hi]), ids=[str(i) for i in range(lo, hi)])
    seconds = time.perf_counter() - t0
    if reader is not None:
        reader.release()
    shutil.rmtree(path.parent)
    return seconds


def compare_ingest(npy: Path, batch: int) -> None:
    import subprocess
    import sys

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for mode in (True, False):
            code = f"import publish; print(publish.ingest(publish.Path({str(npy)!r}), {batch}, {mode}))"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).parent)  # fmt: skip
            times[mode].append(float(out.stdout.split()[-1]))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"ingest of {npy} in batches of {batch:,}: {off:.2f} s with no reader open, {on:.2f} s with a reader "
          f"open, publishing ({(on / off - 1) * 100:+.0f}%); runs {times}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path)
    ap.add_argument("--add", type=int, default=1000)
    ap.add_argument("--ingest", type=Path)
    ap.add_argument("--batch", type=int, default=10_000)
    args = ap.parse_args()
    if args.ingest:
        compare_ingest(args.ingest, args.batch)
        return
    run = uuid.uuid4().hex[:8]
    with mrlstore.open(args.store) as writer:
        rows = len(writer)
        publish = statistics.median(timed(lambda: writer._versions.publish_version(writer._state)) for _ in range(5))
        catalog_mib = (args.store / "catalog.duckdb").stat().st_size / 2**20
        opens, refreshes = [], []
        for r in range(5):
            t0 = time.perf_counter()
            reader = mrlstore.open(args.store, read_only=True)
            opens.append(time.perf_counter() - t0)
            vectors = np.random.default_rng(r).standard_normal((args.add, writer.dim)).astype(np.float32)
            writer.add_vectors(vectors, ids=[f"publish-bench-{run}-{r}-{i}" for i in range(args.add)])
            writer._versions.close()  # publish now rather than within the interval
            writer._versions.start_publishing(writer._state)
            refreshes.append(timed(reader.refresh))
            assert len(reader) == len(writer)
            reader.close()
    print(f"store: {rows:,} rows, catalog {catalog_mib:.0f} MiB")
    print(f"publish (copy the catalog, rename, HEAD): {publish * 1000:.0f} ms")
    print(f"reader open: {statistics.median(opens) * 1000:.0f} ms")
    print(f"reader refresh after {args.add:,} added rows: {statistics.median(refreshes) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
