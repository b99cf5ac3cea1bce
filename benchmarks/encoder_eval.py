"""Evaluate Matryoshka embeddings of CIFAR-10 the way the MRL paper does (retrieval at every prefix size).

    python benchmarks/encoder_eval.py [--cache build/encoder_cache] [--out benchmarks/results]

Needs the caches and checkpoints of ``examples/train_encoder.py`` (its ``all`` stage for MRL; MRL-E, the
fixed-feature and class-disjoint baselines are evaluated when their checkpoints exist, from its
``baselines`` stage). ``--recipe finetune`` (default when ``finetune_mrl.pt`` exists) evaluates the
fine-tuned checkpoints, ``--recipe frozen`` the frozen-backbone projections. Database: the 50,000 training
images; queries: the 10,000 test images; cosine similarity on re-normalised prefixes.

- 1-NN accuracy: the label of the nearest database image is the query's label.
- mAP@10: mean over queries of AP@10 = (1/10) * sum_{k<=10} precision@k * rel_k (every class has more than
  10 database images, so the normaliser min(10, #relevant) is 10).

Rows: MRL (nested prefixes of the trained embedding), MRL-E, FF (an encoder trained at each size alone),
SVD (the top-m principal directions of the full FF-2048 embedding), random features (m coordinates of it
chosen at random, seed 0), and the raw pretrained backbone (1280-d; its SVD at each m).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

NESTING = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def retrieval_metrics(
    db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, q_labels: np.ndarray, k: int = 10
) -> tuple[float, float]:
    """(1-NN accuracy, mAP@k) with cosine similarity, computed exactly in blocks."""
    import torch

    d = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(db, dtype=np.float32)), dim=1)
    dl = torch.from_numpy(db_labels)
    hits1, ap = 0, 0.0
    for lo in range(0, len(queries), 1000):
        q = torch.nn.functional.normalize(
            torch.from_numpy(np.ascontiguousarray(queries[lo : lo + 1000], np.float32)), dim=1
        )
        top = (q @ d.T).topk(k, dim=1).indices
        rel = (dl[top] == torch.from_numpy(q_labels[lo : lo + 1000])[:, None]).float()
        hits1 += int(rel[:, 0].sum())
        precision = rel.cumsum(1) / torch.arange(1, k + 1)
        ap += float((precision * rel).sum(1).div(k).sum())
    return hits1 / len(queries), ap / len(queries)


def svd_basis(x: np.ndarray, m: int) -> np.ndarray:
    mean = x.mean(0)
    _, _, vt = np.linalg.svd((x - mean)[:: max(1, len(x) // 20000)], full_matrices=False)
    return vt[:m].T


def main() -> None:
    import train_encoder as te

    ap = argparse.ArgumentParser(description="MRL retrieval evaluation on CIFAR-10")
    ap.add_argument("--cache", type=Path, default=te.DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--weights", type=Path, default=None, help="encoder for the speed test (default: bundled)")
    ap.add_argument(
        "--recipe",
        choices=["finetune", "frozen"],
        default=None,
        help="which checkpoints to evaluate (default: finetune when finetune_mrl.pt exists)",
    )
    args = ap.parse_args()
    if args.recipe is None:
        args.recipe = "finetune" if (args.cache / "finetune_mrl.pt").exists() else "frozen"
    data = te.load_cache(args.cache)
    tr, te_mask = data["train"], ~data["train"]
    feats, labels = data["features"], data["labels"]
    rows: dict[str, dict[int, tuple[float, float]]] = {}

    def evaluate(name: str, emb: np.ndarray, sizes=NESTING, transform=None) -> None:
        t0 = time.perf_counter()
        rows[name] = {}
        for m in sizes:
            x = transform(emb, m) if transform else emb[:, :m]
            rows[name][m] = retrieval_metrics(x[tr], labels[tr], x[te_mask], labels[te_mask])
        print(
            f"{name}: "
            + ", ".join(f"{m}:{a:.3f}" for m, (a, _) in rows[name].items())
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    # Checkpoints of examples/train_encoder.py: finetune_* (later backbone blocks fine-tuned with the
    # projection) or projection_* (frozen backbone). Every MRL/MRL-E/FF row uses the chosen recipe.
    prefix = {"finetune": "finetune_", "frozen": "projection_"}[args.recipe]
    mrl = None
    for name, file in [("MRL", f"{prefix}mrl.pt"), ("MRL-E", f"{prefix}mrl_e.pt")]:
        path = args.cache / file
        if path.exists():
            emb = te.embed_checkpoint(path, data, args.cache)
            evaluate(name, emb)
            mrl = emb if name == "MRL" else mrl
    if mrl is None:
        sys.exit(f"no {prefix}mrl.pt in the cache: run `python examples/train_encoder.py` (see its docstring)")
    if args.recipe == "finetune" and (args.cache / "projection_mrl.pt").exists():
        evaluate("MRL, frozen backbone (v1)", te.embed_checkpoint(args.cache / "projection_mrl.pt", data, args.cache))
    ff = {m: args.cache / f"{prefix}ff_{m}.pt" for m in NESTING}
    ff_2048 = None
    if any(p.exists() for p in ff.values()):
        rows["FF"] = {}
        for m, path in ff.items():
            if path.exists():
                e = te.embed_checkpoint(path, data, args.cache)
                rows["FF"][m] = retrieval_metrics(*_split(e, labels, tr))
                ff_2048 = e if m == 2048 else ff_2048
    # The paper's SVD and random-feature baselines reduce the full-size FF embedding; without FF-2048,
    # reduce the MRL embedding instead.
    full, full_name = (ff_2048, "FF-2048") if ff_2048 is not None else (mrl, "MRL-2048")
    rng = np.random.default_rng(0)
    picks = {m: np.sort(rng.choice(full.shape[1], m, replace=False)) for m in NESTING}
    basis = svd_basis(full[tr], max(NESTING))
    evaluate(f"SVD of {full_name}", full, transform=lambda e, m: (e - e[tr].mean(0)) @ basis[:, :m])
    evaluate(f"Rand. FS of {full_name}", full, transform=lambda e, m: e[:, picks[m]])
    bb_sizes = tuple(m for m in NESTING if m <= feats.shape[1])
    bb_basis = svd_basis(feats[tr], max(bb_sizes))
    evaluate("Backbone SVD", feats, sizes=bb_sizes, transform=lambda e, m: (e - e[tr].mean(0)) @ bb_basis[:, :m])
    rows["Backbone (1280-d)"] = {1280: retrieval_metrics(feats[tr], labels[tr], feats[te_mask], labels[te_mask])}
    extra = [
        disjoint_report(te, args.cache, data, prefix),
        adaptive_report(mrl, labels, tr),
        encode_speed_report(args.weights),
    ]
    stem = "encoder_eval" if args.recipe == "finetune" else "encoder_eval_frozen"
    write_report(rows, args.out / stem, [e for e in extra if e], args.recipe)


def disjoint_report(te, cache: Path, data: dict, prefix: str) -> str:
    """Retrieval among classes 5-9 with an encoder trained on classes 0-4 only, against the backbone."""
    path = cache / f"{prefix}mrl_disjoint.pt"
    if not path.exists():
        return ""
    feats, labels, tr = data["features"], data["labels"], data["train"]
    unseen = labels >= 5
    db, q = tr & unseen, ~tr & unseen
    emb = te.embed_checkpoint(path, data, cache)
    basis = svd_basis(feats[db], 1024)
    raw = retrieval_metrics(feats[db], labels[db], feats[q], labels[q])
    lines = [
        "## Class-disjoint protocol",
        "",
        f"MRL encoder ({path.name}) trained on classes 0-4 only; retrieval among the unseen classes 5-9 "
        f"(database: their {int(db.sum()):,} training images, queries: their {int(q.sum()):,} test images). "
        f"Raw backbone (1280-d): 1-NN {100 * raw[0]:.2f}, mAP@10 {100 * raw[1]:.2f}.",
        "",
        "| m | MRL 1-NN | MRL mAP@10 | backbone SVD 1-NN | backbone SVD mAP@10 |",
        "|---|---|---|---|---|",
    ]
    mean = feats[db].mean(0)
    for m in NESTING:
        a = retrieval_metrics(emb[db][:, :m], labels[db], emb[q][:, :m], labels[q])
        b = None
        if m <= 1024:
            proj = basis[:, :m]
            b = retrieval_metrics((feats[db] - mean) @ proj, labels[db], (feats[q] - mean) @ proj, labels[q])
        cells = f"{100 * b[0]:.2f} | {100 * b[1]:.2f}" if b else " | "
        lines.append(f"| {m} | {100 * a[0]:.2f} | {100 * a[1]:.2f} | {cells} |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def adaptive_report(mrl: np.ndarray, labels: np.ndarray, tr: np.ndarray) -> str:
    """The paper's adaptive classification: stop at the smallest confident prefix."""
    from mrlstore.adaptive import AdaptiveClassifier

    lines = [
        "## Adaptive classification",
        "",
        "Nested softmax heads on the MRL embedding (fit on the training split, thresholds on a 10% hold-out), "
        "test accuracy against the average prefix length used; the fixed 2048-d head for reference.",
        "",
        "| tolerance | accuracy % | average prefix | fixed 2048-d head % |",
        "|---|---|---|---|",
    ]
    t0 = time.perf_counter()
    clf = AdaptiveClassifier().fit(mrl[tr], labels[tr])
    for tol in (0.0, 0.002, 0.005, 0.01, 0.02):
        pred, used = clf.set_tolerance(tol).predict(mrl[~tr])
        fixed = clf.predict_fixed(mrl[~tr], 2048)
        lines.append(
            f"| {tol} | {100 * np.mean(pred == labels[~tr]):.2f} | {used.mean():.1f} | "
            f"{100 * np.mean(fixed == labels[~tr]):.2f} |"
        )
        print(lines[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return "\n".join(lines)


def encode_speed_report(weights: Path | None) -> str:
    """images/s of ImageEncoder.encode on the shipped sample images (JPEG decode included)."""
    import torch

    import mrlstore

    try:
        enc = mrlstore.load_encoder(weights)
    except mrlstore.MRLStoreError as e:
        return f"encode speed: not measured ({e})"
    files = sorted(str(p) for p in (ROOT / "examples" / "images").rglob("*.jpg"))
    files = (files * 3)[:320]
    enc.encode(files[:64], progress=False)  # warm-up
    t0 = time.perf_counter()
    enc.encode(files, batch_size=64, progress=False)
    rate = len(files) / (time.perf_counter() - t0)
    line = (
        f"## Encode speed\n\n`ImageEncoder.encode` on {len(files)} sample JPEGs (batch 64, decode included): "
        f"**{rate:.0f} images/s** on {enc.device} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)."
    )
    print(line, flush=True)
    return line


def _split(x: np.ndarray, labels: np.ndarray, tr: np.ndarray):
    return x[tr], labels[tr], x[~tr], labels[~tr]


def write_report(rows: dict[str, dict[int, tuple[float, float]]], out: Path, extra: list[str], recipe: str) -> None:
    """``out``.md (the tables) and ``out``.png (1-NN and mAP@10 against m)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted({m for r in rows.values() for m in r})
    lines = ["| method | " + " | ".join(f"m={m}" for m in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for metric_i, metric in enumerate(["1-NN accuracy", "mAP@10"]):
        lines.append(f"| **{metric}** |" + " |" * len(sizes))
        for name, r in rows.items():
            cells = [f"{100 * r[m][metric_i]:.2f}" if m in r else "" for m in sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    recipe_line = {
        "finetune": "Recipe: backbone blocks 12-15 fine-tuned with the projection (the shipped encoder, v2).",
        "frozen": "Recipe: backbone frozen, projection trained on its pooled features (v1).",
    }[recipe]
    out.with_suffix(".md").write_text(
        "# CIFAR-10 retrieval with the bundled encoder (database 50k train, queries 10k test)\n\n"
        + f"{recipe_line} Command: `python benchmarks/encoder_eval.py --recipe {recipe}`.\n\n"
        + table
        + "\n\n"
        + "\n\n".join(extra)
        + "\n"
    )
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for metric_i, ax in enumerate(axes):
        for name, r in rows.items():
            ms = sorted(r)
            ax.plot(ms, [100 * r[m][metric_i] for m in ms], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("representation size m")
        ax.set_ylabel(["1-NN accuracy (%)", "mAP@10 (%)"][metric_i])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
