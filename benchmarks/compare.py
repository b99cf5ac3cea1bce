"""Side by side, one machine, one run: mrlstore funnels against full-dimension search.

    pip install -e ".[bench]"
    python benchmarks/compare.py                       # synthetic N = 100k and 1M, then CIFAR-10 (hours)
    python benchmarks/compare.py --data 100000         # one data set (a size N, gentle<N> or cifar)
    python benchmarks/compare.py --data gentle100000 --systems mrlstore hnswlib faiss-hnsw
    python benchmarks/compare.py --data 1000000 --systems mrlstore hnswlib --full-max-n 1000000 --reuse-hnsw
        # hnswlib's 1M index loaded where an earlier --keep-hnsw run kept it (its build takes ~40 min)

Data: (a) ``mrlstore.testing.mrl_like`` (seeded; 100 clusters, dimension j scaled by (j+1)^-0.5, noise
1.0), dim 2048, 200 queries drawn independently from the same clusters (the stores tune on their own rows);
(a') ``gentle<N>``: a second generator, harder for prefixes: dim 1024, N/100 clusters of about 100 rows,
dimension j's variance scaled by (1 + j/16)^-1/2 (``spectrum="gentle"``), noise 1.0, queries as in (a);
(b) ``cifar``: CIFAR-10 embedded by the bundled encoder, database = the 50k training images, queries = 9,000
of the 10k test images (needs the feature cache of tools/train_encoder.py; mAP@10 by class too); the
other 1,000 (every 10th: they come sorted by class) are passed to ``tune(queries=...)``. Every system gets
the same float16-rounded vectors. Ground truth: exact top-10 by cosine on them. Full-dim HNSW builds are skipped above
``--full-max-n`` (100k by default: at 1M, hnswlib's build alone took 1,508 s on 2 cores; the committed
results add it with ``--data 1000000 --systems hnswlib --full-max-n 1000000``).

Systems (each runs in its own process, so its memory is measured alone):

- ``mrlstore`` (the defaults: float16 storage, HNSW on the 16-d prefix), ``mrlstore-f32`` (float32: twice
  the disk, no widening when re-ranking), ``mrlstore-16d`` (float16, HNSW on the 16-d prefix only, the
  default before 0.2) and ``mrlstore-wide`` (float16, HNSW on the 32- and 128-d prefixes: for data whose
  short prefixes shortlist badly): after ``tune(recall=0.95)``, the calls users make (``store.query(v)``,
  ``dims=[16, 2048]``, exact ``dims=[2048]``), timed with the hits' metadata read, and shortlist sweeps;
- ``hnswlib``: HNSW on the full 2048-d vectors (M=16, ef_construction=200; ef swept);
- ``faiss-hnsw``: FAISS ``IndexHNSWFlat`` on the full 2048-d vectors (same M and ef_construction);
- ``faiss-refine``: the paper's setup in FAISS: HNSW on the re-normalised 16-d prefix, then
  ``IndexRefineFlat`` re-ranks ``k_factor * k`` candidates with the full vectors (held in RAM);
- ``brute``: exact search at 2048-d (numpy float32 matmul over all vectors).

Measured: recall@10 against exact 2048-d search, p50/p99 single-query latency (one thread per query),
batch queries/s (all cores), build time (all cores), memory (anonymous resident memory: the heap the
system holds after build and queries, and its peak during build; file pages such as mrlstore's
memory-mapped re-rank tier are page cache and not counted), bytes on disk. Writes
``benchmarks/results/compare.md``, ``compare.json`` and PNG plots (recall against latency per N;
latency and memory against N).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from mrlstore.testing import mrl_like, mrl_like_blocks  # noqa: E402

DIM, K, M, EF_CONSTRUCTION = 2048, 10, 16, 200
SYSTEMS = (
    "mrlstore", "mrlstore-f32", "mrlstore-16d", "mrlstore-wide", "faiss-refine", "brute", "hnswlib", "faiss-hnsw"
)  # fmt: skip
FULL_DIM_GRAPHS = ("hnswlib", "faiss-hnsw")
ADD_BATCH = 65536
# Full-dimension HNSW beams: fine steps at the low end, so each baseline's fastest setting at a recall target
# is found (at 100k, ef=16 already reaches 0.97).
BASELINE_EFS = (10, 16, 24, 32, 48, 64, 80, 100, 150, 200, 400)
_DATA_LABELS: tuple[np.ndarray, np.ndarray] | None = None  # (database, query) labels of real data, per child
# Real data: every 10th test image (1,000 of CIFAR-10's 10,000, which come sorted by class) is held out of
# the measured queries and given to tune(queries=...), as a user with sample queries would (a store's own
# training images are not the queries it will get).
TUNE_HELD_OUT = 1000
_TUNE_QUERIES: np.ndarray | None = None
_KEEP_HNSW: Path | None = None  # --keep-hnsw: where hnswlib's built index is kept (for cold_query.py)
_REUSE_HNSW = False  # --reuse-hnsw: load the index an earlier --keep-hnsw run kept instead of building it


# -- data ---------------------------------------------------------------------------------------------
def data_dir(work: Path, name: str) -> Path:
    if name == "cifar":  # embeddings of one encoder: a new bundled encoder gets its own folder
        from mrlstore.encoder.bundled import bundled_weights_id

        return work / f"data_cifar_{(bundled_weights_id() or 'none')[:12]}"
    return work / f"data_{name}"


def prepare(work: Path, name: str, n_queries: int) -> Path:
    """base.npy (float16, n x dim), queries.npy (float32), truth.npy (exact top-10 rows), made once;
    ``name`` is a size N (synthetic data), gentle<N> (the second generator) or ``cifar`` (real embeddings,
    with labels)."""
    d = data_dir(work, name)
    if (d / "truth.npy").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    if name == "cifar":
        return prepare_cifar(d)
    n, generator = synthetic(name)
    dim = generator.get("dim", DIM)
    t0 = time.perf_counter()
    base = np.lib.format.open_memmap(d / "base.tmp.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    lo = 0
    for block, _ in mrl_like_blocks(n, noise=1.0, seed=0, block_rows=ADD_BATCH, **generator):
        base[lo : lo + len(block)] = block
        lo += len(block)
    base.flush()
    del base
    os.replace(d / "base.tmp.npy", d / "base.npy")
    queries, _ = mrl_like(n_queries, noise=1.0, seed=0, sample=1, **generator)
    np.save(d / "queries.npy", queries)
    np.save(d / "truth.npy", exact_topk(np.load(d / "base.npy", mmap_mode="r"), queries, K))
    print(f"prepared N={n:,} in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


def synthetic(name: str) -> tuple[int, dict]:
    """A synthetic data set's size and generator arguments."""
    if name.startswith("gentle"):
        n = int(name.removeprefix("gentle"))
        return n, {"dim": 1024, "n_clusters": max(1, n // 100), "spectrum": "gentle"}
    return int(name), {"dim": DIM}


def prepare_cifar(d: Path) -> Path:
    """CIFAR-10 embedded by the bundled encoder: database = the 50k training images, queries = the 10k test
    images (from ../shared/datasets/cifar10/)."""
    emb, labels, train = cifar_embeddings()
    np.save(d / "base.npy", emb[train].astype(np.float16))
    np.save(d / "queries.npy", emb[~train].astype(np.float32))
    np.save(d / "base_labels.npy", labels[train])
    np.save(d / "query_labels.npy", labels[~train])
    stored = np.load(d / "base.npy", mmap_mode="r")
    np.save(d / "truth.npy", exact_topk(stored, np.load(d / "queries.npy"), K))
    return d


def cifar_embeddings() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, labels, is-training-split). With the activation-map cache of tools/train_encoder.py
    (the frozen early blocks' output, as the encoder computes it) only the encoder's later blocks and
    projection run; without it the bundled encoder encodes all 60,000 images (about 10 minutes on 2 cores)."""
    import io
    import zipfile

    from PIL import Image
    from tqdm import tqdm

    import mrlstore
    from tools import train_encoder  # run as python -m benchmarks.compare from the repository root

    enc = mrlstore.load_encoder(device="cpu")
    cache = train_encoder.DEFAULT_CACHE
    if (cache / "index.json").exists() and len(list(cache.glob("maps_*.npz"))) * train_encoder.SHARD >= 60_000:
        data = train_encoder.load_cache(cache)
        return train_encoder.embed_model(enc.model, cache), data["labels"], data["train"]
    if not train_encoder.DEFAULT_ZIP.exists():
        sys.exit(f"CIFAR-10 not found at {train_encoder.DEFAULT_ZIP} (see ../shared/datasets/cifar10/README.md)")
    index = train_encoder.cifar_index(train_encoder.DEFAULT_ZIP)
    out = []
    with zipfile.ZipFile(train_encoder.DEFAULT_ZIP) as z:
        for lo in tqdm(range(0, len(index), 500), desc="encode CIFAR-10", unit="500 images"):
            arrays = [
                np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB")) for _, name, _ in index[lo : lo + 500]
            ]
            out.append(enc.encode(arrays, batch_size=100, progress=False))
    labels = np.array([label for _, _, label in index])
    train = np.array([split == "train" for split, _, _ in index])
    return np.concatenate(out), labels, train


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k rows per query over a (memory-mapped) base, block by block."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), k), dtype=np.int64)
    for lo, x in normalized_blocks(base):
        s = q @ x.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + lo], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def normalized_blocks(base: np.ndarray):
    for lo in range(0, len(base), ADD_BATCH):
        x = np.asarray(base[lo : lo + ADD_BATCH], dtype=np.float32)
        yield lo, x / np.linalg.norm(x, axis=1, keepdims=True)


# -- measuring ------------------------------------------------------------------------------------------
def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Samples anonymous RSS every 20 ms in a thread; ``peak`` is the largest growth over the start."""

    def __init__(self) -> None:
        self.start = rss_anon_mib()
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_mib() - self.start)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mib() - self.start)
        return self.peak


def du_mib(path: Path) -> float:
    """MiB the files under ``path`` occupy on disk: blocks (chunk files are sparse), a hard-linked file once
    (a reader's cache links its near chunks into each version's copy)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    blocks = {st.st_ino: st.st_blocks for st in (f.stat() for f in files)}
    return sum(blocks.values()) * 512 / 2**20


def recall(found: list, truth: np.ndarray) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / len(t) for f, t in zip(found, truth)]))


def map_at_k(found: list, base_labels: np.ndarray, query_labels: np.ndarray) -> float:
    """mAP@10 with relevance = same class; every class has more than 10 database items."""
    ap = []
    for f, ql in zip(found, query_labels):
        rel = (base_labels[np.asarray(f, dtype=np.int64)[:K]] == ql).astype(float)
        ap.append(float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / K))
    return float(np.mean(ap))


def measure(
    name: str, single, batch, queries: np.ndarray, truth: np.ndarray, latency_queries: int, labels=None
) -> dict:
    """Recall and single-query latency over the first ``latency_queries`` queries, batch q/s over all;
    mAP@10 too when the data has labels."""
    single(queries[0])  # warm-up
    times, found = [], []
    for q in queries[:latency_queries]:
        t0 = time.perf_counter()
        found.append(single(q))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    batch_found = batch(queries)
    qps = len(queries) / (time.perf_counter() - t0)
    ms = 1e3 * np.array(times)
    labels = labels if labels is not None else _DATA_LABELS
    extra = {"map10": map_at_k(batch_found, *labels)} if labels is not None else {}
    return {
        **extra,
        "setting": name,
        "recall": recall(batch_found, truth),
        "recall_single": recall(found, truth[:latency_queries]),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "qps": qps,
    }


# -- the systems (each in a child process) ------------------------------------------------------------------
def add_rows(store, base: np.ndarray, labels: np.ndarray) -> None:
    """``base`` into ``store`` as compare.py's stores get it: ids "0".., a ``label`` column, ADD_BATCH at a time."""
    import pyarrow as pa

    for lo in range(0, len(base), ADD_BATCH):
        hi = min(len(base), lo + ADD_BATCH)
        meta = pa.table({"label": pa.array(labels[lo:hi].astype(str))})
        store.add_vectors(base[lo:hi], ids=[str(i) for i in range(lo, hi)], metadata=meta)


def run_mrlstore(
    base, queries, truth, work: Path, lq: int, dtype: str = "float16", index_dims: tuple[int, ...] | None = None
) -> dict:
    """A default store (or a variant), with one metadata column; the calls users make, timed with metadata."""
    import pyarrow as pa

    import mrlstore

    path = work / "mrlstore_store"
    warm = work / "mrlstore_warm"  # load every engine before the memory baseline: count the data, not imports
    shutil.rmtree(warm, ignore_errors=True)
    dim = base.shape[1]
    with mrlstore.open(warm, dim=dim) as tiny:
        tiny.add_vectors(np.asarray(base[:300], dtype=np.float32), metadata=pa.table({"label": ["x"] * 300}))
        _ = tiny.query(queries[0], k=K).metadata
    shutil.rmtree(warm)
    shutil.rmtree(path, ignore_errors=True)
    labels = _DATA_LABELS[0] if _DATA_LABELS is not None else np.arange(len(base)) % 100
    mem = PeakMemory()
    t0 = time.perf_counter()
    store = mrlstore.open(path, dim=dim, dtype=dtype, index_dims=index_dims)
    add_rows(store, base, labels)
    store.checkpoint()
    build = time.perf_counter() - t0
    peak = mem.stop()
    t0 = time.perf_counter()
    tuned = store.tune(
        recall=0.95, k=K, queries=_TUNE_QUERIES, sample=TUNE_HELD_OUT if _TUNE_QUERIES is not None else 200
    )
    tune_s = time.perf_counter() - t0
    d0 = store.index_dims[-1]
    settings = [
        (
            f"default query(v) (tuned {tuned['dims']} shortlist {tuned['shortlist']}"
            f"{', tapered' if tuned.get('taper', 1) > 1 else ''}, {tune_s:.0f} s tune)",
            {},
        ),  # fmt: skip
        (f"dims=[16, {dim}] (tuned shortlist)", dict(dims=[16, dim])),
        (f"dims=[{dim}] (exact)", dict(dims=[dim])),
    ]
    settings += [(f"[{d0}, {dim}] shortlist {n}", dict(dims=[d0, dim], shortlist=n)) for n in (50, 100, 200, 400)]
    if d0 != 16:
        settings += [(f"[16, {dim}] shortlist {n}", dict(dims=[16, dim], shortlist=n)) for n in (200, 400, 800)]
    rows = []
    for name, kw in settings:

        def single(q, kw=kw):
            hits = store.query(q, k=K, **kw)
            _ = hits.metadata  # the caller reads the hits' metadata: it is part of the call
            return [int(i) for i in hits.ids]

        def batch(qs, kw=kw):
            return [[int(i) for i in h.ids] for h in store.query(qs, k=K, **kw)]

        exact = "exact" in name
        rows.append(measure(name, single, batch, queries, truth, max(10, lq // 10) if exact else lq))
    held = rss_anon_mib() - mem.start
    store.close()
    return {
        "build_s": build, "peak_mib": peak, "held_mib": held, "disk_mib": du_mib(path), "rows": rows,
        "tuned": {k: v for k, v in tuned.items() if k != "tried"},
    }  # fmt: skip


def run_brute(base, queries, truth, work: Path, lq: int) -> dict:
    mem = PeakMemory()
    t0 = time.perf_counter()
    x = np.empty(base.shape, dtype=np.float32)
    for lo, block in normalized_blocks(base):
        x[lo : lo + len(block)] = block
    build = time.perf_counter() - t0
    peak = mem.stop()

    def single(q):
        s = x @ (q / np.linalg.norm(q))
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]

    def batch(qs):
        out = []
        for lo in range(0, len(qs), 256):  # bounded (N x 256) score blocks
            s = x @ (qs[lo : lo + 256] / np.linalg.norm(qs[lo : lo + 256], axis=1, keepdims=True)).T
            top = np.argpartition(-s, K, axis=0)[:K]
            order = np.argsort(-np.take_along_axis(s, top, 0), axis=0)
            out += list(np.take_along_axis(top, order, 0).T)
        return out

    rows = [measure("numpy float32 matmul", single, batch, queries, truth, lq)]
    held = rss_anon_mib() - mem.start
    return {"build_s": build, "peak_mib": peak, "held_mib": held, "disk_mib": base.size * 4 / 2**20, "rows": rows}


def run_hnswlib(base, queries, truth, work: Path, lq: int) -> dict:
    import hnswlib

    mem = PeakMemory()
    t0 = time.perf_counter()
    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    kept = _KEEP_HNSW.with_suffix(".json") if _KEEP_HNSW is not None else None  # the build's figures
    reused = _REUSE_HNSW and kept is not None and kept.exists() and _KEEP_HNSW.exists()
    if reused:
        index.load_index(str(_KEEP_HNSW), max_elements=len(base))
        if index.get_current_count() != len(base):
            sys.exit(f"{_KEEP_HNSW} holds {index.get_current_count()} rows, the data {len(base)}")
    else:
        index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION)
        for lo, block in normalized_blocks(base):
            index.add_items(block, np.arange(lo, lo + len(block)), num_threads=-1)
    build = time.perf_counter() - t0
    peak = mem.stop()
    if reused:
        loaded_s, built = build, json.loads(kept.read_text())
        build, peak, disk = built["build_s"], built["peak_mib"], du_mib(_KEEP_HNSW)
    else:
        index.save_index(str(work / "full.hnsw"))
        disk = du_mib(work / "full.hnsw")
        if _KEEP_HNSW is not None:
            os.replace(work / "full.hnsw", _KEEP_HNSW)
            kept.write_text(json.dumps({"build_s": build, "peak_mib": peak}))
        else:
            (work / "full.hnsw").unlink()
    rows = []
    for ef in BASELINE_EFS:
        index.set_ef(ef)
        rows.append(
            measure(
                f"ef={ef}",
                lambda q: index.knn_query(q, k=K, num_threads=1)[0][0],
                lambda qs: list(index.knn_query(qs, k=K, num_threads=-1)[0]),
                queries,
                truth,
                lq,
            )
        )
    held = rss_anon_mib() - mem.start
    out = {"build_s": build, "peak_mib": peak, "held_mib": held, "disk_mib": disk, "rows": rows}
    return out | ({"loaded_s": loaded_s} if reused else {})


def _faiss():
    try:
        import faiss
    except ImportError:
        sys.exit("faiss-cpu is not installed: pip install -e '.[bench]'")
    return faiss


def _faiss_rows(faiss, index, queries, truth, lq, settings) -> list[dict]:
    cores = os.cpu_count() or 1
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows = []
    for name, apply in settings:
        apply()

        def single(q):
            return index.search(q[None, :], K)[1][0]

        def batch(qs):
            faiss.omp_set_num_threads(cores)
            try:
                return list(index.search(np.ascontiguousarray(qs), K)[1])
            finally:
                faiss.omp_set_num_threads(1)

        faiss.omp_set_num_threads(1)
        rows.append(measure(name, single, batch, qn.astype(np.float32), truth, lq))
    faiss.omp_set_num_threads(cores)
    return rows


def run_faiss_hnsw(base, queries, truth, work: Path, lq: int) -> dict:
    faiss = _faiss()
    mem = PeakMemory()
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(base.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    for _, block in normalized_blocks(base):
        index.add(block)
    build = time.perf_counter() - t0
    peak = mem.stop()
    faiss.write_index(index, str(work / "faiss.index"))
    disk = du_mib(work / "faiss.index")
    (work / "faiss.index").unlink()

    def ef(v):
        return lambda: setattr(index.hnsw, "efSearch", v)

    rows = _faiss_rows(faiss, index, queries, truth, lq, [(f"efSearch={v}", ef(v)) for v in BASELINE_EFS])
    held = rss_anon_mib() - mem.start
    return {"build_s": build, "peak_mib": peak, "held_mib": held, "disk_mib": disk, "rows": rows}


def run_faiss_refine(base, queries, truth, work: Path, lq: int) -> dict:
    """16-d prefix HNSW (re-normalised prefix, inner product = cosine), IndexRefineFlat on the full vectors."""
    faiss = _faiss()
    prefix = 16
    mem = PeakMemory()
    t0 = time.perf_counter()
    graph = faiss.IndexHNSWFlat(prefix, 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = EF_CONSTRUCTION
    pre = faiss.IndexPreTransform(faiss.NormalizationTransform(prefix, 2.0), graph)
    pre.prepend_transform(faiss.RemapDimensionsTransform(base.shape[1], prefix, False))  # keep the first 16 numbers
    index = faiss.IndexRefineFlat(pre)
    for _, block in normalized_blocks(base):
        index.add(block)
    build = time.perf_counter() - t0
    peak = mem.stop()
    keep = (graph, pre)  # noqa: F841 - the SWIG wrappers must outlive the composite index

    def shortlist(n):
        def apply():
            index.k_factor = n / K
            graph.hnsw.efSearch = max(n, 64)

        return apply

    settings = [(f"16-d HNSW, refine shortlist {n}", shortlist(n)) for n in (100, 200, 400, 800)]
    rows = _faiss_rows(faiss, index, queries, truth, lq, settings)
    held = rss_anon_mib() - mem.start
    return {"build_s": build, "peak_mib": peak, "held_mib": held, "disk_mib": float("nan"), "rows": rows}


RUNNERS = {
    "mrlstore": run_mrlstore,
    "mrlstore-f32": lambda *a: run_mrlstore(*a, dtype="float32"),
    "mrlstore-16d": lambda *a: run_mrlstore(*a, index_dims=(16,)),
    "mrlstore-wide": lambda *a: run_mrlstore(*a, index_dims=(32, 128)),
    "brute": run_brute,
    "hnswlib": run_hnswlib,
    "faiss-hnsw": run_faiss_hnsw,
    "faiss-refine": run_faiss_refine,
}


def child(
    system: str, name: str, work: Path, latency_queries: int, keep_hnsw: bool = False, reuse_hnsw: bool = False
) -> None:
    global _DATA_LABELS, _KEEP_HNSW, _REUSE_HNSW
    d = data_dir(work, name)
    _KEEP_HNSW = d / "hnswlib.hnsw" if keep_hnsw or reuse_hnsw else None
    _REUSE_HNSW = reuse_hnsw
    base = np.load(d / "base.npy", mmap_mode="r")
    global _TUNE_QUERIES
    queries, truth = np.load(d / "queries.npy"), np.load(d / "truth.npy")
    if (d / "base_labels.npy").exists():
        held = np.arange(len(queries)) % (len(queries) // TUNE_HELD_OUT) == 0
        _DATA_LABELS = (np.load(d / "base_labels.npy"), np.load(d / "query_labels.npy")[~held])
        _TUNE_QUERIES = queries[held]
        queries, truth = queries[~held], truth[~held]
    out = RUNNERS[system](base, queries, truth, work, latency_queries)
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent -----------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "unknown CPU"
    )
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0) / 2**20
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def data_name(value: str) -> str:
    if value != "cifar" and not value.removeprefix("gentle").isdigit():
        raise argparse.ArgumentTypeError("a data set is a size N (synthetic), gentle<N> or 'cifar'")
    return value


def data_rows(work: Path, name: str) -> int:
    return len(np.load(data_dir(work, name) / "base.npy", mmap_mode="r"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=data_name, nargs="+", default=["100000", "1000000", "cifar"])
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries; latency is timed on this many")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument(
        "--full-max-n", type=int, default=100_000, help="largest N for full-dim HNSW builds (slow on 2 cores)"
    )
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report", action="store_true", help="only re-render the report from compare.json")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument(
        "--keep-hnsw", action="store_true", help="keep hnswlib's index in the data folder (cold_query.py loads it)"
    )
    ap.add_argument(
        "--reuse-hnsw",
        action="store_true",
        help="load hnswlib's index kept by an earlier --keep-hnsw run instead of building it (its build time and "
        "peak memory are then that run's, kept beside it); built and kept where there is none",
    )
    args = ap.parse_args()
    if args.report:
        report(json.loads((args.out / "compare.json").read_text()), args.out)
        return
    if args.child:
        child(args.child, args.data[0], args.work, args.queries, args.keep_hnsw, args.reuse_hnsw)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "compare.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.data:
        prepare(args.work, name, args.queries)
        n = data_rows(args.work, name)
        for system in args.systems:
            if system in FULL_DIM_GRAPHS and n > args.full_max_n:
                print(f"{name} {system}: skipped (full-dim HNSW build beyond --full-max-n)", flush=True)
                continue
            # Exact search at 1M costs ~1 s a query: time a quarter of the queries one by one.
            lq = args.queries if system != "brute" or n <= 200_000 else max(20, args.queries // 4)
            print(f"{name} (N={n:,}) {system} ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", system, "--data", name, "--work", str(args.work)]
                + ["--queries", str(lq)]
                + (["--keep-hnsw"] if args.keep_hnsw else [])
                + (["--reuse-hnsw"] if args.reuse_hnsw else []),
                capture_output=True,
                text=True,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:  # recorded, and the other systems still run
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                results.setdefault(name, {})[system] = {"failed": why, "rows": [], "n": n}
                results_file.write_text(json.dumps(results, indent=1))
                continue
            res = json.loads(lines[-1][len("RESULT ") :])
            res["wall_s"], res["n"] = time.perf_counter() - t0, n
            results.setdefault(name, {})[system] = res
            for r in res["rows"]:
                print(
                    f"  {r['setting']}: recall {r['recall']:.3f} p50 {r['p50_ms']:.2f} ms "
                    f"p99 {r['p99_ms']:.2f} ms {r['qps']:.0f} q/s"
                    + (f" mAP@10 {r['map10']:.3f}" if "map10" in r else ""),
                    flush=True,
                )
            print(f"  build {res['build_s']:.1f} s, held {res['held_mib']:.0f} MiB, peak {res['peak_mib']:.0f} MiB")
            args.out.mkdir(parents=True, exist_ok=True)
            results["machine"] = machine()
            results_file.write_text(json.dumps(results, indent=1))
    report(results, args.out)


# -- the report -------------------------------------------------------------------------------------------------
LABELS = {
    "mrlstore": "mrlstore (float16)",
    "mrlstore-f32": "mrlstore (float32)",
    "mrlstore-16d": "mrlstore (float16, 16-d index only)",
    "mrlstore-wide": "mrlstore (float16, 32- and 128-d indexes)",
    "faiss-refine": "FAISS 16-d HNSW + IndexRefineFlat",
    "brute": "exact brute force, all dims",
    "hnswlib": "hnswlib HNSW, all dims",
    "faiss-hnsw": "FAISS IndexHNSWFlat, all dims",
}


def best_at(res: dict, target: float = 0.95) -> dict | None:
    """The fastest (p50) setting of a system that reaches the recall target."""
    ok = [r for r in res["rows"] if r["recall"] >= target]
    return min(ok, key=lambda r: r["p50_ms"]) if ok else None


def dataset_order(results: dict) -> list[str]:
    names = [k for k in results if k != "machine"]
    return (
        sorted((k for k in names if k.isdigit()), key=int)
        + sorted((k for k in names if k.startswith("gentle")), key=lambda k: int(k.removeprefix("gentle")))
        + [k for k in names if not k.isdigit() and not k.startswith("gentle")]
    )


def title(name: str, res: dict) -> str:
    n = next(iter(res.values()))["n"] if res else 0
    if name == "cifar":
        return (
            f"CIFAR-10 embedded by the bundled encoder (N = {n:,} training images, 9,000 test queries; "
            f"tuned on the other {TUNE_HELD_OUT:,} test images)"
        )
    if name.startswith("gentle"):
        return f"Synthetic, second generator (1024-d, {n // 100:,} clusters, gentle spectrum), N = {n:,}"
    return f"Synthetic MRL-like vectors, N = {n:,}"


def report(results: dict, out: Path) -> None:
    names = dataset_order(results)
    lines = [
        "# mrlstore against full-dimension search",
        "",
        f"Machine: {results.get('machine', 'unknown')}. Command: `python benchmarks/compare.py` "
        "(see its docstring for the data and the systems). k=10, cosine, float16-rounded vectors (2048-d; "
        "the second generator's 1024-d). "
        "Latency: one query at a time, one thread; batch: all queries in one call, all cores.",
        "Memory: anonymous resident memory held after build and queries (peak during build in brackets); "
        "mrlstore's re-rank tier is memory-mapped files (page cache, not counted).",
    ]
    for name in names:
        res_all = results[name]
        has_map = any("map10" in r for res in res_all.values() for r in res["rows"])
        lines += [
            "",
            f"## {title(name, res_all)}",
            "",
            "| system | setting | recall@10 |"
            + (" mAP@10 |" if has_map else "")
            + " p50 ms | p99 ms | batch q/s | build s | memory MiB | disk MiB |",
            "|---|---|---|" + ("---|" if has_map else "") + "---|---|---|---|---|---|",
        ]
        for system in SYSTEMS:
            res = res_all.get(system)
            if res is None:
                continue
            for r in res["rows"]:
                lines.append(
                    f"| {LABELS[system]} | {r['setting']} | {r['recall']:.3f} | "
                    + (f"{r.get('map10', float('nan')):.3f} | " if has_map else "")
                    + f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['qps']:.0f} | {res['build_s']:.1f} | "
                    f"{res['held_mib']:.0f} ({res['peak_mib']:.0f}) | {res['disk_mib']:.0f} |"
                )
        lines += ["", *targets(res_all, name)]
        loaded = [s for s in SYSTEMS if "loaded_s" in res_all.get(s, {})]
        for s in loaded:
            lines += [
                f"{LABELS[s]}: its index was loaded in {res_all[s]['loaded_s']:.0f} s (`--reuse-hnsw`); build time "
                "and peak memory are those of the earlier run that built and kept it.",
                "",
            ]
        failed = [f"{LABELS[s]} ({res_all[s]['failed']})" for s in SYSTEMS if "failed" in res_all.get(s, {})]
        if failed:
            lines += [f"Failed on this data: {'; '.join(failed)}.", ""]
        missing = [LABELS[s] for s in SYSTEMS if s not in res_all]
        if missing:
            lines += [f"Not run on this data (not asked for, or full-dim HNSW past its N limit): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    print(text)
    plot(results, names, out)


def targets(res: dict, name: str) -> list[str]:
    """The issue's targets, as ratios against the baselines of the same run (lower is better for each)."""
    out = []
    for system in ("mrlstore", "mrlstore-f32", "mrlstore-16d", "mrlstore-wide"):
        if system in res:
            out += _targets(res, system, name)
    return out


def _row(res: dict, prefix: str) -> dict | None:
    return next((r for r in res["rows"] if r["setting"].startswith(prefix)), None)


def fastest_at(res: dict, recall_floor: float) -> dict | None:
    """A baseline's fastest setting (p50) whose recall is at least ``recall_floor`` (equal recall)."""
    ok = [r for r in res["rows"] if r["recall"] >= recall_floor - 1e-9]
    return min(ok, key=lambda r: r["p50_ms"]) if ok else None


def _ratio_line(what: str, mine: float, theirs: float, unit: str, target: float | None, higher: bool = False) -> str:
    """``mine / theirs`` against the issue's target ratio (``higher``: the ratio must reach the target)."""
    r = mine / theirs
    if target is None:
        return f"- {what}: {mine:.2f} / {theirs:.2f} {unit} = {r:.3f} (no target; for comparison)"
    ok = r >= target if higher else r <= target
    sign = ">=" if higher else "<="
    return (
        f"- {what}: {mine:.2f} / {theirs:.2f} {unit} = {r:.3f} (target {sign} {target:g}: {'met' if ok else 'NOT met'})"
    )


def _targets(res: dict, system: str, name: str) -> list[str]:
    m = res[system]
    default = _row(m, "default")
    if default is None:
        return []
    big = name != "cifar" and synthetic(name)[0] >= 1_000_000
    out = [f"Targets, {LABELS[system]}: the default call `store.query(v)` reaches recall@10 "
           f"{default['recall']:.3f} at p50 {default['p50_ms']:.3f} ms:", ""]  # fmt: skip
    if default["recall"] < 0.95:
        out.append(f"- default recall {default['recall']:.3f} is below the 0.95 target: NOT met")
    for base, label, limit in (
        ("hnswlib", "hnswlib HNSW, all dims", 0.25 if big else 0.5),
        ("faiss-hnsw", "FAISS HNSW, all dims", None),
    ):
        if base in res and (b := fastest_at(res[base], default["recall"])):
            out.append(_ratio_line(f"default p50 / {label} {b['setting']} (recall {b['recall']:.3f})",
                                   default["p50_ms"], b["p50_ms"], "ms", limit))  # fmt: skip
    paper = _row(m, "dims=[16, ")
    if paper is not None and paper["recall"] < 0.95:
        out.append(f"- {paper['setting']} recall {paper['recall']:.3f} is below the 0.95 it was tuned for: NOT met")
    if paper is not None and "hnswlib" in res and (b := fastest_at(res["hnswlib"], 0.95)):
        call = paper["setting"].split(" (")[0]
        out.append(_ratio_line(f"{call} p50 (recall {paper['recall']:.3f}) / hnswlib {b['setting']}",
                               paper["p50_ms"], b["p50_ms"], "ms", None if big else 2.5))  # fmt: skip
    if "brute" in res:
        brute = res["brute"]["rows"][0]
        if big:
            out.append(_ratio_line("default p50 / brute force", default["p50_ms"], brute["p50_ms"], "ms", 0.01))
        exact = next((r for r in m["rows"] if r["setting"].endswith("(exact)")), None)
        if exact is not None:
            call = exact["setting"].split(" (")[0]
            out.append(_ratio_line(f"exact {call} p50 (recall {exact['recall']:.3f}) / numpy float32 brute force",
                                   exact["p50_ms"], brute["p50_ms"], "ms", 1.5))  # fmt: skip
    if "faiss-hnsw" in res and (f := fastest_at(res["faiss-hnsw"], default["recall"])):
        out.append(_ratio_line(f"default batch q/s / FAISS IndexHNSWFlat {f['setting']} (recall {f['recall']:.3f})",
                               default["qps"], f["qps"], "q/s", 1.0, higher=True))  # fmt: skip
    if "hnswlib" in res:
        h = res["hnswlib"]
        out.append(_ratio_line("memory / hnswlib all dims", m["held_mib"], h["held_mib"], "MiB", 0.1 if big else 0.2))
        out.append(_ratio_line("build time / hnswlib all dims", m["build_s"], h["build_s"], "s", 0.1))
    return out + [""]


def plot(results: dict, names: list[str], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    markers = dict(zip(SYSTEMS, "oPX*sD^v"))
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for system in SYSTEMS:
            res = results[name].get(system)
            if res and res["rows"]:  # a failed system has none
                rs = sorted(res["rows"], key=lambda r: r["p50_ms"])
                front = [r for i, r in enumerate(rs) if all(r["recall"] > q["recall"] for q in rs[:i])]
                (line,) = ax.plot(
                    [r["p50_ms"] for r in front], [r["recall"] for r in front], marker=markers[system],
                    label=LABELS[system],
                )  # fmt: skip
                ax.scatter([r["p50_ms"] for r in rs], [r["recall"] for r in rs], marker=markers[system],
                           color=line.get_color(), alpha=0.35, s=14)  # fmt: skip
                default = _row(res, "default")
                if default is not None:  # the call users make, starred
                    ax.scatter([default["p50_ms"]], [default["recall"]], marker="*", s=220, color=line.get_color(),
                               edgecolors="black", zorder=5)  # fmt: skip
        ax.axhline(0.95, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("p50 single-query latency (ms, log); line: fastest settings, star: store.query(v)")
        ax.set_ylabel("recall@10 vs exact, all dims")
        n = next(iter(results[name].values()))["n"]
        ax.set_title(f"CIFAR-10, N = {n:,}" if name == "cifar" else f"{name}, N = {n:,}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare_recall_latency.png", dpi=120)
    sizes = [name for name in names if name.isdigit()]
    if len(sizes) > 1:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for system in SYSTEMS:
            pts = [(int(n), results[n][system]) for n in sizes if results[n].get(system, {}).get("rows")]
            best = [(n, best_at(r)) for n, r in pts]
            best = [(n, b) for n, b in best if b]
            kw = dict(marker=markers[system], label=LABELS[system])
            if best:
                a1.plot([n for n, _ in best], [b["p50_ms"] for _, b in best], **kw)
            if pts:
                a2.plot([n for n, _ in pts], [r["held_mib"] for _, r in pts], **kw)
        for ax, ylabel in ((a1, "p50 ms at recall@10 >= 0.95"), (a2, "memory held (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (synthetic)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        a1.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "compare_scaling.png", dpi=120)
    print(f"wrote plots under {out}")


if __name__ == "__main__":
    main()
