"""How long a fresh reader takes to open a store on object storage (HEAD, then the small parts: catalog, index
caches, array metadata, into an empty cache), against a moto S3 server on 127.0.0.1.

    python benchmarks/remote_open.py STORE                    # publish STORE, then 5 fresh opens
    python benchmarks/remote_open.py STORE --profile          # and where the last open's time went
    PYTHONPATH=/path/to/other/checkout python benchmarks/remote_open.py STORE   # the same with other code

moto answers on the same machine, so the times are moto's and this machine's, not S3's; the parts count
says how many GETs a fresh open makes (at S3's ~63 ms first-byte p50 each, one after another or together).
moto copies a whole object for every ranged GET of it (benchmarks/whole_object.py), so the download of the
large index files is far slower here than their bytes: the small parts' download is timed on its own too.
moto also shares this machine's cores with the reader: each open reports the CPU seconds both used in it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import objectstore  # benchmarks/objectstore.py: the moto server

import mrlstore
from mrlstore.tiers.objectstore import RemoteSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the last open (its main thread)")
    args = ap.parse_args()
    print(f"mrlstore from {Path(mrlstore.__file__).parent}")
    proc, host = objectstore.start_moto()
    try:
        url, options = objectstore.bench_url(host)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "store"  # a snapshot: the store may be open elsewhere
            with mrlstore.open(args.store, read_only=True) as source:
                source.snapshot(copy)
            with mrlstore.open(copy) as local:
                head = local.publish(url, storage_options=options)
            print(f"published {head['committed_rows']:,} rows; a fresh open downloads {len(head['parts'])} parts")
            times, reader_cpu, server_cpu = [], [], []
            for i in range(args.opens):
                cache = Path(tmp) / f"cache{i}"
                profile = cProfile.Profile() if args.profile and i == args.opens - 1 else None
                t0, cpu0, moto0 = time.perf_counter(), time.process_time(), cpu_seconds(proc.pid)
                with profile or contextlib.nullcontext():
                    opened = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache)
                with opened:
                    times.append(time.perf_counter() - t0)
                    reader_cpu.append(time.process_time() - cpu0)
                    server_cpu.append(cpu_seconds(proc.pid) - moto0)
                    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
                shutil.rmtree(cache, ignore_errors=True)
            if profile is not None:
                pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
            spread = [round(t, 3) for t in times]
            print(f"fresh open: median {statistics.median(times):.3f} s of {spread}; {size / 2**20:.1f} MiB cached")
            print(
                f"CPU seconds in an open, median: the reader's {statistics.median(reader_cpu):.2f}, the moto "
                f"server's {statistics.median(server_cpu):.2f} (this machine has {os.cpu_count()} cores)"
            )
            downloads = []  # the small parts alone, as a fresh open fetches them first
            for i in range(args.opens):
                cache = Path(tmp) / f"parts{i}"
                t0 = time.perf_counter()
                source = RemoteSource(url, options)
                source.local_copy(cache)
                downloads.append(time.perf_counter() - t0)
                source.close()
                shutil.rmtree(cache, ignore_errors=True)
            spread = [round(t, 3) for t in downloads]
            print(f"of which the small parts' download: median {statistics.median(downloads):.3f} s of {spread}")
    finally:
        proc.terminate()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
