"""The bundled encoder at other input sizes (issue 24, item 4): quality on caltech101-ood and images per second.

    python -m benchmarks.encoder_sizes                     # 160, 192 and 224 px
    python -m benchmarks.encoder_sizes --sizes 160 224 --rate-images 320

For each size, the bundled weights as they are (the head was trained on 160 px features; they resize to
192 px since v3.1, chosen by this benchmark): leave-one-out mAP@10 (tools.distill_encoder.leave_one_out: AP
normalised by min(10, the class's other photos)) of the 2048-d vectors, of their 16-d and 8-d prefixes,
and of the raw backbone's pooled 1280-d features at that size; and
``encode`` throughput (JPEG decoding included, batches of 64, all cores), the median of three passes.
Writes benchmarks/results/encoder_sizes.md (or --out).
"""

from __future__ import annotations

import argparse
import platform
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import mrlstore
from mrlstore.encoder.model import BUNDLED_WEIGHTS, ImageEncoder, preprocess
from mrlstore.inputs import images
from tools.distill_encoder import leave_one_out

ROOT = Path(__file__).resolve().parents[1]
OOD = ROOT.parent / "shared" / "datasets" / "caltech101-ood" / "caltech101-ood.zip"


def backbone_features(model: torch.nn.Module, photos: list[bytes], size: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for lo in range(0, len(photos), 64):
            batch = np.stack([preprocess(images.to_rgb(i), size) for i in images.expand(photos[lo : lo + 64])])
            out.append(model.backbone.features(torch.from_numpy(batch)).numpy())
    return np.concatenate(out)


def rate(encoder: ImageEncoder, photos: list[bytes]) -> float:
    encoder.encode(photos[:64], progress=False)  # warm-up
    passes = []
    for _ in range(3):
        t0 = time.perf_counter()
        encoder.encode(photos, progress=False)
        passes.append(len(photos) / (time.perf_counter() - t0))
    return float(np.median(passes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    ap.add_argument("--rate-images", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encoder_sizes.md")
    args = ap.parse_args()
    with zipfile.ZipFile(OOD) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        photos = [z.read(n) for n in names]
    labels = np.unique([n.split("/")[-2] for n in names], return_inverse=True)[1]
    bundled = mrlstore.load_encoder()
    trained_at = torch.load(BUNDLED_WEIGHTS, map_location="cpu", weights_only=True)["meta"]["args"]["size"]
    lines = [
        "# The bundled encoder at other input sizes (caltech101-ood, 2,646 photos)",
        "",
        f"`python -m benchmarks.encoder_sizes` on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}; weights {bundled.name} (head trained on {trained_at} px features, "
        f"shipped at {bundled.image_size} px).",
        "",
        "| input px | mAP@10 2048-d | 16-d prefix | 8-d prefix | raw backbone 1280-d | 2048-d / backbone | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        encoder = ImageEncoder(bundled.model, nesting=bundled.nesting, name=bundled.name, image_size=size)
        x = encoder.encode(photos, progress=False)
        full, short, tiny = (leave_one_out(x[:, :m], labels)[1] for m in (2048, 16, 8))
        backbone = leave_one_out(backbone_features(bundled.model, photos, size), labels)[1]
        speed = rate(encoder, photos[: args.rate_images])
        scores = " | ".join(f"{v:.4f}" for v in (full, short, tiny, backbone))
        lines.append(f"| {size} | {scores} | {full / backbone:.3f} | {speed:.1f} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
