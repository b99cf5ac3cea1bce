"""Out-of-domain retrieval: image encoders on photos of classes no training set here contains.

    pip install -e ".[train]"
    python benchmarks/encoder_ood.py                       # the bundled encoder against its raw backbone
    python benchmarks/encoder_ood.py --weights a.pt b.pt   # also other encoder files (save_encoder format)

Data: ``../shared/datasets/caltech101-ood/caltech101-ood.zip`` (2,646 photos, 61 Caltech-101 classes that
share none with CIFAR-10 or Tiny-ImageNet-200); never trained on. Leave-one-out inside the set: each photo
queries the other 2,645 by cosine similarity on re-normalised prefixes, for every m in (8, ..., 2048):

- 1-NN: the nearest other photo has the query's class;
- mAP@10: AP@10 = (1 / min(10, R)) * sum_{k<=10} precision@k * rel_k, R = the other photos of the class.

Rows: each encoder file (the bundled one by default) at every m of its nesting, at its own input setting
(128 px, centre crop); the raw ImageNet backbone (EfficientNet-Lite0's pooled 1280-d features, the
starting point of every encoder here) at ``--sizes`` px; the raw backbone's top-m principal directions
fitted on training photos (the first ``--fit-images`` Tiny-ImageNet photos in name order) and, as an
oracle, on the set itself; and m random coordinates of the raw features (seed 0). Features are cached
under ``--cache``. Writes benchmarks/results/encoder_ood.md and encoder_ood.png.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

RAW_DIMS = (8, 16, 32, 64, 128, 256, 512, 1024, 1280)


def features(model, zip_path: Path, names: list[str], size: int, cache: Path, batch: int = 64) -> np.ndarray:
    """``model`` (images -> vectors) on every photo, preprocessed as the encoder does; cached in ``cache``."""
    if cache.exists():
        return np.load(cache)
    import torch
    from PIL import Image
    from tqdm import tqdm

    from mrlstore.encoder import preprocess

    out = []
    with zipfile.ZipFile(zip_path) as z, torch.inference_mode():
        for lo in tqdm(range(0, len(names), batch), desc=cache.stem, unit="batch"):
            arrays = [
                preprocess(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")), size)
                for n in names[lo : lo + batch]
            ]
            out.append(model(torch.from_numpy(np.stack(arrays))).float().numpy())
    x = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


def main() -> None:
    from distill_encoder import SOURCES, leave_one_out, source_index
    from encoder_eval import svd_basis
    from train_encoder import _pretrained_backbone

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="*", type=Path, default=[], help="other encoder files to evaluate")
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 224], help="raw backbone input sizes")
    ap.add_argument("--fit-images", type=int, default=10_000, help="Tiny-ImageNet photos the SVD is fitted on")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "ood_cache")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    from mrlstore.encoder import BUNDLED_WEIGHTS, load_encoder

    ood_zip, fit_zip = SOURCES["ood"], SOURCES["tiny"]
    index = source_index("ood")
    names, labels = [n for n, _, _ in index], np.array([c for _, c, _ in index], dtype=np.int64)
    print(f"{len(names)} photos, {labels.max() + 1} classes")
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    timings: list[str] = []

    def evaluate(name: str, x: np.ndarray, dims) -> None:
        rows[name] = {m: leave_one_out(x[:, :m], labels) for m in dims if m <= x.shape[1]}
        print(name, " ".join(f"{m}:{v[1]:.3f}" for m, v in rows[name].items()), flush=True)

    for path in [BUNDLED_WEIGHTS, *args.weights]:
        enc = load_encoder(path if path != BUNDLED_WEIGHTS else None, device="cpu")
        t0 = time.perf_counter()
        x = features(enc.model, ood_zip, names, 128, args.cache / f"ood_{enc.name}_128.npy")
        timings.append(f"{enc.name}: features in {time.perf_counter() - t0:.0f} s (0 s when cached)")
        evaluate(f"{enc.name} (128 px)", x, enc.nesting)
    raw_model = _pretrained_backbone().eval().features
    raws = {}
    for size in args.sizes:
        raws[size] = features(raw_model, ood_zip, names, size, args.cache / f"ood_raw_{size}.npy")
        evaluate(f"raw Lite0 1280-d ({size} px)", raws[size], RAW_DIMS[-1:])
    raw = raws[args.sizes[0]]
    fit_names = [n for n, _, _ in source_index("tiny")[: args.fit_images]]
    fit = features(raw_model, fit_zip, fit_names, args.sizes[0], args.cache / f"fit_raw_{args.sizes[0]}.npy")
    fitted = (raw - fit.mean(0)) @ svd_basis(fit, 1024)
    evaluate(f"raw SVD-m, fitted on {len(fit_names):,} Tiny-ImageNet photos", fitted, RAW_DIMS[:-1])
    evaluate("raw SVD-m, fitted on the set itself (oracle)", (raw - raw.mean(0)) @ svd_basis(raw, 1024), RAW_DIMS[:-1])
    perm = np.random.default_rng(0).permutation(raw.shape[1])
    evaluate("raw random m coordinates", raw[:, perm], RAW_DIMS)
    write_report(rows, args, len(names), int(labels.max() + 1), timings)


def write_report(rows, args, n: int, classes: int, timings: list[str]) -> None:
    dims = sorted({m for r in rows.values() for m in r})
    head = "| encoder | " + " | ".join(str(m) for m in dims) + " |"
    line = "|---|" + "---|" * len(dims)
    out = [
        "# Out-of-domain retrieval: caltech101-ood (leave-one-out)",
        "",
        f"{n:,} photos, {classes} Caltech-101 classes that no training set contains. Command: "
        f"`python benchmarks/encoder_ood.py{''.join(' --weights ' + str(w) for w in args.weights)} "
        f"--sizes {' '.join(str(z) for z in args.sizes)}` "
        "(see its docstring). Cosine similarity on re-normalised prefixes; the raw backbone's own columns are "
        "at its 1280 dimensions.",
        "",
    ]
    for title, idx, fmt in (("mAP@10", 1, "{:.3f}"), ("1-NN accuracy (%)", 0, "{:.1f}")):
        out += [f"## {title}", "", head, line]
        for name, r in rows.items():
            cells = [fmt.format(r[m][idx] * (100 if idx == 0 else 1)) if m in r else "" for m in dims]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Feature passes: " + "; ".join(timings) + ".", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_ood.md").write_text("\n".join(out))
    plot(rows, args.out / "encoder_ood.png")
    print("\n".join(out))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in rows.items():
        ms = sorted(r)
        if len(ms) == 1:
            ax.axhline(r[ms[0]][1], linestyle="--", linewidth=1, label=name, color="gray" if "224" in name else "k")
        else:
            ax.plot(ms, [r[m][1] for m in ms], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefix length m")
    ax.set_ylabel("mAP@10 (leave-one-out)")
    ax.set_title("caltech101-ood: classes no training set contains")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
