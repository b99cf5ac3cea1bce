"""Ray Data throughput: ``StoreSink`` with 1 and 2 write workers against ``add_arrow`` from the same Parquet file
(same run), and ``EmbedImages`` with 1 and 2 workers against the encoder called directly.

    python benchmarks/ray_ingest.py                       # 200,000 x 2048 float16 vectors, 960 photos
    python benchmarks/ray_ingest.py --n 200000 --images 960 --work /path/with/space
    python benchmarks/ray_ingest.py --generated --n 2000000 --work /path/with/space   # issue 25's driver test
    python benchmarks/ray_ingest.py --generated --ids random --n 2000000 --work /path   # UUID-like ids, no order

``--generated``: no Parquet and no photos; the rows are made by a ``map_batches`` whose function returns numpy
arrays (a 2-D float16 array becomes Ray's tensor column), 16,384 MRL-like rows a batch, and ``add_arrow`` in
one process gets the same batches as Arrow record batches. Reported: time, rows/s, the driver's peak
anonymous memory, and for the sink the workers' part, the driver's commit and the index catch-up task.

Each measurement runs in its own process with its own local Ray cluster (``ray.init(num_cpus=2)``; for
EmbedImages one CPU more than actors, so the tasks that feed them can run). The Parquet file is the one
``benchmarks/ingest.py`` writes (made here when absent). StoreSink's time is split into the workers' part
(reading Parquet, checking rows, writing vectors in place and fragments of ids and metadata) and the driver's
single commit (in place: sizing the chunk files the workers wrote and the catalog; ``--sink-modes staging``:
appending the staged vectors to the bands too), then the index catch-up task. The photos are the first
``--images`` of ../shared/datasets/tiny-imagenet (64 px JPEGs, resized by the encoder like any photo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "datasets" / "tiny-imagenet" / "tiny-imagenet-200-train300.zip"


def start_ray(cpus: int) -> None:
    import ray
    import ray.data

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
    ray.data.DataContext.get_current().enable_progress_bars = False


def sink_child(parquet: Path | None, store_path: Path, workers: int, n: int, mode: str, ids: str) -> dict:
    import ray.data
    from ingest import PeakAnon

    from mrlstore.ray import StoreSink

    class TimedSink(StoreSink):
        def on_write_complete(self, write_result):  # noqa: ANN001, ANN202
            self.staged_at = time.perf_counter()
            super().on_write_complete(write_result)

        def catch_up_indexes(self) -> None:
            self.committed_at = time.perf_counter()
            super().catch_up_indexes()

    shutil.rmtree(store_path, ignore_errors=True)
    start_ray(2)
    mem = PeakAnon()
    t0 = time.perf_counter()
    staging = None if mode == "in-place" else store_path.parent / "sink_staging"  # a folder beside the store
    sink = TimedSink(store_path, dim=2048, id="id", staging=staging)
    if parquet is None:  # --generated
        blocks = -(-n // GENERATED_BATCH)
        ds = ray.data.range(blocks, override_num_blocks=blocks)
        ds = ds.map_batches(generated_numpy, batch_size=1, fn_kwargs={"n": n, "ids": ids})
    else:
        ds = ray.data.read_parquet(str(parquet))
    ds.write_datasink(sink, concurrency=workers)
    end = time.perf_counter()
    return {"rows": sink.rows_added, "seconds": end - t0, "staging_s": sink.staged_at - t0,
            "commit_s": sink.committed_at - sink.staged_at, "catch_up_s": end - sink.committed_at,
            "rows_moved": sink.rows_moved, "driver_peak_anon_mib": mem.stop()}  # fmt: skip


GENERATED_BATCH = 16384


def generated_rows(block: int, n: int, ids: str = "sequential") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block ``block`` of ``n`` MRL-like rows (100 clusters, variance decaying as 1/(i+1)): ids, vectors, labels.
    ``ids``: "sequential" (the row numbers) or "random" (UUID-like strings in no order, from their own seed)."""
    lo = block * GENERATED_BATCH
    count = max(0, min(GENERATED_BATCH, n - lo))
    scale = np.arange(1, 2049, dtype=np.float32) ** -0.5
    centres = np.random.default_rng(0).standard_normal((100, 2048), dtype=np.float32)
    rng = np.random.default_rng(1 + block)
    labels = rng.integers(0, 100, size=count)
    vectors = (rng.standard_normal((count, 2048), dtype=np.float32) + centres[labels]) * scale
    if ids == "random":
        raw = np.random.default_rng([7, block]).bytes(16 * count)
        names = np.array([str(uuid.UUID(bytes=raw[i : i + 16])) for i in range(0, 16 * count, 16)])
    else:
        names = np.arange(lo, lo + count).astype(str)
    return names, vectors.astype(np.float16), labels


def generated_numpy(batch: dict, n: int, ids: str) -> dict:
    """A map_batches function returning numpy arrays: the 2-D float16 array becomes Ray's tensor column."""
    ids, vectors, labels = generated_rows(int(batch["id"][0]), n, ids)
    return {"id": ids, "embedding": vectors, "label": np.char.add("c", labels.astype(str))}


def arrow_child(parquet: Path | None, store_path: Path, n: int, ids: str) -> dict:
    import pyarrow.parquet as pq
    from ingest import PeakAnon

    import mrlstore

    shutil.rmtree(store_path, ignore_errors=True)
    mem = PeakAnon()
    t0 = time.perf_counter()
    with mrlstore.open(store_path, dim=2048) as store:
        if parquet is None:  # --generated: the same rows as the sink's, as Arrow record batches
            batches = (generated_batch(b, n, ids) for b in range(-(-n // GENERATED_BATCH)))
        else:
            batches = pq.ParquetFile(parquet, pre_buffer=False, buffer_size=1 << 20).iter_batches(batch_size=16384)
        rows = store.add_arrow(batches, vector="embedding")
    return {"rows": rows, "seconds": time.perf_counter() - t0, "driver_peak_anon_mib": mem.stop()}


def generated_batch(block: int, n: int, ids: str) -> pa.RecordBatch:
    names, vectors, labels = generated_rows(block, n, ids)
    flat = pa.array(vectors.reshape(-1))
    return pa.RecordBatch.from_pydict({
        "id": names, "embedding": pa.FixedSizeListArray.from_arrays(flat, 2048),
        "label": np.char.add("c", labels.astype(str)),
    })  # fmt: skip


def photos(count: int) -> list[bytes]:
    with zipfile.ZipFile(TINY) as z:
        names = sorted(n for n in z.namelist() if n.lower().endswith((".jpeg", ".jpg")))[:count]
        return [z.read(n) for n in names]


def embed_child(count: int, workers: int) -> dict:
    import ray.data

    from mrlstore.ray import EmbedImages

    items = [{"bytes": b} for b in photos(count)]
    start_ray(workers + 1)
    t0 = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=4 * workers).map_batches(
        EmbedImages, fn_constructor_kwargs={"column": "bytes"}, batch_size=32,
        compute=ray.data.ActorPoolStrategy(size=workers), batch_format="pyarrow",
    )  # fmt: skip
    rows = ds.materialize().count()
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def direct_child(count: int) -> dict:
    import mrlstore

    images = photos(count)
    encoder = mrlstore.load_encoder()
    encoder.encode(images[:32], progress=False)  # warm-up, like a worker's first batch
    t0 = time.perf_counter()
    rows = len(encoder.encode(images, batch_size=32, progress=False))
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace, *child: str) -> dict:
    cmd = [sys.executable, __file__, "--n", str(args.n), "--images", str(args.images), "--work", str(args.work)]
    cmd += ["--generated"] if args.generated else []
    cmd += ["--skip-arrow"] if args.skip_arrow else []
    cmd += ["--ids", args.ids]
    out = subprocess.run([*cmd, "--child", *child], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "ingest")
    ap.add_argument("--generated", action="store_true", help="rows from a map_batches returning numpy, no photos")
    ap.add_argument(
        "--sink-modes",
        nargs="+",
        choices=["in-place", "staging"],
        default=["in-place"],
        help="in-place: workers write vectors into the store (the default); staging: they write whole "
        "rows to a staging folder and the driver copies them in (StoreSink(staging=...))",
    )
    ap.add_argument(
        "--ids", choices=["sequential", "random"], default="sequential",
        help="--generated's ids: the row numbers, or UUID-like strings in no order (the catalog's hard case)",
    )  # fmt: skip
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-arrow", action="store_true", help="the sink runs only")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    parquet = None if args.generated else args.work / f"embeddings_{args.n}.parquet"
    if args.child:
        kind, *rest = args.child
        store = args.work / "store_ray"
        result = {
            "sink": lambda: sink_child(parquet, store, int(rest[0]), args.n, rest[1], args.ids),
            "arrow": lambda: arrow_child(parquet, store, args.n, args.ids),
            "embed": lambda: embed_child(args.images, int(rest[0])),
            "direct": lambda: direct_child(args.images),
        }[kind]()
        print("RESULT " + json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if parquet is not None and not parquet.exists():
        from ingest import write_parquet

        write_parquet(parquet.with_suffix(".tmp"), args.n)
        parquet.with_suffix(".tmp").rename(parquet)
    source = "generated batches" if parquet is None else "Parquet"
    print("| what | rows | time | rows/s | detail |\n|---|---|---|---|---|")
    if not args.skip_arrow:
        r = run(args, "arrow")
        peak = f"peak anonymous memory {r['driver_peak_anon_mib']:.0f} MiB"
        table_row(f"`add_arrow` from {source}, one process", r, peak)
    for mode in args.sink_modes:
        for workers in args.workers:
            r = run(args, "sink", str(workers), mode)
            parts = (f"workers {r['staging_s']:.1f} s, commit {r['commit_s']:.1f} s (rows moved {r['rows_moved']:,}), "
                     f"index catch-up {r['catch_up_s']:.1f} s")  # fmt: skip
            table_row(f"`StoreSink` {mode}, {workers} write worker(s)", r,
                      f"{parts}; driver peak anonymous memory {r['driver_peak_anon_mib']:.0f} MiB")  # fmt: skip
    if args.generated:
        return
    table_row("encoder.encode, one process (2 torch threads)", run(args, "direct"), "warm", images=True)
    for workers in (1, 2):
        table_row(f"`EmbedImages`, {workers} actor(s)", run(args, "embed", str(workers)),
                  "including actor start and encoder load", images=True)  # fmt: skip


def table_row(what: str, r: dict, detail: str, images: bool = False) -> None:
    rate = f"{r['rows'] / r['seconds']:,.1f} images/s" if images else f"{r['rows'] / r['seconds']:,.0f}"
    print(f"| {what} | {r['rows']:,} | {r['seconds']:.1f} s | {rate} | {detail} |")


if __name__ == "__main__":
    main()
