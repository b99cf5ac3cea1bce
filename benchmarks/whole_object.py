"""Fetching one whole object from S3: ranged GETs in parallel, 16 MiB each and as a reader cuts them (how it
downloads the small parts at open and its near band chunks: ``mrlstore.tiers.objectstore.range_bytes`` from
``RANGE_THREADS`` threads), optionally one stream, and, for scale, the same bytes stored as separate objects of
one 16 MiB range each.

    python benchmarks/whole_object.py [--mib 200] [--stream]

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

from mrlstore.tiers.objectstore import RANGE_BYTES, RANGE_THREADS, range_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--stream", action="store_true", help="also time one stream of the whole object")
    args = ap.parse_args()
    proc, endpoint = start_moto()
    try:
        fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", scheme="http", region="us-east-1",
                               endpoint_override=endpoint.split("://")[1], allow_bucket_creation=True)  # fmt: skip
        fs.create_dir("bench")
        data = os.urandom(args.mib << 20)
        with fs.open_output_stream("bench/object") as f:
            f.write(data)
        one_stream = None
        if args.stream:  # minutes on moto for a few hundred MiB
            t0 = time.perf_counter()
            with fs.open_input_stream("bench/object") as f:
                assert f.read() == data
            one_stream = time.perf_counter() - t0
        handle = fs.open_input_file("bench/object")
        ranged = {}
        for step in (RANGE_BYTES, range_bytes(len(data))):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(RANGE_THREADS) as pool:
                at = range(0, len(data), step)
                blocks = list(pool.map(lambda a, n=step: handle.read_at(min(n, len(data) - a), a), at))
            ranged[step] = (len(at), time.perf_counter() - t0)
            assert b"".join(blocks) == data
        starts = range(0, len(data), RANGE_BYTES)
        for i, at in enumerate(starts):
            with fs.open_output_stream(f"bench/piece{i}") as f:
                f.write(data[at : at + RANGE_BYTES])
        t0 = time.perf_counter()
        with ThreadPoolExecutor(RANGE_THREADS) as pool:
            pieces = list(pool.map(lambda i: fs.open_input_file(f"bench/piece{i}").read(), range(len(starts))))
        separate = time.perf_counter() - t0
        assert b"".join(pieces) == data
        cuts = "; ".join(f"{n} ranges of {step / 2**20:.1f} MiB {t:.2f} s" for step, (n, t) in ranged.items())
        stream = "" if one_stream is None else f"one stream {one_stream:.2f} s; "
        print(f"{args.mib} MiB: {stream}from {RANGE_THREADS} threads: {cuts}; the same bytes as {len(starts)} "
              f"objects, {RANGE_THREADS} at a time, {separate:.2f} s")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
