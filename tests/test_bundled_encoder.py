"""The shipped encoder: loads offline without pickle, checks its checksum, and retrieves by meaning on the
sample photos shipped with the demo (Caltech-101 photos of classes no training set contains)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mrlstore  # noqa: E402
from mrlstore.encoder import model as encoder_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"


@pytest.fixture(scope="module")
def bundled():
    return mrlstore.load_encoder(device="cpu")


@pytest.fixture(scope="module")
def sample(bundled):
    files = sorted(IMAGES.rglob("*.jpg"))
    labels = np.array([p.parent.name for p in files])
    return bundled.encode([str(p) for p in files], progress=False), labels


def test_weights_ship_small_without_pickle_and_without_the_imagenet_classifier():
    path = encoder_module.BUNDLED_WEIGHTS
    assert path.stat().st_size < 20 * 2**20
    blob = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only
    assert not any(k.startswith("backbone._fc.") for k in blob["state_dict"])
    assert {v.dtype for v in blob["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    assert blob["meta"]["dim"] == 2048 and blob["meta"]["nesting"] == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def test_bundled_encoder_shape_and_determinism(bundled, sample):
    x, _ = sample
    assert (bundled.dim, bundled.nesting) == (2048, (8, 16, 32, 64, 128, 256, 512, 1024, 2048))
    assert x.shape == (120, 2048) and x.dtype == np.float32 and np.isfinite(x).all()
    again = bundled.encode([str(p) for p in sorted(IMAGES.rglob("*.jpg"))[:7]], batch_size=3, progress=False)
    np.testing.assert_allclose(again, x[:7], rtol=1e-4, atol=1e-4)


def leave_one_out_1nn(x: np.ndarray, labels: np.ndarray, m: int) -> float:
    p = x[:, :m] / np.linalg.norm(x[:, :m], axis=1, keepdims=True)
    s = p @ p.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(labels[s.argmax(1)] == labels))


def test_prefixes_retrieve_by_class_on_unseen_images(sample):
    # 10 classes: chance is 0.1. Measured with the shipped v3.1 (192 px): 0.70 / 0.925 / 0.958 / 0.967 at
    # m = 8 / 16 / 64 / 2048 (v3 at 160 px: 0.78 / 0.90 / 0.975 / 0.975; v2: 0.80 / 0.86 / 0.90 / 0.93).
    x, labels = sample
    acc = {m: leave_one_out_1nn(x, labels, m) for m in (8, 16, 64, 2048)}
    print("leave-one-out 1-NN on the 120 sample images:", acc)
    assert acc[2048] >= 0.9 and acc[64] >= 0.9
    assert acc[16] >= 0.8 and acc[8] >= 0.6  # short prefixes are embeddings too (the Matryoshka property)


def test_a_corrupt_bundled_file_fails_its_checksum(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    shutil.copytree(encoder_module.WEIGHTS_DIR, weights)
    target = weights / encoder_module.BUNDLED_WEIGHTS.name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setattr(encoder_module, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(encoder_module, "BUNDLED_WEIGHTS", target)
    with pytest.raises(mrlstore.EncoderUnavailableError, match="sha256"):
        mrlstore.load_encoder()


@pytest.mark.slow
def test_the_readme_demo_runs_offline(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--store", str(tmp_path / "s"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dims=[16, 2048]" in out.stdout and (tmp_path / "query_grid.png").stat().st_size > 10_000


def test_a_new_store_adds_and_queries_images_with_the_bundled_encoder(tmp_path):
    files = [str(p) for p in sorted(IMAGES.rglob("*.jpg"))[::6]]
    with mrlstore.open(tmp_path / "photos.mrl") as store:  # no dim: the bundled encoder, loaded on first use
        ids = store.add(files, metadata=[{"label": Path(f).parent.name} for f in files])
        hits = store.query(files[4], k=3, dims=[16, 2048])
        assert hits.ids[0] == ids[4] and hits.scores[0] == pytest.approx(1.0, abs=2e-3)
        assert hits.metadata[0] == {"label": Path(files[4]).parent.name, "path": files[4]}
    with mrlstore.open(tmp_path / "photos.mrl", read_only=True) as store:  # reopened: encoder from the manifest
        assert store.query(files[7], k=1, dims=[16, 2048]).ids == [ids[7]]


def test_a_store_made_with_the_bundled_encoder_passed_is_the_bundled_encoders(tmp_path, bundled):
    """As the demo makes it (``encoder=load_encoder()``): it recorded the encoder's name, so reopened without
    one it took no images ("this store has no encoder for images"); another input size is another encoder."""
    files = [str(p) for p in sorted(IMAGES.rglob("*.jpg"))[::12]]
    with mrlstore.open(tmp_path / "s", encoder=bundled) as store:
        ids = store.add(files)
        assert store.manifest["encoder"] == "bundled"
        assert store.manifest["encoder_weights"] == encoder_module.bundled.bundled_weights_id()
    with mrlstore.open(tmp_path / "s", read_only=True) as store:
        assert store.query(files[2], k=1, dims=[16, 2048]).ids == [ids[2]]
    other = mrlstore.load_encoder(device="cpu", image_size=128)
    with mrlstore.open(tmp_path / "t", encoder=other) as store:
        assert store.manifest["encoder"] == other.name and store.manifest.get("encoder_weights") is None


def test_a_folder_through_the_bundled_encoder_as_the_readme_shows(tmp_path):
    folder = IMAGES / "camera"
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with mrlstore.open(tmp_path / "photos.mrl") as store:
        ids = store.add(folder)
        assert len(ids) == len(files) == len(store)
        assert sorted(store.sql("SELECT path FROM items").column("path").to_pylist()) == files
        assert store.add(folder).skipped == list(ids)  # the same folder again: nothing new
        assert store.query(files[0], k=1, dims=[16, 2048]).ids == [ids[0]]


def test_a_store_made_with_other_bundled_weights_refuses_image_queries_but_not_vectors(tmp_path, monkeypatch):
    from mrlstore.upkeep import opening

    files = [str(p) for p in sorted(IMAGES.rglob("*.jpg"))[::20]]
    with mrlstore.open(tmp_path / "now.mrl") as store:
        store.add(files[:2])
        assert store.info()["encoder"] == "bundled"
        assert store.manifest["encoder_weights"] == encoder_module.sha256_of(encoder_module.BUNDLED_WEIGHTS)
    # a store made by a release that shipped other weights (here: the installed file seen with another hash)
    monkeypatch.setattr(opening, "bundled_weights_id", lambda: "0" * 64)
    with mrlstore.open(tmp_path / "old.mrl") as store:
        store.add_vectors(np.eye(2, 2048, dtype=np.float32), ids=["a", "b"])
    monkeypatch.undo()
    with mrlstore.open(tmp_path / "old.mrl") as store:
        with pytest.raises(mrlstore.EncoderUnavailableError, match="sha256 000000000000.*load_encoder"):
            store.query(files[0], k=1)
        with pytest.raises(mrlstore.EncoderUnavailableError):
            store.add(files[:1])
        assert len(store) == 2 and store.query(np.eye(1, 2048, dtype=np.float32)[0], k=1).ids == ["a"]
        store.encoder = mrlstore.load_encoder()  # an explicit encoder is the user's call
        assert len(store.query(files[0], k=1).ids) == 1


def test_a_store_of_the_v3_weights_at_160_px_keeps_encoding_images_as_they_were(tmp_path, monkeypatch):
    from mrlstore.encoder import bundled as bundled_ids
    from mrlstore.upkeep import opening

    earlier, (installed, size) = next(iter(bundled_ids.SAME_TENSORS_AT.items()))
    assert installed == bundled_ids.bundled_weights_id() and size == 160
    files = [str(p) for p in sorted(IMAGES.rglob("*.jpg"))[::30]]
    monkeypatch.setattr(opening, "bundled_weights_id", lambda: earlier)  # as v3 (160 px) recorded it
    with mrlstore.open(tmp_path / "v3.mrl") as store:
        assert store.manifest["encoder_weights"] == earlier
    monkeypatch.undo()
    at_160 = mrlstore.load_encoder(image_size=160)
    assert at_160.image_size == 160 and mrlstore.load_encoder().image_size == 192
    with mrlstore.open(tmp_path / "v3.mrl") as store:
        ids = store.add(files).ids
        stored = np.stack(store.get(ids).column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, at_160.encode(files, progress=False), rtol=1e-3, atol=1e-3)
        assert not np.allclose(stored, mrlstore.load_encoder().encode(files, progress=False), atol=0.05)
        assert store.query(files[1], k=1).ids == [ids[1]]
    with pytest.raises(mrlstore.InvalidInputError, match="image_size must be an integer"):
        mrlstore.load_encoder(image_size=8)


CALTECH = ROOT.parent / "shared" / "datasets" / "caltech101-ood" / "caltech101-ood.zip"


@pytest.mark.skipif(not CALTECH.exists(), reason="needs ../shared/datasets/caltech101-ood (CI has it)")
def test_photos_of_classes_no_training_set_contains_retrieve_by_class(bundled):
    import io
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(CALTECH) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        classes = sorted({n.split("/")[-2] for n in names})[:12]
        picked = [n for c in classes for n in [m for m in names if m.split("/")[-2] == c][:8]]
        photos = [Image.open(io.BytesIO(z.read(n))) for n in picked]
    labels = np.array([n.split("/")[-2] for n in picked])
    x = bundled.encode(photos, progress=False)
    acc = {m: leave_one_out_1nn(x, labels, m) for m in (8, 16, 2048)}
    print("caltech101-ood, 12 classes x 8 photos, leave-one-out 1-NN:", acc)
    # 12 classes (chance 0.08); measured with v3.1: 0.70 / 0.80 / 0.95 at m = 8 / 16 / 2048 (v3: 0.76 / 0.81 / 0.94)
    assert acc[2048] >= 0.85 and acc[16] >= 0.7 and acc[8] >= 0.65


def test_large_photos_are_shrunk_as_they_are_decoded_and_encode_as_alone(bundled, tmp_path):
    """A batch held every decoded photo at full size until the encoder ran: 64 photos of 12 MP, 2.3 GB."""
    import tracemalloc

    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    with mrlstore.open(tmp_path / "s") as store:
        tracemalloc.start()
        added = store.add(tmp_path, batch_size=64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stored = np.stack(store.get(list(added), dims=2048).column("vector").to_numpy(zero_copy_only=False))
    assert peak < 4 * 1500 * 2000 * 3  # about one photo decoded at a time (the six held 54 MB)
    alone = bundled.encode(sorted(tmp_path.glob("p*.png"))).astype(np.float16).astype(np.float32)
    assert np.allclose(stored, alone, atol=1e-3)  # as the encoder gives them
