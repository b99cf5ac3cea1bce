"""An exact scan of rows that are not in memory: the store's range scan (it asks the kernel to read its next
window ahead, MADV_WILLNEED, while it scores this one) against the same rows handed over as a row list (read as
they come: every map advises random access, so one 4 KiB fault after another), in the same run.

    sudo python benchmarks/cold_scan.py --store /work/benchdata/pastram64/store --rows 262144 --queries 100
    sudo python benchmarks/cold_scan.py --store /tmp/cmpwork/mrlstore --rows 100000 --queries 1

The page cache is dropped (root) before each cold scan. A batch of ``--queries`` queries is one pass over the
rows, as tune's exact reference search makes (a single query: the fused one-query loop). The scan covers the
first ``--rows`` rows at the full dimension, the widest band included: what tune reads at 12M rows.
Printed per mode: seconds, major page faults and MiB read from disk (this process, any thread).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

import numpy as np
from cold_query import disk_read_bytes, drop_page_cache

import mrlstore
from mrlstore import kernels
from mrlstore.tiers.bands import BandedVectors


def timed_scan(layout: BandedVectors, queries: np.ndarray, rows: int, as_list: bool, cold: bool) -> dict:
    """One scan through ``layout``, a fresh map of the bands (``drop_caches`` keeps pages that are mapped)."""
    if cold:
        gc.collect()  # the maps of earlier layouts go with them
        drop_page_cache()
    faults, read = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, disk_read_bytes()
    dim = queries.shape[1]
    t0 = time.perf_counter()
    if as_list:
        kernels.scan(layout, queries, dim, 10, "cosine", rows=np.arange(rows, dtype=np.int64))
    else:
        kernels.scan(layout, queries, dim, 10, "cosine", stop=rows)
    return {
        "s": time.perf_counter() - t0,
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
        "read_mib": (disk_read_bytes() - read) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    with mrlstore.open(args.store, read_only=True) as store:
        info = store.info()
        rows = min(args.rows, info["rows"])
    fresh = lambda: BandedVectors(args.store, info["dim"], tuple(info["bands"]), info["dtype"])  # noqa: E731
    layout = fresh()
    queries = layout.read_range(rows // 2, rows // 2 + args.queries, 0, info["dim"])  # rows as queries
    print(f"{rows:,} rows x {info['dim']} {info['dtype']}, {args.queries} queries, kernels native: {kernels.NATIVE}")
    for label, as_list, cold in (
        ("cold, range scan (reads ahead)", False, True),
        ("cold, row list (faults one by one)", True, True),
        ("warm, range scan", False, False),
    ):
        if cold:
            layout.close()
            layout = fresh()
        r = timed_scan(layout, queries, rows, as_list, cold)
        print(f"{label}: {r['s']:.2f} s, {r['major_faults']:,} major faults, {r['read_mib']:,.0f} MiB read")
    layout.close()


if __name__ == "__main__":
    main()
