"""The image encoder: input kinds, shapes, determinism, bad files (random weights: no download, no shared/)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

import mrlstore  # noqa: E402
from mrlstore.encoder.model import (  # noqa: E402
    EfficientNetLite0,
    ImageEncoder,
    MRLImageModel,
    fold_batchnorm,
    load_encoder,
    preprocess,
    save_encoder,
)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = MRLImageModel(hidden=64, dim=128)
    return ImageEncoder(model, nesting=(8, 16, 32, 64, 128), name="test", device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub").mkdir()
    arrays = [rng.integers(0, 256, (32 + 8 * i, 40, 3), dtype=np.uint8) for i in range(5)]
    paths = []
    for i, a in enumerate(arrays):
        p = root / ("sub" if i % 2 else ".") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(a).save(p, quality=95)
        paths.append(p.resolve())
    (root / "notes.txt").write_text("not an image")
    return root, arrays, paths


def test_backbone_matches_the_imagenet_layout():
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    keys = set(model.state_dict())
    assert {"_conv_stem.weight", "_blocks.15._project_conv.weight", "_conv_head.weight", "_fc.bias"} <= keys
    with torch.inference_mode():
        assert model.features(torch.zeros(2, 3, 128, 128)).shape == (2, 1280)
        assert model(torch.zeros(1, 3, 97, 131)).shape == (1, 1000)  # "same" padding: any size


def test_shapes_and_determinism(encoder, images):
    _, arrays, _ = images
    a = encoder.encode(arrays)
    b = encoder.encode(arrays, batch_size=2)
    assert a.shape == (5, 128) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # batching does not change results
    np.testing.assert_array_equal(a, encoder.encode(arrays))


def test_every_input_kind_gives_the_same_vector(encoder, images, tmp_path):
    root, arrays, paths = images
    rgb = np.asarray(Image.open(paths[0]).convert("RGB"))
    ref = encoder.encode([rgb])[0]
    variants = {
        "path": [str(paths[0])],
        "pathlib": [paths[0]],
        "pil": [Image.open(paths[0])],
        "uint8 HxWx3": rgb,
        "uint8 NxHxWx3": rgb[None],
        "tensor HWC": torch.from_numpy(rgb.copy()),
        "tensor CHW float": torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0,
    }
    for name, value in variants.items():
        np.testing.assert_allclose(encoder.encode(value)[0], ref, atol=2e-2, err_msg=name)


def test_grayscale_and_rgba_are_converted(encoder):
    gray = np.full((40, 40), 120, np.uint8)
    rgba = np.dstack([np.full((40, 40, 3), 120, np.uint8), np.full((40, 40), 255, np.uint8)])
    out = encoder.encode([gray, rgba, Image.fromarray(gray, "L"), Image.fromarray(rgba, "RGBA")])
    np.testing.assert_allclose(out, np.repeat(out[:1], 4, axis=0), atol=1e-4)


def test_folders_are_read_recursively_and_sorted(encoder, images):
    root, arrays, paths = images
    from_folder = encoder.encode(root)
    assert from_folder.shape == (5, 128)
    ordered = sorted(str(p) for p in paths)
    np.testing.assert_allclose(from_folder, encoder.encode(ordered), atol=1e-5)


def test_bad_files_name_the_file(encoder, images, tmp_path):
    _, _, paths = images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(mrlstore.InvalidInputError, match="broken.jpg"):
        encoder.encode([paths[0], broken])
    with pytest.raises(mrlstore.InvalidInputError, match="not found"):
        encoder.encode([tmp_path / "missing.png"])
    failures: list = []
    out = encoder.encode([paths[0], broken, paths[1]], skip_errors=True, failures=failures)
    assert out.shape == (2, 128) and [f.index for f in failures] == [1] and "broken.jpg" in failures[0].source
    with pytest.raises(mrlstore.InvalidInputError, match="shape"):
        encoder.encode([np.zeros((4, 4, 5), np.uint8)])


def test_preprocess_crops_the_centre_square():
    wide = np.zeros((64, 256, 3), np.uint8)
    wide[:, 96:160] = 255  # a white square in the middle
    x = preprocess(wide, size=32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[:, :, 8:24].mean() > 0.9  # the centre survives the crop


def test_save_and_load_without_pickle(encoder, tmp_path, images):
    _, arrays, _ = images
    path = tmp_path / "enc.pt"
    save_encoder(encoder.model, path, {"name": "roundtrip", "dim": 128, "hidden": 64, "nesting": [8, 128]}, half=False)
    loaded = load_encoder(path, device="cpu")
    assert (loaded.dim, loaded.nesting, loaded.name) == (128, (8, 128), "roundtrip")
    np.testing.assert_allclose(loaded.encode(arrays), encoder.encode(arrays), atol=1e-5)
    with pytest.raises(mrlstore.EncoderUnavailableError):
        load_encoder(tmp_path / "nope.pt")


def test_folding_batch_norm_keeps_the_function():
    torch.manual_seed(1)
    model = MRLImageModel(hidden=64, dim=128).eval()
    for bn in (m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.5)  # statistics far from the identity, so a wrong fold shows
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.data.normal_(1, 0.3)
        bn.bias.data.normal_(0, 0.3)
    x = torch.randn(3, 3, 48, 40)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    with torch.inference_mode():
        want, got = model(x), folded(x.contiguous(memory_format=torch.channels_last))
    assert want.abs().max() > 1e-2  # the model is not trivially constant here
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_the_input_size_comes_from_the_file_and_a_bad_one_is_refused(encoder, tmp_path, images):
    _, arrays, _ = images
    meta = {"name": "big", "dim": 128, "nesting": [8, 128]}
    save_encoder(encoder.model, tmp_path / "old.pt", meta, half=False)
    save_encoder(encoder.model, tmp_path / "big.pt", {**meta, "image_size": 160}, half=False)
    assert load_encoder(tmp_path / "old.pt", device="cpu").image_size == 128  # files before v3 name no size
    big = load_encoder(tmp_path / "big.pt", device="cpu")
    assert big.image_size == 160 and "input=160px" in repr(big)
    seen: list[tuple[int, ...]] = []
    hook = big._inference.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    big.encode(arrays)
    hook.remove()
    assert seen == [(len(arrays), 3, 160, 160)]
    for bad in (8, "160", 4096):
        save_encoder(encoder.model, tmp_path / "bad.pt", {**meta, "image_size": bad}, half=False)
        with pytest.raises(mrlstore.EncoderUnavailableError, match="image_size"):
            load_encoder(tmp_path / "bad.pt", device="cpu")


def test_store_add_and_query_images(encoder, images, tmp_path):
    root, arrays, paths = images
    with mrlstore.open(tmp_path / "s", encoder=encoder, bands=(16, 128), index_dims=(8,)) as store:
        ids = store.add([str(p) for p in paths], metadata=[{"i": i} for i in range(5)])
        assert len(ids) == 5
        # random weights map every image to nearly one direction: the query's own entry must score
        # 1 (cosine, up to float16 storage), and may tie with near-duplicates
        hits = store.query(str(paths[3]), k=5, dims=[8, 128])
        own = hits.ids.index(ids[3])
        assert hits.scores[own] == pytest.approx(1.0, abs=1e-3) and hits.scores[own] >= hits.scores[0] - 1e-3
        assert hits.metadata[own] == {"i": 3, "path": str(paths[3])}
        hits = store.query(arrays[2], k=5, dims=[8, 128])  # a uint8 array is an image, not a vector
        assert hits.scores[hits.ids.index(ids[2])] == pytest.approx(1.0, abs=1e-3)


def test_preprocess_resamples_only_the_centre_square():
    """A thin strip is cropped before it is resampled: a 100000x1 image made a 19,200,000x192 intermediate
    (about 11 GB) when the whole image was resized first."""
    strip = np.full((1, 100_000, 3), 200, np.uint8)
    x = preprocess(strip, size=32)
    assert x.shape == (3, 32, 32) and np.allclose(x, (200 - 127) / 128)
