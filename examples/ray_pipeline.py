"""A Ray Data pipeline: embed the repo's sample images on two workers, write them into a store in one commit,
then query the store from two workers. Runs on a local Ray cluster (ray.init() starts one):

    pip install torch==2.13.0 && pip install -e ".[images,ray]" && python examples/ray_pipeline.py

On a real cluster the same code runs with ray.init(address="auto"). The workers write their vectors into the
store's files in place, so every machine must reach the store's folder (a shared file system with working flock
locks); where only the driver reaches it, give StoreSink a staging= folder every worker can reach: workers then
write whole rows there and the driver copies their vectors in.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import ray
import ray.data

import mrlstore
from mrlstore.ray import EmbedImages, QueryStore, StoreSink

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=HERE / "images", help="a folder of images")
    parser.add_argument("--store", type=Path, default=Path("ray_demo.mrl"), help="the store to (re)create")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    # One CPU more than actors at once: the actors hold theirs for the whole run (step 1's embedding workers,
    # step 3's two pools of one), and the tasks that read the files and write the fragments need one too (with
    # no CPU left for them, the pipeline stalls: step 3 did with --workers 1).
    ray.init(num_cpus=max(args.workers, 2) + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shutil.rmtree(args.store, ignore_errors=True)

    # 1. Embed: each worker loads the bundled encoder once and embeds a batch of image bytes at a time.
    files = ray.data.read_binary_files(str(args.images), include_paths=True, file_extensions=["jpg", "jpeg", "png"])
    embed = {"fn_constructor_kwargs": {"column": "bytes"}, "batch_size": 32, "batch_format": "pyarrow"}
    embedded = files.map_batches(EmbedImages, compute=ray.data.ActorPoolStrategy(size=args.workers), **embed)

    # 2. Write: workers stage their rows beside the store; one commit at the end makes all of them visible.
    started = time.perf_counter()
    sink = StoreSink(args.store, vector="embedding", id="path")
    embedded.drop_columns(["bytes"]).write_datasink(sink)
    print(f"embedded and committed {sink.rows_added} images in {time.perf_counter() - started:.1f} s")

    # 3. Query: a few images (embedded again, as new queries would be) against the store, from workers that
    # open it read-only; the hits come back as new columns of the Dataset.
    queries = files.limit(6).map_batches(EmbedImages, compute=ray.data.ActorPoolStrategy(size=1), **embed)
    hits = queries.map_batches(
        QueryStore,
        fn_constructor_kwargs={"path": str(args.store), "k": 4, "dims": [16, 2048]},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="pyarrow",
    ).take_all()
    for row in hits:
        neighbours = ", ".join(f"{Path(i).parent.name}/{Path(i).name}" for i in row["hit_ids"][1:])
        print(f"{Path(row['path']).parent.name}/{Path(row['path']).name} -> {neighbours}")

    with mrlstore.open(args.store, read_only=True) as store:
        print(f"{len(store)} images in {args.store}")
    ray.shutdown()


if __name__ == "__main__":
    main()
