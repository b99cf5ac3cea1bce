"""Which S3 client for the re-rank reads: pyarrow's S3FileSystem (what mrlstore uses) against s3fs (fsspec)
and obstore, on the read mrlstore makes: many small ranged GETs of one object, concurrently.

    pip install s3fs obstore        # for this comparison only; mrlstore needs neither
    python benchmarks/s3_clients.py [--object-mib 1] [--reads 200] [--row-bytes 3584]

Runs against a moto server on 127.0.0.1 (started here). moto reads the whole object for every ranged GET,
so the object is kept small (default 1 MiB) to let the clients' own cost show. Each client reads the same
random rows (16 at a time for pyarrow, through a thread pool as mrlstore does; s3fs's ``cat_ranges`` and
obstore's ``get_ranges`` run their own concurrency, and obstore's merges ranges less than 1 MiB apart into one
request; obstore's ``get_range`` per row shows its cost per request); median of 5 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from objectstore import start_moto  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--object-mib", type=float, default=1.0)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--row-bytes", type=int, default=3584)
    args = ap.parse_args()
    import obstore
    import pyarrow.fs as pafs
    import s3fs
    from obstore.store import S3Store

    proc, endpoint = start_moto()
    try:
        host = endpoint.split("://")[1]
        fs = pafs.S3FileSystem(access_key="k", secret_key="s", scheme="http", endpoint_override=host,
                               region="us-east-1", allow_bucket_creation=True)  # fmt: skip
        fs.create_dir("clients")
        size = int(args.object_mib * 2**20) // args.row_bytes * args.row_bytes
        with fs.open_output_stream("clients/chunk") as f:
            f.write(np.random.default_rng(0).bytes(size))
        rows = np.sort(np.random.default_rng(1).choice(size // args.row_bytes, args.reads, replace=False))
        starts = (rows * args.row_bytes).tolist()
        ends = [s + args.row_bytes for s in starts]
        pool = ThreadPoolExecutor(16)
        handle = fs.open_input_file("clients/chunk")
        sfs = s3fs.S3FileSystem(
            key="k", secret="s", client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"}
        )
        store = S3Store("clients", endpoint=endpoint, access_key_id="k", secret_access_key="s", region="us-east-1",
                        client_options={"allow_http": True})  # fmt: skip
        clients = {
            "pyarrow S3FileSystem (read_at, 16 threads)": lambda: list(
                pool.map(lambda s: handle.read_at(args.row_bytes, s), starts)
            ),
            "s3fs cat_ranges": lambda: sfs.cat_ranges(["clients/chunk"] * len(starts), starts, ends),
            "obstore get_ranges (merges ranges within 1 MiB: fewer, larger requests)": lambda: obstore.get_ranges(
                store, "chunk", starts=starts, ends=ends
            ),
            "obstore get_range per row, 16 threads": lambda: list(
                pool.map(lambda s: obstore.get_range(store, "chunk", start=s, end=s + args.row_bytes), starts)
            ),
        }
        print(f"{args.reads} reads of {args.row_bytes} bytes from a {size / 2**20:.1f} MiB object\n")
        print("| client | ms per batch (median of 5) | bytes |\n|---|---|---|")
        for name, read in clients.items():
            read()  # warm-up: connections
            times, got = [], 0
            for _ in range(5):
                t0 = time.perf_counter()
                parts = read()
                times.append(time.perf_counter() - t0)
                got = sum(len(p) for p in parts)
            print(f"| {name} | {statistics.median(times) * 1000:.0f} | {got:,} |")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
