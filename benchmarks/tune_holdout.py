"""Does ``tune(recall=...)``'s promise hold for new queries? Tunes a store of MRL-like vectors on its own rows
(several tuning seeds), then measures the tuned default query's recall@10 on held-out queries drawn from the
same clusters, against exact search on the stored (float16-rounded) vectors.

    python benchmarks/tune_holdout.py                    # 100k x 2048, target 0.95, seeds 0-4, 2,000 queries
    python benchmarks/tune_holdout.py --n 20000 --seeds 3

Prints one line per seed (tuned shape, the recall tune measured, its lower bound, and the held-out recall)
and how many seeds met the target on new queries.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import mrlstore
from mrlstore.testing import mrl_like, mrl_like_blocks


def held_out_recall(store: mrlstore.Store, base: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean recall@k of the store's default query against exact cosine search over ``base``."""
    norms = np.linalg.norm(base, axis=1)
    found = 0
    for lo in range(0, len(queries), 500):
        q = queries[lo : lo + 500]
        scores = (q @ base.T) / norms / np.linalg.norm(q, axis=1)[:, None]
        truth = np.argpartition(-scores, k, axis=1)[:, :k]
        for qi, hits in enumerate(store.query(q, k=k)):
            found += len({int(i) for i in hits.ids} & set(truth[qi].tolist()))
    return found / (k * len(queries))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--recall", type=float, default=0.95)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mrl-holdout-"))
    try:
        t0 = time.perf_counter()
        base = []
        with mrlstore.open(work / "s", dim=args.dim) as store:
            lo = 0
            for block, _ in mrl_like_blocks(args.n, args.dim, noise=1.0, seed=0):
                store.add_vectors(block, ids=[str(i) for i in range(lo, lo + len(block))])
                base.append(block.astype(np.float16).astype(np.float32))  # as stored
                lo += len(block)
            print(f"built {args.n:,} x {args.dim} in {time.perf_counter() - t0:.1f} s")
            vectors = np.concatenate(base)
            queries = mrl_like(args.queries, args.dim, noise=1.0, seed=0, sample=1)[0]
            met = 0
            for seed in range(args.seeds):
                tuned = store.tune(recall=args.recall, seed=seed)
                got = held_out_recall(store, vectors, queries)
                met += got >= args.recall
                low = tuned.get("recall_low", float("nan"))
                print(
                    f"seed {seed}: dims={tuned.dims} shortlist={tuned.shortlist} taper={tuned.taper} "
                    f"{tuned.ms_per_query:.3f} ms; tune measured {tuned.recall:.4f} (lower bound {low:.4f}); "
                    f"held-out recall {got:.4f}"
                )
            print(f"held-out recall >= {args.recall} for {met} of {args.seeds} tunings")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
