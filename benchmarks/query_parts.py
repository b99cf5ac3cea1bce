"""Where compare.py's single call spends its time, part by part, warm or after a pause (the CPU's caches cold).

    python benchmarks/query_parts.py --work W --data 100000                 # warm: queries back to back
    python benchmarks/query_parts.py --work W --data 100000 --pause-ms 50   # a pause before each query

Uses the store compare.py's mrlstore system left in ``--work``. Each listed function is wrapped with a timer
and charged its own time (its wrapped callees' time is taken out); each wrapper adds about 1 µs, so the
total is higher than single_call.py's p50. "outside" is the rest: the Store facade, the metadata property,
the ids as ints.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time
from typing import Any

from single_call import add_store_args, queries_of, users_call  # benchmarks/single_call.py


def wrap_parts(charged: dict[str, float]) -> None:
    """Wrap the query path's functions so that each adds its own time to ``charged``."""
    from mrlstore import kernels
    from mrlstore.query import funnel, searcher
    from mrlstore.results import Hits
    from mrlstore.tiers import hnsw, projection, rows, snapshot

    stack: list[float] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        inner_fn = getattr(owner, name)

        @functools.wraps(inner_fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            stack.append(0.0)
            try:
                return inner_fn(*args, **kwargs)
            finally:
                spent, nested = time.perf_counter() - t0, stack.pop()
                charged[label] += spent - nested
                if stack:
                    stack[-1] += spent

        setattr(owner, name, timed)

    parts = [
        (searcher.Searcher, "query", "Searcher.query"), (searcher.Searcher, "plan", "plan"),
        (searcher, "query_batch", "query checks"), (funnel.Funnel, "run", "Funnel.run"),
        (funnel.Funnel, "first_stage", "first stage (Python)"), (projection.Projection, "query_codes", "fitted codes"),
        (hnsw.PrefixIndex, "search", "PrefixIndex.search"), (hnsw.PrefixIndex, "_knn", "hnswlib knn_query"),
        (snapshot.Snapshot, "live_sorted", "live_sorted"), (funnel.Funnel, "refine", "Funnel.refine"),
        (kernels, "_refine_native", "native re-rank"), (Hits, "of_rows", "Hits.of_rows"),
        (rows.RowTable, "take_ids", "ids"), (rows.RowTable, "records", "metadata records"),
    ]  # fmt: skip
    for owner, name, label in parts:
        wrap(owner, name, label)
    kernels.refine.__globals__["_refine_native"] = kernels._refine_native  # refine calls it by global name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_store_args(ap)
    ap.add_argument("--pause-ms", type=float, default=0.0, help="sleep before each query (0: back to back)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds over the queries (default: 5 warm, 1 paused)")
    args = ap.parse_args()
    import mrlstore

    charged: dict[str, float] = collections.defaultdict(float)
    wrap_parts(charged)
    queries = queries_of(args.work, args.data)
    rounds = args.rounds or (1 if args.pause_ms else 5)
    totals = []
    with mrlstore.open(args.work / "mrlstore_store") as store:
        single = users_call(store)
        for q in queries:
            single(q)
        charged.clear()
        for _ in range(rounds):
            for q in queries:
                if args.pause_ms:
                    time.sleep(args.pause_ms / 1e3)
                t0 = time.perf_counter()
                single(q)
                totals.append(time.perf_counter() - t0)
    n = len(totals)
    print(f"{n} calls, {args.pause_ms:g} ms pause before each: mean {1e6 * sum(totals) / n:.1f} µs, "
          f"p50 {1e6 * statistics.median(totals):.1f} µs (wrappers included)")  # fmt: skip
    print("| part | µs per call |\n|---|---|")
    for label, spent in sorted(charged.items(), key=lambda item: -item[1]):
        print(f"| {label} | {1e6 * spent / n:.1f} |")
    print(f"| outside | {1e6 * (sum(totals) - sum(charged.values())) / n:.1f} |")


if __name__ == "__main__":
    main()
