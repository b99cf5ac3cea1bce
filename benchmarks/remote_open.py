"""How long a fresh reader takes to open a store on object storage (HEAD, then the small parts: catalog, index
caches, array metadata, into an empty cache), against a moto S3 server on 127.0.0.1.

    python benchmarks/remote_open.py STORE                    # publish STORE, then 5 fresh opens
    python benchmarks/remote_open.py STORE --profile          # and where the last open's time went
    PYTHONPATH=/path/to/other/checkout python benchmarks/remote_open.py STORE   # the same with other code
    python benchmarks/remote_open.py STORE --against /path/to/other/checkout  # fresh opens in processes,
                                              # alternating this code and the other's, on one published copy

The publish is timed first, with the largest growth of the publisher's anonymous memory meanwhile.
moto answers on the same machine, so the times are moto's and this machine's, not S3's; the parts count
says how many GETs a fresh open makes (at S3's ~63 ms first-byte p50 each, one after another or together).
moto copies a whole object for every ranged GET of it (benchmarks/whole_object.py), so the download of the
large index files is far slower here than their bytes: the small parts' download is timed on its own too.
moto also shares this machine's cores with the reader: each open reports the CPU seconds both used in it.
A reader loads at open only the index a default query searches first; one more open then times the first
query on each index HEAD defers (its download and load) and the reader's anonymous memory before and after,
and ``get`` by id (its first call downloads the id runs HEAD defers).
Last, that reader refreshes after the store gains ``--add`` rows and is published again: the refresh's time
and the bytes its cache grew by (near chunks are kept by object key and linked into each version's copy).

    python benchmarks/remote_open.py STORE --opens 0        # only the first-use queries and the refresh
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import objectstore  # benchmarks/objectstore.py: the moto server
from compare import PeakMemory, du_mib, rss_anon_mib

import mrlstore
from mrlstore.tiers.objectstore import RemoteSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, nargs="?")
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the last open (its main thread)")
    ap.add_argument("--add", type=int, default=1000, help="rows added before the refresh")
    ap.add_argument("--against", type=Path, help="a checkout whose code opens in turn with this one's")
    ap.add_argument("--one-open", help=argparse.SUPPRESS)  # a child of --against: URL and options as JSON
    args = ap.parse_args()
    if args.one_open:
        return one_open(**json.loads(args.one_open))
    if args.store is None:
        ap.error("STORE is required")
    print(f"mrlstore from {Path(mrlstore.__file__).parent}")
    proc, host = objectstore.start_moto()
    try:
        url, options = objectstore.bench_url(host)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "store"  # a snapshot: the store may be open elsewhere
            with mrlstore.open(args.store, read_only=True) as source:
                source.snapshot(copy)
            with mrlstore.open(copy) as local:
                memory, t0 = PeakMemory(), time.perf_counter()
                head = local.publish(url, storage_options=options)
                took, grew = time.perf_counter() - t0, memory.stop()
            parts, later = len(head["parts"]), len(head.get("deferred", []))
            print(
                f"published {head['committed_rows']:,} rows in {took:.1f} s (anonymous memory up {grew:.0f} MiB "
                f"at most meanwhile); a fresh open downloads {parts - later} parts ({later} on first use)"
            )
            if args.against:
                return alternate(url, options, Path(tmp), args.opens, args.against)
            if args.opens:
                time_opens(url, options, Path(tmp), args.opens, args.profile, proc.pid)
            first_use(url, options, Path(tmp) / "first-use", head, copy, args.add)
    finally:
        proc.terminate()
        proc.wait()


def time_opens(url: str, options: dict, tmp: Path, opens: int, profiled: bool, moto_pid: int) -> None:
    """``opens`` fresh opens, then the small parts' download alone as often."""
    times, reader_cpu, server_cpu = [], [], []
    for i in range(opens):
        cache = tmp / f"cache{i}"
        profile = cProfile.Profile() if profiled and i == opens - 1 else None
        t0, cpu0, moto0 = time.perf_counter(), time.process_time(), cpu_seconds(moto_pid)
        with profile or contextlib.nullcontext():
            opened = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache)
        with opened:
            times.append(time.perf_counter() - t0)
            reader_cpu.append(time.process_time() - cpu0)
            server_cpu.append(cpu_seconds(moto_pid) - moto0)
            cached = du_mib(cache)
        shutil.rmtree(cache, ignore_errors=True)
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    spread = [round(t, 3) for t in times]
    print(f"fresh open: median {statistics.median(times):.3f} s of {spread}; {cached:.1f} MiB of cache on disk")
    print(
        f"CPU seconds in an open, median: the reader's {statistics.median(reader_cpu):.2f}, the moto "
        f"server's {statistics.median(server_cpu):.2f} (this machine has {os.cpu_count()} cores)"
    )
    downloads = []  # the small parts alone, as a fresh open fetches them first
    for i in range(opens):
        cache = tmp / f"parts{i}"
        t0 = time.perf_counter()
        source = RemoteSource(url, options)
        source.local_copy(cache)
        downloads.append(time.perf_counter() - t0)
        source.close()
        shutil.rmtree(cache, ignore_errors=True)
    spread = [round(t, 3) for t in downloads]
    print(f"of which the small parts' download: median {statistics.median(downloads):.3f} s of {spread}")


def alternate(url: str, options: dict, tmp: Path, opens: int, against: Path) -> None:
    """Fresh opens in new processes, this checkout's code and ``against``'s in turn, on the same published
    version (older code ignores HEAD entries it does not know)."""
    here = Path(__file__).resolve().parents[1]
    runs: dict[Path, list[dict]] = {here: [], against.resolve(): []}
    for i in range(opens):
        for code, got in runs.items():
            job = json.dumps({"url": url, "options": options, "cache": str(tmp / f"cache-{i}-{len(got)}")})
            out = subprocess.run(
                [sys.executable, __file__, "--one-open", job], env={**os.environ, "PYTHONPATH": str(code)},
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            got.append(json.loads(out.splitlines()[-1]))
            print(f"{code}: {got[-1]}", flush=True)
    for code, got in runs.items():
        opened = [round(r["open_s"], 2) for r in got]
        print(
            f"{code}: fresh open median {statistics.median(opened):.2f} s of {opened}; reader CPU "
            f"{statistics.median(r['cpu_s'] for r in got):.2f} s; anonymous memory after the open "
            f"{statistics.median(r['anon_mib'] for r in got):.0f} MiB"
        )


def one_open(url: str, options: dict, cache: str) -> None:
    """One fresh open (for ``alternate``): prints its time, CPU seconds and anonymous memory as JSON."""
    anon0, t0, cpu0 = rss_anon_mib(), time.perf_counter(), time.process_time()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache):
        took, cpu, anon = time.perf_counter() - t0, time.process_time() - cpu0, rss_anon_mib() - anon0
    shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({"open_s": took, "cpu_s": cpu, "anon_mib": anon}))


def first_use(url: str, options: dict, cache: Path, head: dict, copy: Path, add: int) -> None:
    """A fresh open, then its first default query and its first query on each deferred index, timed, with the
    reader's anonymous memory (the deferred indexes' graphs load into it); then its refresh after ``copy``
    gained ``add`` rows and was published again."""
    anon0 = rss_anon_mib()
    with mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache) as reader:
        anon = rss_anon_mib()
        query = np.random.default_rng(0).standard_normal(reader.dim).astype(np.float32)
        t0 = time.perf_counter()
        reader.query(query)
        took = 1e3 * (time.perf_counter() - t0)
        print(f"after the open: anonymous memory {anon - anon0:.0f} MiB; first default query {took:.1f} ms")
        lookups(reader)
        near = reader.info().remote["local_dims"]  # a funnel ending there reads no remote rows
        for part in [p for p in head.get("deferred", []) if p.startswith("index/")]:
            d = int(Path(part).stem.rsplit("_", 1)[1])
            dims = [d, near] if near > d else [d]
            t0 = time.perf_counter()
            reader.query(query, dims=dims)
            took = time.perf_counter() - t0
            print(f"first query dims={dims} on {part} (its download and load): {took:.2f} s; anonymous memory "
                  f"now {rss_anon_mib() - anon0:.0f} MiB")  # fmt: skip
        with mrlstore.open(copy) as local:
            rows = np.random.default_rng(1).standard_normal((add, local.dim)).astype(np.float32)
            local.add_vectors(rows, ids=[f"remote-open-{i}" for i in range(add)])
            local.publish(url, storage_options=options)
        before = du_mib(cache)
        t0 = time.perf_counter()
        reader.refresh()
        took = time.perf_counter() - t0
        grown = du_mib(cache) - before
        print(f"refresh after {add:,} rows were added and published: {took:.2f} s; the cache grew by {grown:.1f} MiB")


def lookups(reader: mrlstore.Store, calls: int = 20, per_call: int = 10) -> None:
    """``get`` of ``per_call`` ids at random rows: the first call (which downloads the id runs a version
    publishes), then the median of ``calls`` more, each with other ids; with ``dims`` the near bands hold
    (the lookup and local reads), then with every dimension (the widest band's rows are remote)."""
    sample = f"SELECT id FROM items USING SAMPLE {(2 * calls + 1) * per_call} ROWS (reservoir, 7)"
    ids = reader.sql(sample).column("id").to_pylist()
    near = reader.info().remote["local_dims"]
    for dims in (near, reader.dim):
        times = []
        for at in range(0, (calls + 1) * per_call, per_call):
            t0 = time.perf_counter()
            reader.get(ids[at : at + per_call], dims=dims)
            times.append(1e3 * (time.perf_counter() - t0))
        ids = ids[(calls + 1) * per_call :] + ids[:per_call]  # other ids for the second pass
        print(f"get of {per_call} ids, dims={dims}: first call {times[0]:.1f} ms, then median "
              f"{statistics.median(times[1:]):.2f} ms ({calls} calls)")  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
