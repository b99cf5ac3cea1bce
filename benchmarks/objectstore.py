"""A store on object storage against the same store on local disk, same run: publish time, then per query
the requests, bytes, rounds (batches of requests waited for one after another) and p50 latency, cold (a
fresh open, each query's rows never read) and warm (the same queries again: the row cache and open
connections), and a modelled cold latency on S3: one GET latency (63 ms, S3's p50) per wave of at most
FETCH_THREADS requests.

    python benchmarks/objectstore.py --work /path/with/space              # 100,000 x 2048 (compare.py's data)
    python benchmarks/objectstore.py --work /path/with/space --n 1000000  # generated when absent

The object store is a moto server in server mode on 127.0.0.1 (started here, its own process): no network
latency, but every request goes through a real S3 protocol stack, and moto reads a whole object to answer a
ranged GET (a chunk object of up to 64 MiB per request), so its latencies are moto's, not S3's; the request and byte
counts are what any S3 service would see. The "on paper" section of the results file scales them to S3.
The local store is built from ``<work>/data_<n>/base.npy`` and its queries (made by ``benchmarks/compare.py``)
or, when absent, from ``mrlstore.testing.mrl_like_blocks(n, 2048, noise=1.0, seed=0)`` with held-out queries
``mrl_like(q, 2048, noise=1.0, seed=0, sample=1)``, and tuned (recall 0.95) once.
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from compare import du_mib
from tqdm import tqdm

import mrlstore
from mrlstore.testing import mrl_like, mrl_like_blocks

ROOT = Path(__file__).resolve().parents[1]
DIM = 2048
S3_GET_MS = 63.0  # S3's GET p50 (issue 25): the modelled cost of one wave of concurrent requests


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


def bench_url(endpoint: str) -> tuple[str, dict[str, str]]:
    """A store URL in a new bucket on the moto server at ``endpoint``, and the storage options to reach it."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", scheme="http", region="us-east-1",
                           endpoint_override=endpoint.split("://")[-1], allow_bucket_creation=True)  # fmt: skip
    fs.create_dir("bench")
    return "s3://bench/store.mrl", {"key": "bench", "secret": "bench", "endpoint_url": endpoint, "region": "us-east-1"}


def local_store(work: Path, n: int) -> Path:
    path = work / f"objectstore_local_{n}"
    if (path / "catalog.duckdb").exists():
        with mrlstore.open(path, read_only=True) as built:
            if len(built) == n and built.info().tuned is not None:
                return path
    shutil.rmtree(path, ignore_errors=True)
    with mrlstore.open(path, dim=DIM) as store:
        lo = 0
        for block in tqdm(base_blocks(work, n), total=-(-n // 65_536), desc="local store", unit="block"):
            hi = lo + len(block)
            store.add_vectors(block, ids=[str(i) for i in range(lo, hi)],
                              metadata=[{"label": f"c{i % 100}"} for i in range(lo, hi)])  # fmt: skip
            lo = hi
        store.tune(recall=0.95)
    return path


def base_blocks(work: Path, n: int) -> Iterator[np.ndarray]:
    saved = work / f"data_{n}" / "base.npy"
    if saved.exists():
        base = np.load(saved, mmap_mode="r")
        yield from (np.asarray(base[lo : lo + 50_000]) for lo in range(0, len(base), 50_000))
    else:
        yield from (block for block, _ in mrl_like_blocks(n, DIM, noise=1.0, seed=0))


def held_out_queries(work: Path, n: int, count: int) -> np.ndarray:
    saved = work / f"data_{n}" / "queries.npy"
    if saved.exists():
        return np.load(saved)[:count]
    return mrl_like(count, DIM, noise=1.0, seed=0, sample=1)[0]


def measure(store: mrlstore.Store, queries: np.ndarray, dims: list[int] | None) -> dict[str, float]:
    times, reads = [], []
    for q in queries:
        before = store.info().remote
        t0 = time.perf_counter()
        store.query(q, k=10, dims=dims)
        times.append(time.perf_counter() - t0)
        after = store.info().remote
        if before is not None and after is not None:
            reads.append({key: after[key] - before[key] for key in ("requests", "bytes", "rounds", "waves")})
    out = {"p50_ms": float(np.median(times) * 1000)}
    if reads:
        out |= {key: float(np.mean([r[key] for r in reads])) for key in reads[0]}
        out["modelled_ms"] = float(np.median([r["waves"] for r in reads])) * S3_GET_MS
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument(
        "--default-only", action="store_true", help="only the default query (moto takes tens of seconds per wide one)"
    )
    args = ap.parse_args()
    runs = [run for run in REMOTE_RUNS if run[1] is None or not args.default_only]
    path = local_store(args.work, args.n)
    queries = held_out_queries(args.work, args.n, args.queries)
    proc, endpoint = start_moto()
    try:
        url, options = bench_url(endpoint)
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
        for name, dims, local_dims in runs:
            cache = args.work / "objectstore_cache"
            shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
            remote = mrlstore.open(url, read_only=True, storage_options=options, cache_dir=cache, local_dims=local_dims)
            opened = remote.info().remote or {}
            label = run_label(name, local_dims)
            results[f"{label}: open s"] = time.perf_counter() - t0
            results[f"{label}: local_dims"] = opened.get("local_dims")
            results[f"{label}: cache MiB"] = du_mib(cache)
            results[f"{label}: cold"] = measure(remote, queries, dims)
            results[f"{label}: warm"] = measure(remote, queries, dims)
            print(label, results[f"{label}: cold"], results[f"{label}: warm"], flush=True)
            remote.close()
    finally:
        proc.terminate()
        proc.wait()
    print(json.dumps(results, indent=1))
    print(table(results, runs))


def run_label(name: str, local_dims: int | None) -> str:
    return f"remote {name}, local_dims={'default' if local_dims is None else local_dims}"


def table(results: dict, runs: list | tuple | None = None) -> str:
    """The runs as the results file's markdown table."""
    runs = REMOTE_RUNS if runs is None else runs
    lines = [
        "| run | GETs / query | KiB / query | rounds / query | modelled cold p50 on S3 | moto p50 cold | "
        "p50 repeat | open | cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("default", "[16, 2048]"):
        lines.append(
            f"| local disk, {name} | - | - | - | - | - | {results[f'local {name}']['p50_ms']:.2f} ms | - | - |"
        )
    for name, _, local_dims in runs:
        label = run_label(name, local_dims)
        cold, warm = results[f"{label}: cold"], results[f"{label}: warm"]
        lines.append(
            f"| {label} (near: bands to {results[f'{label}: local_dims']}) | {cold['requests']:.1f} | "
            f"{cold['bytes'] / 1024:.1f} | {cold['rounds']:.2f} | {cold['modelled_ms']:.0f} ms | "
            f"{cold['p50_ms']:.0f} ms | {warm['p50_ms']:.2f} ms | {results[f'{label}: open s']:.2f} s | "
            f"{results[f'{label}: cache MiB']:.0f} MiB |"
        )
    return "\n".join(lines)


REMOTE_RUNS = (  # (name, dims, local_dims): None is the default (every band but the widest near)
    ("default", None, None),
    ("default", None, 0),
    ("[16, 2048]", [16, 2048], None),
    ("[16, 2048]", [16, 2048], 0),
)


if __name__ == "__main__":
    os.environ.setdefault("MRLSTORE_ROW_CACHE_MB", "256")
    main()
