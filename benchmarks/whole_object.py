"""Fetching one whole object from S3: one stream against ranged GETs in parallel (how a reader downloads the
small parts at open and its near band chunks: ``mrlstore.tiers.objectstore.RANGE_BYTES`` from
``RANGE_THREADS`` threads), and, for scale, the same bytes stored as separate objects of one range each.

    python benchmarks/whole_object.py [--mib 200]

Runs against a moto server on 127.0.0.1 (started here), through pyarrow's S3FileSystem as mrlstore does.
moto answers every ranged GET by copying the whole object (under a lock per object), so ranges of one large
object cost it far more than the same bytes in separate objects; S3 serves a range at the cost of its bytes.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
from objectstore import start_moto  # noqa: E402

from mrlstore.tiers.objectstore import RANGE_BYTES, RANGE_THREADS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=200)
    args = ap.parse_args()
    proc, endpoint = start_moto()
    try:
        fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", scheme="http", region="us-east-1",
                               endpoint_override=endpoint.split("://")[1], allow_bucket_creation=True)  # fmt: skip
        fs.create_dir("bench")
        data = os.urandom(args.mib << 20)
        with fs.open_output_stream("bench/object") as f:
            f.write(data)
        t0 = time.perf_counter()
        with fs.open_input_stream("bench/object") as f:
            streamed = f.read()
        one_stream = time.perf_counter() - t0
        t0 = time.perf_counter()
        handle = fs.open_input_file("bench/object")
        with ThreadPoolExecutor(RANGE_THREADS) as pool:
            starts = range(0, len(data), RANGE_BYTES)
            blocks = list(pool.map(lambda at: handle.read_at(min(RANGE_BYTES, len(data) - at), at), starts))
        ranged = time.perf_counter() - t0
        assert streamed == data == b"".join(blocks)
        for i, at in enumerate(starts):
            with fs.open_output_stream(f"bench/piece{i}") as f:
                f.write(data[at : at + RANGE_BYTES])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(RANGE_THREADS) as pool:
            pieces = list(pool.map(lambda i: fs.open_input_file(f"bench/piece{i}").read(), range(len(starts))))
        separate = time.perf_counter() - t0
        assert b"".join(pieces) == data
        print(f"{args.mib} MiB: one stream {one_stream:.2f} s; {RANGE_BYTES >> 20} MiB ranges from {RANGE_THREADS} "
              f"threads {ranged:.2f} s; the same bytes as {len(starts)} objects, {RANGE_THREADS} at a time, "
              f"{separate:.2f} s")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
