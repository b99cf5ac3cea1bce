"""The encoder's training script on a tiny synthetic cache: a fine-tuned checkpoint exports into a full
encoder file that embeds exactly as the checkpoint did (the block renaming is where a silent mistake would
ship wrong weights), and the frozen and fine-tuned recipes stay deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mrlstore  # noqa: E402
from mrlstore.encoder.model import EfficientNetLite0  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from tools import train_encoder as te  # noqa: E402


@pytest.fixture()
def tiny_cache(tmp_path, monkeypatch):
    """300 'images': pooled features, teacher logits and activation maps, as the extract stages write them."""
    rng = np.random.default_rng(0)
    n = 300
    items = [("train" if i < 250 else "test", f"x/{i}.jpg", i % 10) for i in range(n)]
    (tmp_path / "index.json").write_text(json.dumps({"size": 128, "items": items}))
    np.savez(
        tmp_path / "shard_00.npz",
        features=rng.random((n, 1280)).astype(np.float16),
        logits=rng.normal(size=(n, 1000)).astype(np.float16),
    )
    maps = {f"block{c}": rng.normal(size=(n, 192, 4, 4)).astype(np.float16) for c in te.MAP_CUTS}
    np.savez(tmp_path / "maps_00.npz", **maps)

    def random_backbone():  # stands in for the ImageNet weights (a training-only dependency)
        torch.manual_seed(1)
        return EfficientNetLite0()

    monkeypatch.setattr(te, "_pretrained_backbone", random_backbone)
    return tmp_path


def test_finetuned_checkpoint_exports_to_an_encoder_that_embeds_identically(tiny_cache):
    ckpt = tiny_cache / "finetune_mrl.pt"
    te.finetune_stage(tiny_cache, 1, ckpt, cut=11, hidden=64, distill=0.3)
    data = te.load_cache(tiny_cache)
    from_checkpoint = te.embed_checkpoint(ckpt, data, tiny_cache)
    assert from_checkpoint.shape == (300, 2048) and np.isfinite(from_checkpoint).all()

    weights = tiny_cache / "exported.pt"
    te.export_stage(tiny_cache, ckpt, 128, weights)
    enc = mrlstore.load_encoder(weights, device="cpu")
    assert enc.dim == 2048
    from_encoder = te.embed_model(enc.model, tiny_cache, cut=11)
    # float16 weights in the exported file: close, not bit-equal
    scale = np.abs(from_checkpoint).max()
    assert np.abs(from_encoder - from_checkpoint).max() < 0.02 * scale
    # the tuned blocks land under the backbone's own names; the blocks before the cut stay pretrained
    tuned = torch.load(ckpt, weights_only=True)["state_dict"]
    pretrained = te._pretrained_backbone().state_dict()
    exported = enc.model.backbone.state_dict()
    pairs = [("_blocks.12._expand_conv.weight", tuned["blocks.0._expand_conv.weight"])]
    pairs += [("_blocks.15._bn2.running_mean", tuned["blocks.3._bn2.running_mean"])]
    pairs += [("_conv_head.weight", tuned["conv_head.weight"]), ("_bn1.weight", tuned["bn_head.weight"])]
    pairs += [(k, pretrained[k]) for k in ("_blocks.3._depthwise_conv.weight", "_blocks.11._project_conv.weight")]
    for k, want in pairs:
        torch.testing.assert_close(exported[k].float(), want.float(), atol=2e-3, rtol=2e-3)


def test_training_is_deterministic_under_the_fixed_seed(tiny_cache):
    runs = []
    for name in ("a.pt", "b.pt"):
        te.finetune_stage(tiny_cache, 1, tiny_cache / name, cut=14, hidden=32, distill=0.3, nesting=(8, 16))
        runs.append(te.embed_checkpoint(tiny_cache / name, te.load_cache(tiny_cache), tiny_cache))
    assert runs[0].shape == (300, 16)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_unknown_cut_and_baseline_names_are_refused(tiny_cache):
    with pytest.raises(SystemExit, match="cached after blocks"):
        te.load_maps(tiny_cache, 9)
    with pytest.raises(SystemExit, match="unknown baseline"):
        te.finetune_baselines_stage(tiny_cache, ["ff-big"], epochs=1, cut=11, hidden=32, distill=0.3, backbone_lr=5e-4)


def test_extraction_writes_whole_resumable_shards(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setattr(te, "_pretrained_backbone", lambda: EfficientNetLite0())
    files = sorted((ROOT / "examples" / "images").rglob("*.jpg"))[::6]
    zpath = tmp_path / "cifar.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for i, f in enumerate(files):
            z.write(f, f"{'train' if i % 4 else 'test'}/{te.CLASSES[i % 10]}/{i:04d}.jpg")  # laid out as CIFAR-10
    cache = tmp_path / "cache"
    te.extract(zpath, cache, 64, 8)
    te.extract_maps(zpath, cache, 64, 8, te.MAP_CUTS)
    data = te.load_cache(cache)
    n = len(files)
    assert data["features"].shape == (n, 1280) and data["logits"].shape == (n, 1000)
    assert te.load_maps(cache, 11).shape == (n, 192, 2, 2) and te.load_maps(cache, 14).shape == (n, 192, 2, 2)
    assert list(data["labels"][:3]) == [te.CLASSES.index(n.split("/")[1]) for _, n, _ in data["names"][:3]]
    assert not list(cache.glob("*.tmp.npz"))
    stamp = (cache / "maps_00.npz").stat().st_mtime_ns
    te.extract_maps(zpath, cache, 64, 8, te.MAP_CUTS)  # resumes: nothing left to do
    assert (cache / "maps_00.npz").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="another image list or size"):
        te.extract_maps(zpath, cache, 32, 8, te.MAP_CUTS)
