"""The bundled encoder's forward pass on a CPU: images per second and peak memory by how many images go
through the network at once (``mrlstore.encoder.model.CPU_ROWS``), for one batch of 64 photos as an add
hands it over. Each setting runs in a fresh process (peak RSS is per process), in rounds, alternating.

    python benchmarks/encoder_batch.py --rows 64 32 16 8 4 --rounds 2 --out benchmarks/results/encoder_batch.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def measure(rows: int, images: int, repeats: int) -> dict[str, float]:
    """In this process: ``repeats`` passes over ``images`` random 700x700 photos, ``rows`` at a time."""
    from mrlstore.encoder import model
    from mrlstore.encoder.runner import load_bundled_encoder

    model.CPU_ROWS = rows
    encoder = load_bundled_encoder(device="cpu")
    rng = np.random.default_rng(0)
    batch = np.stack([encoder.prepare(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)) for _ in range(images)])
    encoder.embed_prepared(batch)  # warm
    started = time.perf_counter()
    for _ in range(repeats):
        encoder.embed_prepared(batch)
    seconds = (time.perf_counter() - started) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "images_per_s": images / seconds, "peak_rss_mib": peak, "input_px": encoder.image_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 32, 16, 8, 4])
    ap.add_argument("--images", type=int, default=64, help="the batch an add hands over (its batch_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process's setting
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.images, args.repeats)))
        return
    runs: dict[int, list[dict[str, float]]] = {r: [] for r in args.rows}
    for _ in range(args.rounds):
        for rows in args.rows:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(rows),
                "--images",
                str(args.images),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[rows].append(json.loads(out.stdout.splitlines()[-1]))
            print(runs[rows][-1], flush=True)
    lines = [
        f"# The bundled encoder's forward pass by images at once ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch threads default)",
        "",
        f"`python benchmarks/encoder_batch.py --rows {' '.join(map(str, args.rows))} --rounds {args.rounds}`: "
        f"one batch of {args.images} photos (700x700, shrunk to {runs[args.rows[0]][0]['input_px']} px as an add "
        "does), "
        f"{args.repeats} passes after a warm one, each setting in a fresh process, rounds alternating.",
        "",
        "| images at once | images/s (each round) | peak RSS MiB (each round) |",
        "|---|---|---|",
    ]
    for rows, got in runs.items():
        speeds = ", ".join(f"{g['images_per_s']:.1f}" for g in got)
        peaks = ", ".join(f"{g['peak_rss_mib']:.0f}" for g in got)
        lines.append(f"| {rows} | {speeds} | {peaks} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
