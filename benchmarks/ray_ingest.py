"""Ray Data throughput: ``StoreSink`` with 1 and 2 write workers against ``add_arrow`` from the same Parquet file
(same run), and ``EmbedImages`` with 1 and 2 workers against the encoder called directly.

    python benchmarks/ray_ingest.py                       # 200,000 x 2048 float16 vectors, 960 photos
    python benchmarks/ray_ingest.py --n 200000 --images 960 --work /path/with/space

Each measurement runs in its own process with its own local Ray cluster (``ray.init(num_cpus=2)``; for
EmbedImages one CPU more than actors, so the tasks that feed them can run). The Parquet file is the one
``benchmarks/ingest.py`` writes (made here when absent). StoreSink's time is split into the workers' part
(reading Parquet, checking rows, writing fragments) and the driver's single commit (appending the bands,
HNSW inserts, the catalog). The photos are the first ``--images`` of ../shared/datasets/tiny-imagenet (64 px
JPEGs, resized by the encoder like any photo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "datasets" / "tiny-imagenet" / "tiny-imagenet-200-train300.zip"


def start_ray(cpus: int) -> None:
    import ray
    import ray.data

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
    ray.data.DataContext.get_current().enable_progress_bars = False


def sink_child(parquet: Path, store_path: Path, workers: int) -> dict:
    import ray.data
    from ingest import PeakAnon

    from mrlstore.ray import StoreSink

    class TimedSink(StoreSink):
        def on_write_complete(self, write_result):  # noqa: ANN001, ANN202
            self.staged_at = time.perf_counter()
            super().on_write_complete(write_result)

    shutil.rmtree(store_path, ignore_errors=True)
    start_ray(2)
    mem = PeakAnon()
    t0 = time.perf_counter()
    sink = TimedSink(store_path, dim=2048, id="id")
    ray.data.read_parquet(str(parquet)).write_datasink(sink, concurrency=workers)
    end = time.perf_counter()
    return {"rows": sink.rows_added, "seconds": end - t0, "staging_s": sink.staged_at - t0,
            "commit_s": end - sink.staged_at, "driver_peak_anon_mib": mem.stop()}  # fmt: skip


def arrow_child(parquet: Path, store_path: Path) -> dict:
    import pyarrow.parquet as pq
    from ingest import PeakAnon

    import mrlstore

    shutil.rmtree(store_path, ignore_errors=True)
    mem = PeakAnon()
    t0 = time.perf_counter()
    with mrlstore.open(store_path, dim=2048) as store:
        reader = pq.ParquetFile(parquet, pre_buffer=False, buffer_size=1 << 20)
        rows = store.add_arrow(reader.iter_batches(batch_size=16384), vector="embedding")
    return {"rows": rows, "seconds": time.perf_counter() - t0, "driver_peak_anon_mib": mem.stop()}


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
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    parquet = args.work / f"embeddings_{args.n}.parquet"
    if args.child:
        kind, *rest = args.child
        store = args.work / "store_ray"
        result = {
            "sink": lambda: sink_child(parquet, store, int(rest[0])),
            "arrow": lambda: arrow_child(parquet, store),
            "embed": lambda: embed_child(args.images, int(rest[0])),
            "direct": lambda: direct_child(args.images),
        }[kind]()
        print("RESULT " + json.dumps(result))
        return
    if not parquet.exists():
        from ingest import write_parquet

        args.work.mkdir(parents=True, exist_ok=True)
        write_parquet(parquet.with_suffix(".tmp"), args.n)
        parquet.with_suffix(".tmp").rename(parquet)
    print("| what | rows | time | rows/s | detail |\n|---|---|---|---|---|")
    r = run(args, "arrow")
    table_row("`add_arrow` from Parquet, one process", r, f"peak anonymous memory {r['driver_peak_anon_mib']:.0f} MiB")
    for workers in (1, 2):
        r = run(args, "sink", str(workers))
        table_row(f"`StoreSink`, {workers} write worker(s)", r,
                  f"workers {r['staging_s']:.1f} s, commit {r['commit_s']:.1f} s; "
                  f"driver peak anonymous memory {r['driver_peak_anon_mib']:.0f} MiB")  # fmt: skip
    table_row("encoder.encode, one process (2 torch threads)", run(args, "direct"), "warm", images=True)
    for workers in (1, 2):
        table_row(f"`EmbedImages`, {workers} actor(s)", run(args, "embed", str(workers)),
                  "including actor start and encoder load", images=True)  # fmt: skip


def table_row(what: str, r: dict, detail: str, images: bool = False) -> None:
    rate = f"{r['rows'] / r['seconds']:,.1f} images/s" if images else f"{r['rows'] / r['seconds']:,.0f}"
    print(f"| {what} | {r['rows']:,} | {r['seconds']:.1f} s | {rate} | {detail} |")


if __name__ == "__main__":
    main()
