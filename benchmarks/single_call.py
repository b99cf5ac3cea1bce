"""compare.py's single call (``store.query(q)``, its metadata read, its ids as ints) against hnswlib's
full-dimension ``knn_query`` in the same process, rounds alternating; with ``--against``, the same in fresh
processes that alternate between this checkout's code and another's, so that two versions of the query path
meet on one machine at one time.

    python benchmarks/compare.py --data 100000 --systems mrlstore hnswlib --keep-hnsw --work W   # once
    python benchmarks/single_call.py --work W --data 100000                       # this code
    python benchmarks/single_call.py --work W --data 100000 --against /path/to/other/checkout --runs 3

Uses the store compare.py's mrlstore system left in ``--work`` (tuned) and the hnswlib index that
``--keep-hnsw`` kept, at ``--ef`` (compare.py reports the ef that first reaches the store's recall).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

K = 10


def add_store_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that find compare.py's store and data (single_call.py's and query_parts.py's)."""
    ap.add_argument("--work", type=Path, required=True, help="compare.py's --work")
    ap.add_argument("--data", default="100000", help="compare.py's --data")


def queries_of(work: Path, data: str) -> np.ndarray:
    return np.load(work / f"data_{data}" / "queries.npy").astype(np.float32)


def users_call(store: Any) -> Callable[[np.ndarray], list[int]]:
    """compare.py's single call on ``store``: the default query, its metadata read, its ids as ints."""

    def single(q: np.ndarray) -> list[int]:
        hits = store.query(q, k=K)
        _ = hits.metadata
        return [int(i) for i in hits.ids]

    return single


def child(work: Path, data: str, ef: int, rounds: int) -> dict:
    """p50 of the store's single call and of hnswlib's, in alternating rounds over every query."""
    import hnswlib

    import mrlstore

    queries = queries_of(work, data)
    index = hnswlib.Index(space="cosine", dim=queries.shape[1])
    index.load_index(str(work / f"data_{data}" / "hnswlib.hnsw"))
    index.set_ef(ef)
    times: dict[str, list[float]] = {"store": [], "hnswlib": []}
    with mrlstore.open(work / "mrlstore_store") as store:
        calls = {"store": users_call(store), "hnswlib": lambda q: index.knn_query(q, k=K, num_threads=1)[0][0]}
        for q in queries[:50]:  # warm-up
            for call in calls.values():
                call(q)
        for _ in range(rounds):
            for name, call in calls.items():
                for q in queries:
                    t0 = time.perf_counter()
                    call(q)
                    times[name].append(time.perf_counter() - t0)
    store_ms, hnswlib_ms = (1e3 * statistics.median(times[name]) for name in ("store", "hnswlib"))
    return {"code": str(Path(mrlstore.__file__).parents[1]), "store_ms": store_ms, "hnswlib_ms": hnswlib_ms}


def in_process(args: argparse.Namespace, checkout: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--work", str(args.work), "--data", args.data, "--ef", str(args.ef)]
    out = subprocess.run([*cmd, "--rounds", str(args.rounds), "--child"], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_store_args(ap)
    ap.add_argument("--ef", type=int, default=48, help="hnswlib's beam")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over every query, per system, per process")
    ap.add_argument("--against", type=Path, help="another checkout, run in turn with this one")
    ap.add_argument("--runs", type=int, default=1, help="processes per checkout")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.work, args.data, args.ef, args.rounds)))
        return
    here = Path(__file__).resolve().parents[1]  # its native kernels built in place (pip install -e .)
    checkouts = [here] if args.against is None else [here, args.against.resolve()]
    print(f"| code | store p50 ms | hnswlib ef={args.ef} p50 ms | ratio |\n|---|---|---|---|")
    for _ in range(args.runs):
        for checkout in checkouts:
            r = in_process(args, checkout)
            ratio = r["store_ms"] / r["hnswlib_ms"]
            print(f"| {r['code']} | {r['store_ms']:.3f} | {r['hnswlib_ms']:.3f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
