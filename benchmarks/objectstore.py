"""A store on object storage against the same store on local disk, same run: publish time, then per query
the requests, bytes and p50 latency, cold (a fresh open, each query's rows never read) and warm (the same
queries again: the row cache and open connections).

    python benchmarks/objectstore.py --work /path/with/space    # 100,000 x 2048 (compare.py's data)

The object store is a moto server in server mode on 127.0.0.1 (started here, its own process): no network
latency, but every request goes through a real S3 protocol stack, and moto reads a whole object to answer a
ranged GET (a chunk object of up to 64 MiB per request), so its latencies are moto's, not S3's; the request and byte
counts are what any S3 service would see. The "on paper" section of the results file scales them to S3.
The local store is built from ``<work>/data_100000/base.npy`` (made by
``benchmarks/compare.py``) and tuned (recall 0.95) once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import mrlstore  # noqa: E402


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto server did not start")


def local_store(work: Path, n: int) -> Path:
    path = work / f"objectstore_local_{n}"
    if (path / "catalog.duckdb").exists():
        return path
    base = np.load(work / f"data_{n}" / "base.npy", mmap_mode="r")
    shutil.rmtree(path, ignore_errors=True)
    with mrlstore.open(path, dim=base.shape[1]) as store:
        for lo in range(0, len(base), 50_000):
            hi = min(lo + 50_000, len(base))
            store.add_vectors(np.asarray(base[lo:hi]), ids=[str(i) for i in range(lo, hi)],
                              metadata=[{"label": f"c{i % 100}"} for i in range(lo, hi)])  # fmt: skip
        store.tune(recall=0.95)
    return path


def measure(store: mrlstore.Store, queries: np.ndarray, dims: list[int] | None) -> dict[str, float]:
    source = getattr(store, "_remote", None)
    times, requests, nbytes = [], [], []
    for q in queries:
        r0, b0 = (source.requests, source.bytes) if source else (0, 0)
        t0 = time.perf_counter()
        store.query(q, k=10, dims=dims)
        times.append(time.perf_counter() - t0)
        if source:
            requests.append(source.requests - r0)
            nbytes.append(source.bytes - b0)
    out = {"p50_ms": float(np.median(times) * 1000)}
    if source:
        out |= {"requests": float(np.mean(requests)), "kib": float(np.mean(nbytes) / 1024)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    path = local_store(args.work, args.n)
    queries = np.load(args.work / f"data_{args.n}" / "queries.npy")[: args.queries]
    proc, endpoint = start_moto()
    try:
        import pyarrow.fs as pafs

        options = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
        host = endpoint.split("://")[1]
        fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", scheme="http", region="us-east-1",
                               endpoint_override=host, allow_bucket_creation=True)  # fmt: skip
        fs.create_dir("bench")
        url = "s3://bench/store.mrl"
        with mrlstore.open(path) as local:
            t0 = time.perf_counter()
            head = local.publish(url, storage_options=options)
            publish_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = local.publish(url, storage_options=options)
            republish_s = time.perf_counter() - t0
            results = {
                "rows": len(local), "publish_s": publish_s, "uploaded_mib": head["uploaded_chunk_bytes"] / 2**20,
                "republish_s": republish_s, "republish_uploaded_mib": again["uploaded_chunk_bytes"] / 2**20,
            }  # fmt: skip
            for name, dims in (("default", None), ("[16, 2048]", [16, 2048])):
                results[f"local {name}"] = measure(local, queries, dims)
            print({k: v for k, v in results.items()}, flush=True)
        for name, dims, local_dims in (("default", None, 0), ("[16, 2048]", [16, 2048], 0), ("default", None, 256)):
            cache = args.work / "objectstore_cache"
            shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
            remote = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache, local_dims=local_dims)
            label = f"remote {name}" + (f", bands to {local_dims} local" if local_dims else "")
            results[f"{label}: open s"] = time.perf_counter() - t0
            disk = sum(f.stat().st_blocks * 512 for f in cache.rglob("*") if f.is_file())  # sparse files: blocks
            results[f"{label}: cache MiB"] = disk / 2**20
            results[f"{label}: cold"] = measure(remote, queries, dims)
            results[f"{label}: warm"] = measure(remote, queries, dims)
            print(label, results[f"{label}: cold"], results[f"{label}: warm"], flush=True)
            remote.close()
    finally:
        proc.terminate()
        proc.wait()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("MRLSTORE_ROW_CACHE_MB", "256")
    main()
