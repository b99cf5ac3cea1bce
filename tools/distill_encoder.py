"""The bundled encoder's recipe (v3): a general-purpose MRL projection distilled from a frozen ImageNet backbone.

    pip install -e ".[train]"
    python -m tools.distill_encoder all --install --input-size 192   # extract, train, eval, export (installed)
    python -m tools.distill_encoder baselines       # FF-16, FF-2048, MRL-E, class-disjoint (for the eval)
    python -m tools.encoder_eval                  # the full evaluation

Stages: ``extract`` (cached backbone features and teacher logits, by shards of 5,000 photos: resumable),
``train [--run R]`` (the projection on those caches), ``eval [--run R]`` (a quick table: caltech101-ood
leave-one-out, CIFAR-10 1-NN), ``export [--install] [--input-size PX]`` and ``restamp --input-size PX`` (the
installed file at another input size, tensors kept: how v3.1 came from v3). The whole recipe at the default
160 px took about an hour on this project's 2-core CPU (the model card has the exact times); it uses CUDA, with mixed
precision, when present.

The backbone (EfficientNet-Lite0, ImageNet weights) stays frozen, so features are computed once per photo
and view. Training data: Tiny-ImageNet-200 (60,000 photos, 200 classes; ``--views`` views each: view 0 the
centre crop the encoder uses, later views random resized crops with flips and colour jitter, seeded per
photo and view) and the CIFAR-10 training split. caltech101-ood is read for evaluation only.

Loss, for every nesting size m (c_m = 1; ``--c-small`` sets it for m <= 16), on the first m numbers z_m:
- distillation: KL divergence from the backbone's own ImageNet classifier (temperature T) to a 1000-class
  head on z_m, times T^2: the embedding keeps ImageNet's 1000-way knowledge, not 210 labels;
- similarity preservation (``--sim``): mean squared difference between the batch's pairwise cosine
  similarities of z_m and those of the backbone's 1280-d features (the Matryoshka-Adaptor idea);
- neighbour order (``--nbr``): KL divergence from the backbone's neighbour distribution over the batch,
  softmax(cosine / ``--nbr-temperature``) without the photo itself, to that of z_m: short prefixes keep
  who is whose nearest neighbour, which is what retrieval reads;
- ``--ce`` x cross-entropy of a 210-class head (Tiny-ImageNet's 200 + CIFAR-10's 10) on z_m, auxiliary.

Runs (``--run``): ``mrl`` (the shipped encoder); ``ff-<m>``, the same recipe with a single m-d output (FF);
``mrl-e``, one weight-tied head per term whose first m columns serve prefix m (MRL-E); ``mrl-disjoint``,
``mrl`` without CIFAR-10's classes 5-9 (for the class-disjoint protocol of tools/encoder_eval.py).
Deterministic with a fixed seed (0) on one device; resumable (a checkpoint per epoch, with the training
arguments and time, which ``export`` writes into the encoder file's metadata).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT.parent / "shared" / "datasets"
SOURCES = {
    "tiny": DATA / "tiny-imagenet" / "tiny-imagenet-200-train300.zip",
    "cifar": DATA / "cifar10" / "cifar10-jpg.zip",
    "ood": DATA / "caltech101-ood" / "caltech101-ood.zip",
}
NESTING = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SHARD = 5000
TINY_CLASSES = 200


def source_index(source: str) -> list[tuple[str, int, str]]:
    """(member name, class index, split) of every photo of ``source``, in name order."""
    with zipfile.ZipFile(SOURCES[source]) as z:
        names = sorted(n for n in z.namelist() if n.lower().endswith((".jpg", ".jpeg")))
    if source == "cifar":
        from tools.train_encoder import CLASSES

        return [(n, TINY_CLASSES + CLASSES.index(n.split("/")[1]), n.split("/")[0]) for n in names]
    classes = sorted({n.split("/")[-2] for n in names})
    return [(n, classes.index(n.split("/")[-2]), "all") for n in names]


def augmented(im, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random resized crop (35-100% of the area, aspect 3/4-4/3), a flip, colour jitter; as preprocess."""
    from PIL import Image, ImageEnhance

    w, h = im.size
    cw, ch = min(w, h), min(w, h)
    for _ in range(10):
        area, aspect = rng.uniform(0.35, 1.0) * w * h, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        tw, th = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if tw <= w and th <= h:
            cw, ch = tw, th
            break
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(float(rng.uniform(0.7, 1.3)))
    return ((np.asarray(im, dtype=np.float32) - 127.0) / 128.0).transpose(2, 0, 1)


def extract(source: str, view: int, cache: Path, size: int, batch: int, seed: int = 0) -> None:
    """Cache the frozen backbone's pooled features and ImageNet logits of every photo (one view)."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from mrlstore.encoder.model import preprocess
    from tools.train_encoder import _pretrained_backbone, save_shard

    index = source_index(source)
    todo = [
        (i, lo) for i, lo in enumerate(range(0, len(index), SHARD)) if not shard_path(cache, source, view, i).exists()
    ]
    if not todo:
        return
    cache.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _pretrained_backbone().eval().to(device)
    t0 = time.perf_counter()
    with zipfile.ZipFile(SOURCES[source]) as z, torch.inference_mode():
        for shard, lo in todo:
            feats, logits = [], []
            items = index[lo : lo + SHARD]
            for b in tqdm(range(0, len(items), batch), desc=f"{source} view {view} shard {shard}", unit="batch"):
                arrays = []
                for j, (name, _, _) in enumerate(items[b : b + batch], start=lo + b):
                    im = Image.open(io.BytesIO(z.read(name))).convert("RGB")
                    rng = np.random.default_rng([seed, view, j])
                    arrays.append(preprocess(np.asarray(im), size) if view == 0 else augmented(im, rng, size))
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    f = model.features(torch.from_numpy(np.stack(arrays)).to(device))
                    lg = model._fc(f)
                feats.append(f.float().cpu().numpy().astype(np.float16))
                logits.append(lg.float().cpu().numpy().astype(np.float16))
            labels = [np.array([c for _, c, _ in items], dtype=np.int16)]
            save_shard(shard_path(cache, source, view, shard), features=feats, logits=logits, labels=labels)
    print(f"{source} view {view}: {len(index):,} photos at {size} px in {time.perf_counter() - t0:.0f} s on {device}")


def shard_path(cache: Path, source: str, view: int, shard: int) -> Path:
    return cache / f"{source}_v{view}_{shard:02d}.npz"


def load(cache: Path, source: str, view: int = 0) -> dict[str, np.ndarray]:
    shards = sorted(cache.glob(f"{source}_v{view}_*.npz"))
    if not shards:
        sys.exit(f"no cached features for {source} view {view} in {cache}: run `extract` first")
    parts = [np.load(s) for s in shards]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("features", "logits", "labels")}
    out["split"] = np.array([s for _, _, s in source_index(source)])
    return out


RUNS = ("mrl", "mrl-e", "mrl-disjoint", "ff-16", "ff-2048")


def nesting_of(run: str) -> tuple[int, ...]:
    return (int(run.split("-")[1]),) if run.startswith("ff-") else NESTING


def build(run: str, hidden: int):
    """(projection, its nesting, distillation heads, class heads) for a run (see the module docstring)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from mrlstore.encoder.model import MRLProjection

    class PrefixHead(nn.Linear):
        """MRL-E: one head over the full embedding; a prefix of m numbers uses its first m columns."""

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return F.linear(z, self.weight[:, : z.shape[1]], self.bias)

    nesting = nesting_of(run)
    proj = MRLProjection(1280, hidden, nesting[-1])
    if run == "mrl-e":
        kd_head, cls_head = PrefixHead(nesting[-1], 1000), PrefixHead(nesting[-1], TINY_CLASSES + 10)
        return proj, nesting, nn.ModuleList([kd_head] * len(nesting)), nn.ModuleList([cls_head] * len(nesting))
    kd = nn.ModuleList(nn.Linear(m, 1000) for m in nesting)
    cls = nn.ModuleList(nn.Linear(m, TINY_CLASSES + 10) for m in nesting)
    return proj, nesting, kd, cls


def train(args) -> None:
    import torch

    torch.manual_seed(0)
    feats, logits, labels = training_rows(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    proj, nesting, kd, cls = build(args.run, args.hidden)
    proj, kd, cls = proj.to(device), kd.to(device), cls.to(device)
    opt = torch.optim.AdamW([*proj.parameters(), *kd.parameters(), *cls.parameters()], lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * (len(feats) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    ckpt = args.cache / f"distill_{args.run}.pt"
    start, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        for module, key in ((proj, "proj"), (kd, "kd"), (cls, "cls"), (opt, "opt"), (sched, "sched")):
            module.load_state_dict(state[key])
        start, seconds = int(state["epoch"]), float(state.get("seconds", 0.0))
    stop = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
    for epoch in range(start, stop):
        t0, total = time.perf_counter(), 0.0
        torch.manual_seed(epoch)  # dropout: the same draws whether or not the run was resumed
        order = np.random.default_rng([0, epoch]).permutation(len(feats))
        proj.train()
        batches = len(feats) // args.batch
        for b in range(batches):
            idx = order[b * args.batch : (b + 1) * args.batch]
            batch = [torch.from_numpy(a[idx]).to(device) for a in (feats, logits, labels)]
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = distill_loss(proj, nesting, kd, cls, *batch, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        seconds += time.perf_counter() - t0
        print(
            f"{args.run} epoch {epoch + 1}/{args.epochs}: loss {total / batches:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        state = {"proj": proj.state_dict(), "kd": kd.state_dict(), "cls": cls.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "epoch": epoch + 1, "hidden": args.hidden,
                 "args": training_args(args), "seconds": seconds, "device": str(device)}  # fmt: skip
        torch.save(state, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").rename(ckpt)


def training_rows(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, teacher logits, labels): every cached Tiny-ImageNet view and the CIFAR-10 training split
    (without classes 5-9 for ``mrl-disjoint``)."""
    tiny = [load(args.cache, "tiny", v) for v in range(args.views)]
    cifar = load(args.cache, "cifar")
    keep = cifar["split"] == "train"
    if args.run == "mrl-disjoint":
        keep &= cifar["labels"] < TINY_CLASSES + 5
    feats = np.concatenate([d["features"] for d in tiny] + [cifar["features"][keep]])
    logits = np.concatenate([d["logits"] for d in tiny] + [cifar["logits"][keep]])
    labels = np.concatenate([d["labels"] for d in tiny] + [cifar["labels"][keep]]).astype(np.int64)
    return feats, logits, labels


def distill_loss(proj, nesting, kd, cls, feats, logits, labels, args):
    """The Matryoshka sum over nesting sizes of KL to the teacher, similarity preservation and the class term."""
    import torch
    from torch.nn import functional as F

    t = args.temperature
    f = feats.float()
    teacher = F.softmax(logits.float() / t, dim=1)
    z = proj(F.dropout(f, 0.1))
    fn = F.normalize(f, dim=1)
    target_sim = fn @ fn.T
    self_pairs = torch.eye(len(f), dtype=torch.bool, device=f.device)
    target_nbr = F.softmax((target_sim / args.nbr_temperature).masked_fill(self_pairs, -torch.inf), dim=1)
    loss = torch.zeros((), device=f.device)
    for m, head_kd, head_cls in zip(nesting, kd, cls):
        zm = z[:, :m].float()
        term = F.kl_div(F.log_softmax(head_kd(zm) / t, dim=1), teacher, reduction="batchmean") * t * t
        zn = F.normalize(zm, dim=1)
        sim = zn @ zn.T
        term = term + args.sim * ((sim - target_sim) ** 2).mean()
        if args.nbr:
            log_nbr = F.log_softmax((sim / args.nbr_temperature).masked_fill(self_pairs, -torch.inf), dim=1)
            kl = target_nbr * (target_nbr.clamp_min(1e-12).log() - log_nbr.clamp_min(-1e4))
            term = term + args.nbr * kl.sum(1).mean()
        term = term + args.ce * F.cross_entropy(head_cls(zm), labels)
        loss = loss + (args.c_small if m <= 16 else 1.0) * term  # c_m
    return loss


def training_args(args) -> dict[str, str]:
    keys = "run views size batch epochs lr hidden temperature sim ce nbr nbr_temperature c_small".split()
    return {k: str(getattr(args, k)) for k in keys}


def embed(cache: Path, run: str, feats: np.ndarray) -> np.ndarray:
    import torch

    state = torch.load(cache / f"distill_{run}.pt", weights_only=True)
    proj, _, _, _ = build(run, int(state["hidden"]))
    proj.load_state_dict(state["proj"])
    proj.eval()
    with torch.inference_mode():
        return proj(torch.from_numpy(feats.astype(np.float32))).numpy()


def leave_one_out(x: np.ndarray, labels: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(1-NN accuracy, mAP@k) of every row against all the others by cosine similarity; AP@k is normalised
    by min(k, the other rows of the class)."""
    x = x.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    top = np.argpartition(-sim, k, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), axis=1), 1)
    rel = (labels[top] == labels[:, None]).astype(np.float64)
    others = np.bincount(labels)[labels] - 1
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    ap = (precision * rel).sum(1) / np.maximum(1, np.minimum(k, others))
    return float(rel[:, 0].mean()), float(ap.mean())


def evaluate(args) -> None:
    from tools.encoder_eval import retrieval_metrics

    ood, cifar = load(args.cache, "ood"), load(args.cache, "cifar")
    tr, te = cifar["split"] == "train", cifar["split"] == "test"
    z_ood, z_cifar = embed(args.cache, args.run, ood["features"]), embed(args.cache, args.run, cifar["features"])
    raw = leave_one_out(ood["features"], ood["labels"].astype(np.int64))
    print(f"raw backbone 1280-d: caltech101-ood 1-NN {raw[0]:.3f} mAP@10 {raw[1]:.3f}")
    print(
        "| m | caltech101-ood mAP@10 | caltech101-ood 1-NN | CIFAR-10 1-NN | CIFAR-10 mAP@10 |\n|---|---|---|---|---|"
    )
    for m in nesting_of(args.run):
        o = leave_one_out(z_ood[:, :m], ood["labels"].astype(np.int64))
        c = retrieval_metrics(z_cifar[tr, :m], cifar["labels"][tr], z_cifar[te, :m], cifar["labels"][te])
        print(f"| {m} | {o[1]:.3f} | {o[0]:.3f} | {c[0]:.4f} | {c[1]:.4f} |", flush=True)


def export(args) -> None:
    import torch

    from mrlstore.encoder.model import MRLImageModel, save_encoder
    from tools.train_encoder import _pretrained_backbone

    state = torch.load(args.cache / f"distill_{args.run}.pt", weights_only=True)
    model = MRLImageModel(hidden=int(state["hidden"]), dim=NESTING[-1])
    backbone = {k: v for k, v in _pretrained_backbone().state_dict().items() if not k.startswith("_fc.")}
    model.backbone.load_state_dict(backbone)
    model.projection.load_state_dict(state["proj"])
    trained = state["args"]
    size = args.input_size or int(trained["size"])
    meta = {"name": args.name, "dim": NESTING[-1], "nesting": list(NESTING), "image_size": size,
            "recipe": "tools/distill_encoder.py", "args": trained, "train_seconds": round(state["seconds"]),
            "train_device": state.get("device", "cpu")}  # fmt: skip
    save_encoder(model, args.out, meta)
    print(f"wrote {args.out}")
    if args.install:
        from mrlstore.encoder.model import BUNDLED_WEIGHTS

        shutil.copyfile(args.out, BUNDLED_WEIGHTS)
        _write_sha(BUNDLED_WEIGHTS)


def restamp(args) -> None:
    """The installed bundled file with another name and input size, its tensors unchanged (v3 at 160 px became
    v3.1 at 192 px this way: ``restamp --input-size 192``; list the old sha256 in bundled.SAME_TENSORS_AT)."""
    import torch

    from mrlstore.encoder.model import BUNDLED_WEIGHTS

    if args.input_size is None:
        raise SystemExit("restamp needs --input-size")
    blob = torch.load(BUNDLED_WEIGHTS, map_location="cpu", weights_only=True)
    blob["meta"] = {**blob["meta"], "name": args.name, "image_size": args.input_size}
    torch.save(blob, BUNDLED_WEIGHTS)
    _write_sha(BUNDLED_WEIGHTS)


def _write_sha(weights: Path) -> None:
    from mrlstore.encoder.model import sha256_of

    weights.with_suffix(".sha256").write_text(f"{sha256_of(weights)}  {weights.name}\n")
    print(f"installed as {weights} (sha256 {sha256_of(weights)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["extract", "train", "eval", "export", "all", "baselines", "restamp"])
    ap.add_argument("--cache", type=Path, default=None, help="feature cache (default: build/distill_<size>)")
    ap.add_argument("--run", default="mrl", choices=RUNS)
    ap.add_argument("--views", type=int, default=2, help="views per Tiny-ImageNet photo (view 0: centre crop)")
    ap.add_argument("--size", type=int, default=160, help="input size in px (the shipped encoder's setting)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this epoch (resume: run it again)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--sim", type=float, default=200.0, help="weight of similarity preservation")
    ap.add_argument("--ce", type=float, default=0.3, help="weight of the auxiliary class term")
    ap.add_argument("--c-small", type=float, default=1.0, help="c_m of the 8-d and 16-d terms (others: 1)")
    ap.add_argument("--nbr", type=float, default=10.0, help="weight of neighbour-distribution KL (0: off)")
    ap.add_argument("--nbr-temperature", type=float, default=0.05, help="temperature of the neighbour softmax")
    ap.add_argument("--out", type=Path, default=None, help="exported file (default: <cache>/mrl_lite0_v3.pt)")
    ap.add_argument("--install", action="store_true", help="export into mrlstore/encoder/weights/ (with its sha256)")
    ap.add_argument("--name", default="mrl-lite0-general-v3.1", help="the exported encoder's name")
    ap.add_argument("--input-size", type=int, default=None, help="px the exported encoder resizes to (default --size)")
    args = ap.parse_args()
    args.cache = args.cache or ROOT / "build" / f"distill_{args.size}"
    args.out = args.out or args.cache / "mrl_lite0_v3.pt"
    if args.stage in ("extract", "all"):
        for source, views in (("ood", 1), ("cifar", 1), ("tiny", args.views)):
            for view in range(views):
                extract(source, view, args.cache, args.size, 128)
    if args.stage in ("train", "all"):
        train(args)
    if args.stage == "baselines":
        for run in RUNS[1:]:
            args.run = run
            train(args)
    if args.stage in ("eval", "all"):
        evaluate(args)
    if args.stage in ("export", "all"):
        export(args)
    if args.stage == "restamp":
        restamp(args)


if __name__ == "__main__":
    main()
