"""Fitted codes (issue 24): do the short codes ``tune`` fits to a store's rows shortlist as well as an SVD of the
same vectors, and does a store of vectors without Matryoshka structure get a fast funnel?

    python benchmarks/fitted_codes.py                       # both parts; vectors cached under --work
    python benchmarks/fitted_codes.py --part photos         # caltech101-ood, CIFAR-10 test, the demo photos
    python benchmarks/fitted_codes.py --part rotated --n 100000
    python benchmarks/fitted_codes.py --part coverage       # no timing: how well each code shortlists
    python benchmarks/fitted_codes.py --part ceiling        # codes trained at length, with torch (slow)
    python benchmarks/fitted_codes.py --part sparse --data DIR  # compare.py's cached data (base, queries, truth)
    python benchmarks/fitted_codes.py --part cost --n 1000000 --dim 2048 [--rotate]

photos: the bundled encoder's vectors of each set in a store, after ``tune(recall=0.95)``: ``dims=[16]``
mAP@10 (leave-one-out, class labels) with the store's codes and with raw prefixes, against exact search on
references fitted on the same vectors (SVD-16: the top 16 right singular vectors, inner product; PCA-16:
centred, cosine); and ``[16, 2048]`` with ``shortlist=100``: the share of the exact 2048-d top 10 it finds.

rotated: MRL-like 1024-d vectors and the same under a random rotation (same neighbours, no prefix
structure), each in a store tuned to recall 0.95; the default query's recall on held-out queries and p50,
and hnswlib over all 1024 dims at the fastest ef reaching the same recall, in the same run.

coverage: the share of the exact full-dimension top 10 that an exact shortlist of S rows on each code
holds (the raw k-prefix, and the k-number codes the store's own Projection.fit gives), for the photo sets
and the MRL-like vectors (a rotation changes neither the full-dimension neighbours nor the fitted codes).
ceiling: how far any 16-number code could go on the photo sets, held-out rows against trained ones. 1,000
rows are held out; codes are trained on the others by gradient descent (torch, Adam, the listwise loss the
store's own training uses, every training row a candidate): a linear map over all dimensions (200 steps)
and a linear map plus a one-hidden-layer network (256 units, 1,000 steps). Each row's exact shortlist of
100 on its codes, against its exact full-dimension top 10 among all rows, for held-out and trained rows.
sparse: whether a fit whose sample is too sparse to hold rows' near neighbours (20,000 of 1M rows in
clusters of 100) would do better knowing them: on compare.py's cached data (DIR holds base.npy, queries.npy,
truth.npy), the share of the queries' exact top 10 that an exact shortlist of S rows on 32-number codes holds,
for the raw prefix, the store's own fit, and principal directions blended with the differences between 1,000
sample rows and their true 10 nearest among all rows (found by exact search).
cost: what a fit costs next to the build, on MRL-like rows in a store: the build (adds, generation not
counted), ``tune``, the fit with its indexes over every row's codes (``fit_s``), and the projection alone
(Projection.fit on a sample of the rows, as tune draws it).
Writes benchmarks/results/fitted_codes.md (or --out).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

import mrlstore
from mrlstore.testing import mrl_like

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
K = 10


# -- photo sets ---------------------------------------------------------------------------------------------
def _zipped(path: Path, prefix: str = "") -> tuple[list[bytes], list[str]]:
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg") and n.startswith(prefix))
        return [z.read(n) for n in names], [n.split("/")[-2] for n in names]


def _photo_sets() -> dict[str, tuple[list, list[str]]]:
    demo = sorted((ROOT / "examples" / "images").glob("*/*.jpg"))
    sets: dict[str, tuple[list, list[str]]] = {"demo photos": ([str(p) for p in demo], [p.parent.name for p in demo])}
    if (SHARED / "caltech101-ood").exists():
        sets["caltech101-ood"] = _zipped(SHARED / "caltech101-ood" / "caltech101-ood.zip")
    if (SHARED / "cifar10").exists():
        sets["CIFAR-10 test"] = _zipped(SHARED / "cifar10" / "cifar10-jpg.zip", "test/")
    return sets


def encoded(work: Path, name: str, images: list, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    cache = work / f"{name.replace(' ', '_')}.npy"
    if not cache.exists():
        x = mrlstore.load_encoder().encode(images, progress=True)
        np.save(cache, x)
    return np.load(cache), np.asarray(labels)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top_others(scores_of, n: int, k: int, block: int = 2048, skip_self: bool = True) -> np.ndarray:
    """Per row, the best ``k`` other rows by ``scores_of(lo, hi)`` (a block of rows x all rows)."""
    out = np.empty((n, k), np.int64)
    for lo in range(0, n, block):
        s = scores_of(lo, min(lo + block, n)).astype(np.float64)
        part = _top_of(s, np.arange(lo, lo + len(s)) if skip_self else None, k)
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        out[lo : lo + len(s)] = np.take_along_axis(part, order, 1)
    return out


def map_at_k(found: np.ndarray, labels: np.ndarray) -> float:
    rel = labels[found] == labels[:, None]
    precision = np.cumsum(rel, axis=1) / np.arange(1, found.shape[1] + 1)
    return float(((precision * rel).sum(1) / np.maximum(rel.sum(1), 1)).mean())


def references(x: np.ndarray, d: int = 16) -> dict[str, np.ndarray]:
    """Exact leave-one-out top 10 by: the full vectors, the raw d-prefix, SVD-d and PCA-d of the same vectors."""
    u = _unit(x)
    raw = _unit(x[:, :d])
    svd = u @ np.linalg.svd(u, full_matrices=False)[2][:d].T
    mean = u.mean(0)
    pca = _unit((u - mean) @ np.linalg.svd(u - mean, full_matrices=False)[2][:d].T)
    n = len(x)
    return {
        "full": top_others(lambda a, b: u[a:b] @ u.T, n, K),
        "raw": top_others(lambda a, b: raw[a:b] @ raw.T, n, K),
        "svd": top_others(lambda a, b: svd[a:b] @ svd.T, n, K),
        "pca": top_others(lambda a, b: pca[a:b] @ pca.T, n, K),
    }


def store_top(store: mrlstore.Store, x: np.ndarray, **query) -> np.ndarray:
    """Leave-one-out top 10 of every stored row, through ``store.query``."""
    out = np.empty((len(x), K), np.int64)
    for lo in range(0, len(x), 1000):
        for i, hits in enumerate(store.query(x[lo : lo + 1000], k=K + 1, **query), start=lo):
            ids = [int(j) for j in hits.ids if int(j) != i][:K]
            out[i, : len(ids)] = ids
    return out


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), truth.tolist())]))


def photos(work: Path) -> list[str]:
    lines = [
        "## Photo sets: the bundled encoder's vectors",
        "",
        "| set | rows | kept | `[16]` mAP@10 store | raw 16 | SVD-16 | PCA-16 | 2048-d | store / best SVD | "
        "`[16, 2048]` sl 100 recall: store | raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (images, labels) in _photo_sets().items():
        x, y = encoded(work, name, images, labels)
        ref = references(x)
        path = work / "store.mrl"
        shutil.rmtree(path, ignore_errors=True)
        with mrlstore.open(path, dim=x.shape[1]) as store:
            store.add_vectors(x, ids=[str(i) for i in range(len(x))])
            kept = store.tune(recall=0.95).prefixes
            one = map_at_k(store_top(store, x, dims=[16]), y)
            raw_one = map_at_k(store_top(store, x, dims=[16], prefixes="raw"), y)
            funnel = overlap(store_top(store, x, dims=[16, x.shape[1]], shortlist=100), ref["full"])
            raw_funnel = overlap(store_top(store, x, dims=[16, x.shape[1]], shortlist=100, prefixes="raw"), ref["full"])
        maps = {key: map_at_k(found, y) for key, found in ref.items()}
        best = max(maps["svd"], maps["pca"])
        lines.append(
            f"| {name} | {len(x)} | {kept} | {one:.3f} | {raw_one:.3f} (exact {maps['raw']:.3f}) | {maps['svd']:.3f} | "
            f"{maps['pca']:.3f} | {maps['full']:.3f} | {one / best:.3f} | {funnel:.3f} | {raw_funnel:.3f} |"
        )
        print(lines[-1], flush=True)
    return lines


# -- vectors without prefix structure -----------------------------------------------------------------------
def rotated(work: Path, n: int, n_queries: int, dim: int) -> list[str]:
    base, _ = mrl_like(n, dim, seed=7)
    queries, _ = mrl_like(n_queries, dim, seed=7, sample=1)
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((dim, dim)))[0].astype(np.float32)
    unit_base = _unit(base.astype(np.float16).astype(np.float32))  # the store holds float16
    truth = top_others(lambda a, b: _unit(queries[a:b]) @ unit_base.T, n_queries, K, skip_self=False)
    lines = [
        f"## {n:,} MRL-like {dim}-d vectors, and the same under a random rotation ({n_queries} held-out queries)",
        "",
        "| store | tuned | prefixes | fit + indexes s | build s | held-out recall@10 | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for label, (b, q) in {"unrotated": (base, queries), "rotated": (base @ rotation, queries @ rotation)}.items():
        path = work / f"{label}.mrl"
        shutil.rmtree(path, ignore_errors=True)
        with mrlstore.open(path, dim=dim) as store:
            t0 = time.perf_counter()
            store.add_vectors(b, ids=[str(i) for i in range(n)])
            build = time.perf_counter() - t0
            choice = store.tune(recall=0.95)
            found, times = timed(lambda v: [int(i) for i in store.query(v, k=K).ids], q)
        r = overlap(np.asarray(found), truth)
        results[label] = (r, float(np.percentile(times, 50)))
        fit = "-" if choice.fit_s is None else f"{choice.fit_s:.1f}"
        lines.append(
            f"| {label} | {choice.dims} sl {choice.shortlist} | {choice.prefixes} | {fit} | {build:.1f} | {r:.3f} | "
            f"{np.percentile(times, 50):.3f} | {np.percentile(times, 99):.3f} |"
        )
        print(lines[-1], flush=True)
    lines += hnswlib_rows(base @ rotation, queries @ rotation, truth, results)
    return lines


def timed(search, queries: np.ndarray) -> tuple[list, np.ndarray]:
    search(queries[0])
    found, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        found.append(search(q))
        times.append(1e3 * (time.perf_counter() - t0))
    return found, np.asarray(times)


def hnswlib_rows(base: np.ndarray, queries: np.ndarray, truth: np.ndarray, results: dict) -> list[str]:
    import hnswlib

    t0 = time.perf_counter()
    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=16, ef_construction=200)
    index.add_items(base, np.arange(len(base)), num_threads=-1)
    build = time.perf_counter() - t0
    lines = ["", f"hnswlib over all {base.shape[1]} dims (M=16, ef_construction=200; build {build:.1f} s):", ""]
    lines += ["| ef | recall@10 | p50 ms |", "|---|---|---|"]
    curve = []
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        index.set_ef(ef)
        found, times = timed(lambda v: index.knn_query(v, k=K, num_threads=1)[0][0].tolist(), queries)
        curve.append((overlap(np.asarray(found), truth), float(np.percentile(times, 50)), ef))
        lines.append(f"| {ef} | {curve[-1][0]:.3f} | {curve[-1][1]:.3f} |")
    lines.append("")
    unrot_p50 = results["unrotated"][1]
    rot_recall, rot_p50 = results["rotated"]
    equal = [c for c in curve if c[0] >= rot_recall]
    lines.append(f"- rotated store p50 / unrotated store p50: {rot_p50 / unrot_p50:.2f} (target at most 1.25)")
    if equal:
        lines.append(
            f"- rotated store p50 / hnswlib p50 at recall >= {rot_recall:.3f} (ef={equal[0][2]}): "
            f"{rot_p50 / equal[0][1]:.2f} (target below 1)"
        )
    else:
        lines.append(f"- hnswlib reached no recall >= {rot_recall:.3f} up to ef=256")
    return lines


def coverage(work: Path, n: int, dim: int) -> list[str]:
    from mrlstore.tiers.projection import FIT_SAMPLE_ROWS, Projection

    sets = {name: encoded(work, name, images, labels)[0] for name, (images, labels) in _photo_sets().items()}
    sets[f"MRL-like {n:,} x {dim}"] = mrl_like(n, dim, seed=7)[0]
    lines = ["## Exact shortlists on each code: share of the full-dimension top 10 they hold", ""]
    lines += ["| vectors | k | S | raw k-prefix | fitted k-code |", "|---|---|---|---|---|"]
    for name, x in sets.items():
        x = x.astype(np.float16).astype(np.float32)  # as stored
        rng = np.random.default_rng(0)
        queries = np.sort(rng.choice(len(x), size=min(1000, len(x)), replace=False))
        sample = np.sort(rng.choice(len(x), size=min(FIT_SAMPLE_ROWS, len(x)), replace=False))
        fit = Projection.fit(x[sample], 32, "cosine", judge_at=(16, 32), store_rows=len(x))  # as a store fits
        u = _unit(x)
        truth = _top_of(u[queries] @ u.T, queries, K)
        for k in (16, 32):
            raw, codes = _unit(x[:, :k]), _unit(fit.codes(x, k))
            for S in (50, 100):
                got = [
                    _held(raw[queries] @ raw.T, queries, S, truth),
                    _held(codes[queries] @ codes.T, queries, S, truth),
                ]
                lines.append(f"| {name} | {k} | {S} | {got[0]:.3f} | {got[1]:.3f} |")
                print(lines[-1], flush=True)
    return lines


def ceiling(work: Path) -> list[str]:
    from mrlstore.tiers.projection import Projection

    lines = ["## How far a 16-number code goes: exact shortlist of 100, share of the full top 10 it holds", ""]
    lines += ["| vectors | code | held-out rows | trained rows | train s |", "|---|---|---|---|---|"]
    for name, (images, labels) in _photo_sets().items():
        x = _unit(encoded(work, name, images, labels)[0].astype(np.float16).astype(np.float32))
        rng = np.random.default_rng(0)
        held = np.sort(rng.choice(len(x), size=min(1000, len(x) // 5), replace=False))
        trained = np.setdiff1d(np.arange(len(x)), held)
        truth = _top_of(x @ x.T, np.arange(len(x)), K)
        t0 = time.perf_counter()
        fit = Projection.fit(x[trained], 16, "cosine", judge_at=(16,), store_rows=len(x))
        codes = {"the store's fit (Projection.fit)": (_unit(fit.codes(x, 16)), time.perf_counter() - t0)}
        codes |= _trained_codes(x, trained)
        for label, (c, seconds) in codes.items():
            got = [_held(c[rows] @ c.T, rows, 100, truth[rows]) for rows in (held, trained)]
            lines.append(f"| {name} | {label} | {got[0]:.3f} | {got[1]:.3f} | {seconds:.0f} |")
            print(lines[-1], flush=True)
    return lines


def _trained_codes(x: np.ndarray, rows: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """16-number codes of every row of ``x`` (unit rows) from maps trained on ``rows`` with torch."""
    import torch

    torch.manual_seed(0)
    data = torch.from_numpy(x)
    train = torch.from_numpy(rows)
    full = data[train] @ data[train].T
    full.fill_diagonal_(-torch.inf)  # a row is not its own neighbour
    mean = data[train].mean(0)
    start = torch.linalg.svd(data[train] - mean, full_matrices=False)[2][:16]  # principal directions

    def linear() -> torch.nn.Linear:
        layer = torch.nn.Linear(x.shape[1], 16)
        with torch.no_grad():
            layer.weight.copy_(start)
            layer.bias.copy_(-(mean @ start.T))
        return layer

    class Network(torch.nn.Module):  # the linear code plus a learned correction, zero at the start
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.hidden, self.out = linear(), torch.nn.Linear(x.shape[1], 256), torch.nn.Linear(256, 16)
            torch.nn.init.zeros_(self.out.weight)
            torch.nn.init.zeros_(self.out.bias)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.linear(z) + self.out(torch.relu(self.hidden(z)))

    out = {}
    for label, model, steps in (("linear, all dims", linear(), 200), ("linear + 256-unit network", Network(), 1000)):
        t0 = time.perf_counter()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(steps):
            batch = torch.randint(len(train), (256,))
            target = torch.softmax(full[batch] / 0.02, dim=1)
            codes = torch.nn.functional.normalize(model(data[train]), dim=1)
            own = torch.zeros_like(target, dtype=torch.bool)
            own[torch.arange(len(batch)), batch] = True
            logits = (codes[batch] @ codes.T / 0.04).masked_fill(own, -1e9)
            loss = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out[label] = (_unit(model(data).numpy()), time.perf_counter() - t0)
    return out


def sparse_sample(data: Path, k: int = 32) -> list[str]:
    from mrlstore.tiers.projection import BLENDS, FIT_SAMPLE_ROWS, Projection, _directions, _second_moment

    stored = np.load(data / "base.npy", mmap_mode="r")
    x = np.empty(stored.shape, np.float32)
    for lo in range(0, len(x), 100_000):
        x[lo : lo + 100_000] = _unit(stored[lo : lo + 100_000].astype(np.float32))
    queries, truth = _unit(np.load(data / "queries.npy").astype(np.float32)), np.load(data / "truth.npy")
    rng = np.random.default_rng(0)
    picked = np.sort(rng.choice(len(x), size=FIT_SAMPLE_ROWS, replace=False))
    sample = x[picked]
    fit = Projection.fit(sample, k, "cosine", judge_at=(16, k), store_rows=len(x))  # as tune fits
    near = []
    for lo in range(0, 1000, 100):  # the first 1,000 sample rows' true neighbours among all rows
        nearest = _top_of(sample[lo : lo + 100] @ x.T, picked[lo : lo + 100], K)
        near.append((sample[lo : lo + 100, None, :] - x[nearest]).reshape(-1, x.shape[1]))
    mean = sample.mean(axis=0)
    spread, differences = _second_moment(sample - mean), _second_moment(np.concatenate(near))
    codes = {"raw prefix": lambda v: v[:, :k], f"the store's fit (blend {fit.blend}, trained {fit.trained})": fit.codes}
    for blend in BLENDS:
        known = Projection("cosine", mean, _directions(spread, differences, blend, k, rng), blend)
        codes[f"true neighbours' differences, blend {blend}"] = known.codes
    sizes = (200, 400, 800, 1600, 3200)
    lines = [f"## A sparse sample: {len(x):,} rows, {k}-number codes, exact shortlists of S rows", ""]
    lines += ["| code | " + " | ".join(f"S={s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, code in codes.items():
        held = _shortlist_shares(code, x, queries, truth, k, sizes)
        lines.append(f"| {label} | " + " | ".join(f"{h:.3f}" for h in held) + " |")
        print(lines[-1], flush=True)
    return lines


def _shortlist_shares(code, x: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, sizes) -> list[float]:
    """The share of ``truth`` within each exact shortlist size on the ``k``-number ``code`` of the rows."""
    from mrlstore.tiers.projection import _in_shortlist

    rows = np.concatenate([_unit(code(x[lo : lo + 100_000])[:, :k]) for lo in range(0, len(x), 100_000)])
    scores = _unit(code(queries)[:, :k]) @ rows.T
    return [float(np.mean(_in_shortlist(scores, truth, s))) for s in sizes]


def fit_cost(work: Path, n: int, dim: int, rotate: bool) -> list[str]:
    from mrlstore.testing import mrl_like_blocks
    from mrlstore.tiers.projection import FIT_SAMPLE_ROWS, Projection, fit_width

    path = work / f"cost_{n}.mrl"
    shutil.rmtree(path, ignore_errors=True)
    picked = np.sort(np.random.default_rng(0).choice(n, size=min(FIT_SAMPLE_ROWS, n), replace=False))
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((dim, dim)))[0].astype(np.float32)
    sample, build, start = [], 0.0, 0
    with mrlstore.open(path, dim=dim) as store:
        for block, _ in mrl_like_blocks(n, dim, seed=7):
            block = block @ rotation if rotate else block
            stop = start + len(block)
            sample.append(block[picked[(picked >= start) & (picked < stop)] - start])
            t0 = time.perf_counter()
            store.add_vectors(block, ids=[str(i) for i in range(start, stop)])
            build += time.perf_counter() - t0
            start = stop
            print(f"added {stop:,} rows, {build:.0f} s", flush=True)
        t0 = time.perf_counter()
        choice = store.tune(recall=0.95)
        tune_s = time.perf_counter() - t0
        index_dims = store.info().index_dims
    rows = np.concatenate(sample).astype(np.float16).astype(np.float32)  # as stored
    t0 = time.perf_counter()
    fit = Projection.fit(rows, fit_width(index_dims, dim), "cosine", judge_at=index_dims, store_rows=n)
    projection_s = time.perf_counter() - t0
    fit_s = choice.fit_s or 0.0
    return [
        f"## What a fit costs: {n:,} MRL-like {dim}-d rows{' under a random rotation' if rotate else ''}",
        "",
        "| rows | build s | tune s | fit + fitted indexes s | projection s | kept | fit + indexes / build |"
        " projection / build |",
        "|---|---|---|---|---|---|---|---|",
        f"| {n:,} | {build:.1f} | {tune_s:.1f} | {fit_s:.1f} | "
        f"{projection_s:.1f} (blend {fit.blend}, trained {fit.trained}) | "
        f"{choice.prefixes} {choice.dims} | {fit_s / build:.3f} | {projection_s / build:.3f} |",
    ]


def _top_of(scores: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """Per row of ``scores``, its best ``k`` columns in no order, leaving out column ``own[row]`` (None: none)."""
    scores = scores.astype(np.float64)
    if own is not None:
        scores[np.arange(len(own)), own] = -np.inf
    return np.argpartition(-scores, k, axis=1)[:, :k]


def _held(scores: np.ndarray, own: np.ndarray, s: int, truth: np.ndarray) -> float:
    return overlap(_top_of(scores, own, s), truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part", choices=("photos", "rotated", "both", "coverage", "ceiling", "sparse", "cost"), default="both"
    )
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--data", type=Path, help="sparse: a compare.py data folder (base.npy, queries.npy, truth.npy)")
    ap.add_argument("--rotate", action="store_true", help="cost: the rows under a random rotation")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mrlstore-fitted"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fitted_codes.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Fitted codes",
        "",
        f"`python benchmarks/fitted_codes.py --part {args.part}` on {platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}, mrlstore {mrlstore.__version__}.",
        "",
    ]
    if args.part in ("photos", "both"):
        lines += photos(args.work) + [""]
    if args.part in ("rotated", "both"):
        lines += rotated(args.work, args.n, args.queries, args.dim)
    if args.part == "coverage":
        lines += coverage(args.work, args.n, args.dim)
    if args.part == "ceiling":
        lines += ceiling(args.work)
    if args.part == "sparse":
        lines += sparse_sample(args.data)
    if args.part == "cost":
        lines += fit_cost(args.work, args.n, args.dim, args.rotate)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
