"""Where the time of one query goes: p50 of single queries, then a cProfile breakdown (µs per query).

    python benchmarks/query_profile.py                     # 100k synthetic MRL-like 2048-d rows
    PYTHONPATH=/path/to/another/checkout python benchmarks/query_profile.py --n 20000   # e.g. an older version

Builds (once) a default float16 store of N rows from ``mrlstore.testing`` (the data of compare.py) with
three metadata columns, runs ``tune(recall=0.95)``, then times single queries, one at a time, with metadata:
the default call ``store.query(q)``, ``dims=[16, 2048]`` and exact ``dims=[2048]``. The profile lists the
functions with the most own time per default query (profiling inflates small calls; the p50s are without
it). Works against any checkout put first on ``PYTHONPATH`` (the ``before`` column of issue notes). Then the stages of
the default call and of ``dims=[16, 2048]`` at their tuned settings, each timed alone over the same queries
(median µs per query): the first stage (HNSW), the re-rank of its candidates (for ``dims=[16, 2048]`` with
the stored band norms, a format 2 store, and without), and an exact 16-d scan keeping as many rows (what
the HNSW search replaces).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import pstats
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "build" / "profile")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    import mrlstore

    try:
        from mrlstore.testing import mrl_like, mrl_like_blocks
    except ImportError:  # a checkout from before the generator moved to mrlstore.testing
        from mrlstore.synthetic import mrl_like, mrl_like_blocks

    checkout = Path(mrlstore.__file__).resolve().parent
    print(f"mrlstore from {checkout}")
    path = args.work / f"store_{args.n}_{hashlib.sha1(str(checkout).encode()).hexdigest()[:8]}"
    if args.rebuild or not path.exists():
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        with mrlstore.open(path, dim=2048) as store:
            lo = 0
            for block, labels in mrl_like_blocks(args.n, 2048, noise=1.0, seed=0, block_rows=65536):
                meta = {"label": [f"c{c}" for c in labels], "n": list(range(lo, lo + len(block))),
                        "w": (labels / 7.0).tolist()}  # fmt: skip
                store.add_vectors(block, ids=[str(i) for i in range(lo, lo + len(block))], metadata=pa.table(meta))
                lo += len(block)
            store.tune(recall=0.95, k=10)
        print(f"built {args.n:,} rows + tune in {time.perf_counter() - t0:.0f} s")
    queries, _ = mrl_like(args.queries, 2048, noise=1.0, seed=0, sample=1)
    with mrlstore.open(path) as store:
        tuned = store.manifest.get("tuned") or {}
        print(f"tuned: dims={tuned.get('dims')} shortlist={tuned.get('shortlist')} ef={tuned.get('ef')}")
        calls = {"default store.query(q)": {}, "dims=[16, 2048]": {"dims": [16, 2048]},
                 "dims=[2048] (exact)": {"dims": [2048]}}  # fmt: skip
        for name, kw in calls.items():
            n = args.queries if "exact" not in name else max(10, args.queries // 10)
            store.query(queries[0], k=10, **kw)  # warm-up
            times = []
            for q in queries[:n]:
                t0 = time.perf_counter()
                h = store.query(q, k=10, **kw)
                _ = h.metadata  # materialise the metadata the caller reads
                times.append(time.perf_counter() - t0)
            print(f"{name}: p50 {1e3 * np.median(times):.3f} ms, p99 {1e3 * np.percentile(times, 99):.3f} ms")
        default_stage_times(store, queries)
        stage_times(store, queries)
        prof = cProfile.Profile()
        prof.enable()
        for q in queries:
            _ = store.query(q, k=10).metadata
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    print(f"\nprofile of the default call, own time per query (µs), {len(queries)} queries:")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:18]
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{Path(file).name}:{line}({fn})" if line else fn
        print(f"  {1e6 * tottime / len(queries):8.1f} µs own {1e6 * cumtime / len(queries):8.1f} µs cum  "
              f"{ncalls / len(queries):5.1f} calls  {where}")  # fmt: skip


def median_us(fn, qs: list) -> float:
    fn(qs[0])
    times = []
    for q in qs:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def default_stage_times(store, queries: np.ndarray) -> None:
    """The default call's first stage and re-rank, each alone (private API: a benchmark)."""
    funnel, snap = store._search.funnel, store._state.snap
    plan = store._search.plan(None, 10, None, None)
    qs = [np.ascontiguousarray(q[None], dtype=np.float32) for q in queries]
    fitted = funnel.uses_fit(plan)
    first = lambda q: funnel.first_stage(snap, q, plan.dims[0], plan.sizes[0], None, plan.ef, fitted)  # noqa: E731
    candidates = {id(q): first(q) for q in qs}
    full = median_us(lambda q: store.query(q[0], k=10).metadata, qs)
    hnsw = median_us(first, qs)
    rerank = median_us(lambda q: funnel.refine(q, *candidates[id(q)], plan), qs)
    print(f"\ndefault call {list(plan.dims)}, survivors {list(plan.sizes)}, ef {plan.ef} (median µs per query):")
    print(f"  whole call with metadata: {full:.0f}")
    print(f"  first stage ({plan.dims[0]}-d HNSW, live rows sorted): {hnsw:.0f}")
    print(f"  re-rank through {list(plan.dims[1:])}: {rerank:.0f}")
    print(f"  the rest (validation, plan, hit ids and metadata): {full - hnsw - rerank:.0f}")


def stage_times(store, queries: np.ndarray) -> None:
    """The stages of dims=[16, 2048], each timed alone over the same candidates (private API: a benchmark)."""
    from mrlstore import kernels

    funnel, snap, vectors = store._search.funnel, store._state.snap, store._state.vectors
    plan = store._search.plan([16, 2048], 10, None, None)
    shortlist, fitted = plan.sizes[0], funnel.uses_fit(plan)  # a tuned store may search fitted 16-d codes
    qs = [np.ascontiguousarray(q[None], dtype=np.float32) for q in queries]

    first = lambda q: funnel.first_stage(snap, q, 16, shortlist, None, plan.ef, fitted)  # noqa: E731
    candidates = {id(q): first(q) for q in qs}  # rows, offsets
    print(f"\ndims=[16, 2048] stages alone, shortlist {shortlist} (median µs per query):")
    hnsw = median_us(first, qs)
    print(f"  16-d HNSW search{' (fitted codes)' if fitted else ''}, ef {plan.ef}, live rows sorted: {hnsw:.0f}")
    rerank = lambda q: kernels.refine(vectors, *candidates[id(q)], q, (2048,), (10,), "cosine")  # noqa: E731
    norms = getattr(vectors, "norms", None)
    print(f"  2048-d re-rank{' with row norms' if norms is not None else ''}: {median_us(rerank, qs):.0f}")
    if norms is not None:
        vectors.norms = None  # kernel_norms() now says there are none
        print(f"  2048-d re-rank without row norms: {median_us(rerank, qs):.0f}")
        vectors.norms = norms
    scan = lambda q: kernels.scan(vectors, q, 16, shortlist, "cosine", stop=snap.watermark, live=snap.live)  # noqa: E731
    print(f"  exact 16-d scan keeping {shortlist}: {median_us(scan, qs):.0f}")


if __name__ == "__main__":
    main()
