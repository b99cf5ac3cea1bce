"""Every documented image input, through the store: add, query, ids, conflicts, errors (a toy encoder that
reads the decoded pixels, so the tests need neither torch nor weights)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from errors_support import without_root_file_access
from PIL import Image

import mrlstore
from mrlstore.inputs.classify import looks_like_vectors


class PixelEncoder:
    """A 48-d 'embedding' of the decoded pixels: the store hands over uint8 HxWx3 arrays."""

    dim = 48
    nesting = (8, 16, 48)

    def __init__(self):
        self.seen = 0

    def encode(self, images):  # as README describes an encoder: no batch_size
        out = []
        for im in images:
            assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
            small = np.asarray(Image.fromarray(im).resize((4, 4))).astype(np.float32).ravel()
            out.append(small + 1.0)
        self.seen += len(images)
        return np.stack(out)


def _pixels(seed: int, size=(20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_pixels(i)).save(root / f"p{i}.png")
    Image.fromarray(_pixels(3)).save(root / "sub" / "q.jpg", quality=95)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def store(tmp_path):
    encoder = PixelEncoder()
    s = mrlstore.open(tmp_path / "s", encoder=encoder, bands=(8, 48), index_dims=(8,))
    yield s
    s.close()


def test_a_folder_adds_its_image_files_recursively_sorted(store, photos):
    ids = store.add(photos)
    assert len(ids) == 4 and len(store) == 4
    paths = store.sql("SELECT path FROM items ORDER BY path").column("path").to_pylist()
    assert paths == sorted(str(p) for p in [*photos.glob("*.png"), photos / "sub" / "q.jpg"])
    hits = store.query(photos / "p1.png", k=1, dims=[8, 48])
    assert hits.metadata[0]["path"] == str(photos / "p1.png")


def test_a_list_mixing_files_folders_and_paths(store, photos, tmp_path):
    other = tmp_path / "x.png"
    Image.fromarray(_pixels(9)).save(other)
    ids = store.add([str(other), photos / "sub", photos / "p0.png"])
    assert len(ids) == 3 and len(store) == 3


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Image.fromarray(_pixels(5)), id="pil"),
        pytest.param(lambda: _pixels(5), id="uint8-HxWx3"),
        pytest.param(lambda: _pixels(5)[:, :, 0], id="uint8-HxW"),
        pytest.param(lambda: _pixels(5).astype(np.float32) / 255.0, id="float-HxWx3"),
        pytest.param(lambda: _pixels(5)[:, :, 0].astype(np.float64) / 255.0, id="float-HxW"),
        pytest.param(lambda: np.dstack([_pixels(5), np.full((20, 24), 255, np.uint8)]), id="uint8-HxWx4"),
        pytest.param(lambda: _png_bytes(_pixels(5)), id="bytes"),
        pytest.param(lambda: io.BytesIO(_png_bytes(_pixels(5))), id="file-object"),
    ],
)
def test_every_in_memory_image_kind_adds_and_queries(store, make):
    ids = store.add(make())
    assert len(ids) == 1 and len(store) == 1
    hits = store.query(make(), k=1, dims=[8, 48])  # one image in: one Hits out
    assert hits.ids == list(ids) and hits.scores[0] == pytest.approx(1.0, abs=1e-3)


def test_a_batch_array_is_several_images_and_a_list_gives_a_list(store):
    batch = np.stack([_pixels(i) for i in range(3)])  # NxHxWx3
    ids = store.add(batch)
    assert len(ids) == 3
    results = store.query(batch, k=1, dims=[8, 48])
    assert [h.ids[0] for h in results] == list(ids)
    assert [h.ids[0] for h in store.query([batch[0], batch[2]], k=1, dims=[8, 48])] == [ids[0], ids[2]]


def test_torch_tensors(store):
    torch = pytest.importorskip("torch")
    chw = torch.from_numpy(_pixels(4)).permute(2, 0, 1).float() / 255.0
    ids = store.add(chw)
    assert store.query(chw, k=1, dims=[8, 48]).ids == list(ids)


def test_readding_the_same_images_is_idempotent_and_conflicts_follow_the_policy(store, photos):
    first = store.add(photos)
    encoded = store.encoder.seen
    assert first.added == list(first) and len(first.added) == 4
    again = store.add(photos)  # same content, same ids: nothing encoded, nothing added
    assert list(again) == list(first) and sorted(again.skipped) == sorted(first) and again.added == []
    assert repr(again) == "AddResult(4 images: 0 added, 4 skipped, 0 failed)"
    assert len(store) == 4 and store.encoder.seen == encoded
    with pytest.raises(mrlstore.DuplicateIdError, match="on_conflict"):
        store.add(photos / "p0.png", on_conflict="error")
    replaced = store.add([photos / "p0.png", _pixels(9)], metadata=[{"tag": "new"}, {}], on_conflict="replace")
    assert len(store) == 5 and replaced.replaced == [first[0]] and len(replaced.added) == 2
    assert repr(replaced) == "AddResult(2 images: 2 added (1 of them replaced), 0 skipped, 0 failed)"
    assert store.get([first[0]]).column("tag").to_pylist() == ["new"]
    with pytest.raises(mrlstore.InvalidInputError, match="on_conflict"):
        store.add(photos, on_conflict="overwrite")


def test_upsert_images_with_explicit_ids(store):
    store.add([_pixels(1), _pixels(2)], ids=["a", "b"], metadata=[{"n": 1}, {"n": 2}])
    assert store.upsert(_pixels(7), ids=["a"]).replaced == ["a"]  # no metadata: the old metadata stays
    assert len(store) == 2
    table = store.get(["a"])
    assert table.column("n").to_pylist() == [1]
    assert store.query(_pixels(7), k=1, dims=[8, 48]).ids == ["a"]


def test_upsert_vectors_keeps_or_clears_metadata_by_choice(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with mrlstore.open(tmp_path / "v", dim=16, bands=(8, 16), index_dims=(8,)) as s:
        s.add_vectors(x, ids=["a", "b", "c"], metadata=[{"n": 1}, {"n": 2}, {"n": 3}])
        s.upsert_vectors(x[:2] + 1, ids=["a", "z"])  # default: keep "a"'s metadata; "z" is new
        assert s.get(["a", "z"]).column("n").to_pylist() == [1, None]
        s.upsert_vectors(x[1:2] + 2, ids=["b"], keep_metadata=False)
        assert s.get(["b"]).column("n").to_pylist() == [None]


def test_a_bad_file_fails_before_encoding_and_writes_nothing(store, photos):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(mrlstore.UnreadableImageError, match="broken.png.*skip_errors=True"):
        store.add(photos)
    assert store.encoder.seen == 0 and len(store) == 0
    with pytest.raises(mrlstore.InvalidInputError, match="not found"):
        store.add([photos / "p0.png", photos / "missing.png"])
    assert store.encoder.seen == 0 and len(store) == 0


def test_skip_errors_reports_what_was_left_out(store, photos):
    (photos / "broken.jpg").write_bytes(b"garbage")
    result = store.add(photos, skip_errors=True)
    assert len(result) == 4 and len(store) == 4
    assert [f.source for f in result.failed] == [str(photos / "broken.jpg")]
    assert "cannot read image" in result.failed[0].reason


def test_a_file_whose_pixels_break_after_a_good_header(store, photos):
    good = (photos / "sub" / "q.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 3])  # the header reads; the pixels end early
    with pytest.raises(mrlstore.InvalidInputError, match="cut.jpg"):
        store.add(photos)
    assert len(store) == 0  # nothing written
    result = store.add(photos, skip_errors=True)
    assert len(store) == 4 and len(result) == 4
    assert [f.source for f in result.failed] == [str(photos / "cut.jpg")]


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "s3://bucket/cat.jpg"])
def test_urls_are_a_clear_error(store, url):
    with pytest.raises(mrlstore.InvalidInputError, match="URL"):
        store.add(url)
    with pytest.raises(mrlstore.InvalidInputError, match="URL"):
        store.query(url)
    assert len(store) == 0


def test_the_rule_that_tells_images_from_vectors():
    assert looks_like_vectors(np.ones(48, np.float32), 48)
    assert looks_like_vectors(np.ones((5, 48), np.float32), 48)
    assert looks_like_vectors([0.1] * 48, 48) and looks_like_vectors([[0.1] * 48] * 2, 48)
    assert not looks_like_vectors(np.ones((20, 24), np.float32), 48)  # HxW grayscale
    assert not looks_like_vectors(np.ones((20, 48), np.uint8), 48)  # uint8: always an image
    assert not looks_like_vectors(np.ones((20, 24, 3), np.float32), 48)
    assert not looks_like_vectors(b"\x89PNG", 48) and not looks_like_vectors("a.jpg", 48)


def test_add_of_vectors_points_at_add_vectors(store):
    dim = store.dim
    for vectors in (np.ones((3, dim), np.float32), [0.5] * dim):
        with pytest.raises(mrlstore.InvalidInputError, match="add_vectors"):
            store.add(vectors)
    assert len(store) == 0


def test_a_store_without_an_encoder_says_what_to_do(tmp_path):
    with mrlstore.open(tmp_path / "v", dim=16, bands=(8, 16), index_dims=(8,)) as s:
        with pytest.raises(mrlstore.EncoderUnavailableError, match="no encoder"):
            s.add(_pixels(0))
        with pytest.raises(mrlstore.ShapeError):
            s.query(np.ones((1, 1, 16), np.float32))


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class InterruptedEncoder(PixelEncoder):
    """Raises KeyboardInterrupt (a user's Ctrl-C) once it has encoded ``stop_after`` images."""

    def __init__(self, stop_after: int):
        super().__init__()
        self.stop_after = stop_after

    def encode(self, images):
        if self.seen + len(images) > self.stop_after:
            raise KeyboardInterrupt
        return super().encode(images)


@pytest.fixture
def many_photos(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(23):
        Image.fromarray(_pixels(100 + i)).save(root / f"m{i:02d}.png")
    return root


def test_an_interrupted_add_keeps_its_committed_batches_and_resumes(tmp_path, many_photos):
    path = tmp_path / "s"
    with mrlstore.open(path, encoder=InterruptedEncoder(stop_after=12), bands=(8, 48), index_dims=(8,)) as s:
        with pytest.raises(KeyboardInterrupt):
            s.add(many_photos, batch_size=2, commit_every=5)
        assert len(s) == 10  # two commits of 5; the third batch was being encoded
    encoder = PixelEncoder()
    with mrlstore.open(path, encoder=encoder) as s:
        result = s.add(many_photos, batch_size=2, commit_every=5)
        assert encoder.seen == 13 and len(result.added) == 13 and len(result.skipped) == 10
        assert len(s) == 23 and s.verify() == []
        assert sorted(s.sql("SELECT path FROM items").column("path").to_pylist()) == sorted(
            str(p) for p in many_photos.iterdir()
        )


def test_atomic_adds_are_all_or_nothing(tmp_path, many_photos):
    with mrlstore.open(tmp_path / "s", encoder=InterruptedEncoder(stop_after=12), bands=(8, 48), index_dims=(8,)) as s:
        with pytest.raises(KeyboardInterrupt):
            s.add(many_photos, batch_size=2, commit_every=5, atomic=True)
        assert len(s) == 0
        with pytest.raises(mrlstore.InvalidInputError, match="commit_every"):
            s.add(many_photos, commit_every=0)


def test_a_decode_error_part_way_says_what_stayed(store, many_photos):
    Image.fromarray(_pixels(99, (64, 64))).save(many_photos / "m20.jpg", quality=95)
    good = (many_photos / "m20.jpg").read_bytes()
    (many_photos / "m20.png").unlink()
    (many_photos / "m20.jpg").write_bytes(good[: len(good) // 3])  # the header reads; the pixels do not
    with pytest.raises(mrlstore.UnreadableImageError, match="m20.jpg.*the 20 images committed before it stay"):
        store.add(many_photos, batch_size=4, commit_every=10)
    assert len(store) == 20
    result = store.add(many_photos, skip_errors=True)
    assert len(store) == 22 and [f.source for f in result.failed] == [str(many_photos / "m20.jpg")]
    assert len(result) == 22 and len(result.added) == 2


def test_stored_paths_are_absolute(store, photos, monkeypatch):
    monkeypatch.chdir(photos.parent)
    store.add(["photos/p0.png", "photos/./sub"])
    paths = sorted(store.sql("SELECT path FROM items").column("path").to_pylist())
    assert paths == [str(photos / "p0.png"), str(photos / "sub" / "q.jpg")]


class Decoded:
    """Records the pixels the store hands the encoder."""

    dim, nesting = 48, (8, 16, 48)

    def __init__(self):
        self.images = []

    def encode(self, images, batch_size=64):
        self.images.extend(images)
        return PixelEncoder().encode(images)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG") if mode else Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_deep_pixels_are_scaled_to_8_bits_not_clipped(tmp_path):
    """16-bit files and arrays, and float images, keep their picture: scaled, where a conversion to RGB
    clipped every value past 255 (two 16-bit gradients decoded to almost all white)."""
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    encoder = Decoded()
    with mrlstore.open(tmp_path / "s", encoder=encoder, bands=(8, 48), index_dims=(8,)) as store:
        store.add([_png(ramp), ramp, Image.fromarray((ramp / 65535).astype(np.float32), "F")])
    expected = np.repeat((ramp / 257).round().astype(np.uint8)[:, :, None], 3, axis=2)
    for decoded in encoder.images:
        assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_file_objects_are_read_once_and_checked_like_bytes(store):
    """A file object is read into bytes: its header is checked before anything is written (with ids given
    too), skip_errors leaves a broken one out, a pipe that cannot seek works, and its id is its bytes'."""
    good = _png_bytes(_pixels(1))
    with pytest.raises(mrlstore.UnreadableImageError, match="skip_errors"):
        store.add([io.BytesIO(_png_bytes(_pixels(2))), io.BytesIO(b"not an image")], ids=["a", "b"], commit_every=1)
    assert len(store) == 0
    result = store.add([io.BytesIO(good), io.BytesIO(b"broken")], skip_errors=True)
    assert len(result.added) == 1 and [f.index for f in result.failed] == [1]
    assert store.add(good).skipped == result.added  # the same content id as the bytes themselves


def test_empty_and_odd_in_memory_images_are_checked_before_anything_is_written(store):
    with pytest.raises(mrlstore.UnreadableImageError, match="0x0 pixels"):
        store.add([_pixels(1), np.zeros((0, 0, 3), np.uint8)], commit_every=1)
    assert len(store) == 0
    result = store.add([_pixels(1), np.zeros((5, 0, 3), np.uint8), Image.new("RGB", (0, 0))], skip_errors=True)
    assert len(result.added) == 1 and [f.index for f in result.failed] == [1, 2]
    with pytest.raises(mrlstore.UnreadableImageError, match="no pixels|none to encode"):
        store.query(np.zeros((5, 0, 3), np.uint8), k=1)


def test_bfloat16_tensors(store):
    torch = pytest.importorskip("torch")
    image = torch.from_numpy(_pixels(4)).permute(2, 0, 1).to(torch.bfloat16) / 255.0
    ids = store.add(image)
    assert store.query(image, k=1, dims=[8, 48]).ids == list(ids)


def test_a_file_name_that_is_not_utf8_is_named_and_can_be_skipped(store, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    Image.fromarray(_pixels(1)).save(folder / "ok.png")
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(_png_bytes(_pixels(2)))
    with pytest.raises(mrlstore.UnreadableImageError, match="not valid UTF-8"):
        store.add(folder)
    result = store.add(folder, skip_errors=True)
    assert len(result.added) == 1 and len(result.failed) == 1 and len(store) == 1


def test_exif_orientation_is_applied_as_viewers_show_the_photo(tmp_path):
    """A phone photo stores its pixels sideways and an EXIF orientation tag: the encoder sees it upright,
    from a file, from bytes and from an opened PIL image, and an image without the tag is left as it is."""
    upright = _pixels(5, size=(20, 32))
    sideways = Image.fromarray(np.rot90(upright, k=1))  # stored turned a quarter left, as a camera would
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    path = tmp_path / "phone.jpg"
    sideways.save(path, exif=exif, quality=100, subsampling=0)
    encoder = Decoded()
    with mrlstore.open(tmp_path / "s", encoder=encoder, bands=(8, 48), index_dims=(8,)) as store:
        store.add([path, path.read_bytes(), Image.open(path), upright], ids=["file", "bytes", "pil", "plain"])
    assert [im.shape for im in encoder.images] == [upright.shape] * 4
    for decoded in encoder.images[:3]:  # a JPEG round trip: close, not equal
        assert np.abs(decoded.astype(int) - upright).mean() < 8
    assert np.array_equal(encoder.images[3], upright)


def test_symlinked_subfolders_are_followed_once(store, photos, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(_pixels(7)).save(elsewhere / "linked.png")
    (photos / "sub" / "link").symlink_to(elsewhere, target_is_directory=True)
    (photos / "sub" / "loop").symlink_to(photos, target_is_directory=True)  # a link back up: no loop
    (photos / "a_link").symlink_to(photos / "sub", target_is_directory=True)  # sorts before the real one
    store.add(photos)
    paths = store.sql("SELECT path FROM items").column("path").to_pylist()
    assert str(photos / "sub" / "link" / "linked.png") in paths
    assert len(store) == 5 and len(paths) == 5
    assert not [p for p in paths if "a_link" in p], "a file inside the folder is named by its own path"


def test_an_encoder_without_prepare_gets_batches_of_bounded_pixels(store, photos, monkeypatch):
    from mrlstore.encoder import runner

    encoder = store.encoder
    sizes = []
    encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda images, batch_size=64: sizes.append(len(images)) or encode(images))
    monkeypatch.setattr(runner, "DECODED_BATCH_BYTES", 2 * 20 * 24 * 3)  # two of these photos
    assert len(store.add(photos)) == 4
    assert sizes == [2, 2]


def test_a_dark_16_bit_file_is_scaled_by_its_mode(tmp_path):
    """A 16-bit file with no pixel above 255 was read as 8-bit (256 times too bright): two files one level
    apart in one pixel encoded at cosine 0.25."""
    dark = np.full((16, 16), 200, dtype=np.uint16)
    encoder = Decoded()
    with mrlstore.open(tmp_path / "s", encoder=encoder, bands=(8, 48), index_dims=(8,)) as store:
        store.add([_png(dark)])
    assert Image.open(io.BytesIO(_png(dark))).mode.startswith("I;16")
    assert encoder.images[0].max() == 1  # 200 / 257, rounded


def test_pil_images_whose_pixels_cannot_load_are_typed_and_skippable(store, tmp_path):
    good = _pixels(0)
    Image.fromarray(_pixels(1, (64, 64))).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])  # the header reads; the pixels do not
    with pytest.raises(mrlstore.UnreadableImageError, match="cannot read the pixels"):
        store.add([good, Image.open(tmp_path / "t.jpg")])
    assert len(store) == 0
    result = store.add([good, Image.open(tmp_path / "t.jpg")], skip_errors=True)
    assert len(result.added) == 1 and len(result.failed) == 1
    with pytest.raises(mrlstore.UnreadableImageError):
        store.query(Image.open(tmp_path / "t.jpg"), k=1)


def test_heic_files_in_a_folder_are_named_with_what_reads_them(store, photos):
    """A folder's .heic and .avif photos were left out without a word."""
    (photos / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(mrlstore.UnreadableImageError, match="IMG_0001.HEIC.*pillow-heif"):
        store.add(photos)
    assert len(store.add(photos, skip_errors=True).added) == 4


def test_a_subfolder_that_cannot_be_listed_is_named(photos, tmp_path):
    """Its photos were left out without a word (os.walk skips what it cannot list)."""
    script = (
        "import sys\n"
        "from mrlstore.inputs.images import expand, check\n"
        "items = expand(sys.argv[1])\n"
        "good, failed = check(items, skip_errors=True)\n"
        "print(len(good), [f.reason for f in failed])\n"
    )
    (photos / "sub").chmod(0)
    try:
        drop = without_root_file_access if os.geteuid() == 0 else None
        out = subprocess.run([sys.executable, "-c", script, str(photos)], capture_output=True, text=True,
                             preexec_fn=drop)  # fmt: skip
    finally:
        (photos / "sub").chmod(0o755)
    if drop is None and os.access(photos / "sub", os.R_OK) and "0 [" in out.stdout:
        pytest.skip("this file system ignores permission bits")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 ") and f"cannot read folder {photos / 'sub'}: permission denied" in out.stdout


def test_the_result_has_one_id_per_input_also_for_an_image_given_twice(store, photos):
    """A repeat was left out of the ids, so zipping the inputs with the result paired later inputs with
    other images' ids."""
    a, b = str(photos / "p0.png"), str(photos / "p1.png")
    result = store.add([a, a, b])
    assert len(result) == 3 and result[0] == result[1] != result[2]
    assert store.get([result[2]]).column("path").to_pylist() == [b]
    assert len(result.added) == 2 and result.skipped == [result[0]]


def test_columns_of_paths_or_files_are_images(store, photos):
    """A pandas Series of paths was taken for vectors, a numpy array of paths for one image, an Arrow
    column of bytes failed ('cannot read images from a BinaryScalar')."""
    import pandas as pd
    import pyarrow as pa

    paths = [str(photos / "p0.png"), str(photos / "p1.png")]
    data = [open(p, "rb").read() for p in paths]
    pil = [Image.open(p) for p in paths]
    pixels = [np.asarray(im.convert("RGB")) for im in pil]
    columns = {  # each column and the list it holds
        "series of paths": (pd.Series(paths), paths), "array of paths": (np.array(paths), paths),
        "object array": (np.array(paths, dtype=object), paths), "arrow strings": (pa.array(paths), paths),
        "arrow string_view": (pa.array(paths, pa.string_view()), paths),
        "arrow binary": (pa.array(data, pa.binary()), data), "chunked": (pa.chunked_array([data[:1], data[1:]]), data),
        "series of bytes": (pd.Series(data), data), "series of PIL images": (pd.Series(pil, index=[5, 6]), pil),
        "series of pixels": (pd.Series(pixels), pixels),
    }  # fmt: skip
    for name, (column, items) in columns.items():
        ids = list(store.add(items))
        assert list(store.add(column)) == ids, name
        found = store.query(column, k=1)  # each finds its image (held under its file's id and its pixels' id)
        assert isinstance(found, mrlstore.HitsBatch) and len(found) == 2, name
        assert all(h.scores[0] > 0.9999 for h in found), name


def test_an_empty_path_is_refused_not_read_as_the_working_directory(store, photos, monkeypatch):
    """abspath("") is the working directory: every image below it was added (an unset variable)."""
    monkeypatch.chdir(photos)
    for call in (store.add, store.query):
        with pytest.raises(mrlstore.InvalidInputError, match="empty path"):
            call("")
    assert len(store) == 0


def test_hidden_files_and_folders_are_left_out_of_a_folder(store, photos):
    """macOS's ._ files beside each photo (not images) failed the whole add; a drive's trash was added."""
    (photos / "._p0.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)
    (photos / ".Trash-1000" / "files").mkdir(parents=True)
    Image.fromarray(_pixels(9)).save(photos / ".Trash-1000" / "files" / "deleted.png")
    added = store.add(photos)
    assert len(added) == 4 and not added.failed
    assert not any("/." in p for p in store.sql("SELECT path FROM items")["path"].to_pylist())
    assert len(store.add(photos / ".Trash-1000")) == 1  # named, a hidden folder is read


def test_a_pipe_given_as_a_path_is_read_once(store, photos):
    """It was opened to check, hash and decode it: the second open found it drained ("cannot identify")."""
    want = store.add(photos / "p1.png").ids[0]
    for call in ("query", "add"):
        read, write = os.pipe()
        os.write(write, (photos / "p1.png").read_bytes())
        os.close(write)
        try:
            got = getattr(store, call)(f"/dev/fd/{read}", **({"k": 1} if call == "query" else {}))
        finally:
            os.close(read)
        assert got.ids[0] == want
    assert len(store) == 1


def test_a_damaged_exif_block_is_ignored_and_other_modes_fail_typed_and_skippable(store, tmp_path):
    """Pillow reads the pixels but not the EXIF: the file was refused ("not a TIFF file") and a PIL image of
    it raised a bare SyntaxError; a PIL image in mode La raised a bare ValueError (also with skip_errors)."""
    plain = _pixels(5)
    Image.fromarray(plain).save(tmp_path / "bad_exif.png", exif=b"Exif\x00\x00GARBAGE-GARBAGE")
    with Image.open(tmp_path / "bad_exif.png") as im:
        im.load()
        ids = [store.add(im).ids[0], store.add(tmp_path / "bad_exif.png").ids[0], store.add(plain).ids[0]]
    vectors = store.get(ids, dims=48).column("vector").to_pylist()
    assert ids[0] == ids[2] and vectors[0] == vectors[1]  # the same pixels (the file's id hashes its bytes)
    odd = Image.fromarray(plain).convert("LA").convert("La")
    with pytest.raises(mrlstore.UnreadableImageError, match="mode La"):
        store.add(odd)
    assert len(store) == 2
    assert len(store.add([odd, _pixels(7)], skip_errors=True).failed) == 1 and len(store) == 3


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_colour_marked_transparent_is_composited_like_alpha(tmp_path, mode):
    """A PNG's tRNS chunk (RGB or L with one colour transparent) kept that colour where RGBA, LA and palette
    images were composited on white: the same sticker embedded at cosine 0.88 to its RGBA copy."""
    from mrlstore.inputs.images import ImageItem, to_rgb

    pixels = np.array(Image.fromarray(_pixels(6)).convert(mode))
    pixels[4:12, 4:12] = 0  # the transparent colour
    keyed = tmp_path / "keyed.png"
    Image.fromarray(pixels).save(keyed, transparency=0 if mode == "L" else (0, 0, 0))
    alpha = np.where(np.all(np.atleast_3d(pixels) == 0, axis=2), 0, 255).astype(np.uint8)
    with_alpha = tmp_path / "alpha.png"
    Image.fromarray(pixels).convert("RGBA" if mode == "RGB" else "LA").save(with_alpha)
    with Image.open(with_alpha) as im:
        im.putalpha(Image.fromarray(alpha))
        im.save(with_alpha)
    got, want = (to_rgb(ImageItem(str(p), str(p))) for p in (keyed, with_alpha))
    assert (got[4:12, 4:12] == 255).all()  # white, as alpha gives it
    np.testing.assert_array_equal(got, want)


def test_netpbm_files_are_images_and_a_16_bit_pgm_reads_like_the_png(store, tmp_path):
    """A folder of PGM files (older research sets come so) held "no image files", and a 16-bit PGM read
    256 times as bright as the same pixels in a PNG (PIL opens it as mode I, not I;16)."""
    from mrlstore.inputs.images import ImageItem, to_rgb

    dark = (np.arange(16 * 16).reshape(16, 16) % 200).astype(np.uint16)
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "deep.pgm").write_bytes(b"P5\n16 16\n65535\n" + dark.astype(">u2").tobytes())
    (folder / "deep.png").write_bytes(_png(dark))
    Image.fromarray(_pixels(8)).save(folder / "colour.ppm")
    assert len(store.add(folder).added) == 3
    pgm, png = (to_rgb(ImageItem(str(p), str(p))) for p in (folder / "deep.pgm", folder / "deep.png"))
    np.testing.assert_array_equal(pgm, png)


@pytest.mark.parametrize(
    "pixels, match",
    [
        (np.random.default_rng(0).normal(0.0, 1.0, (8, 8, 3)).astype(np.float32), "normalized tensor"),
        (np.full((8, 8, 3), 300.0, np.float32), r"from 300 to 300"),
        (np.full((8, 8, 3), -3, np.int16), "must not be negative"),
    ],
    ids=["normalized", "past 255", "negative ints"],
)
def test_pixels_outside_the_documented_range_are_refused_before_anything_is_written(store, pixels, match):
    """A tensor normalized for a network (mean 0, std 1) was read as pixels, clipped at 0: a dark image
    encoded and added without a word. Refused at the check, so skip_errors leaves it out."""
    with pytest.raises(mrlstore.InvalidInputError, match=match):
        store.add([_pixels(1), pixels], commit_every=1)
    assert len(store) == 0
    result = store.add([_pixels(1), pixels], skip_errors=True)
    assert len(result.added) == 1 and [f.index for f in result.failed] == [1]
    torch = pytest.importorskip("torch")
    with pytest.raises(mrlstore.InvalidInputError, match=match):
        store.query(torch.from_numpy(pixels).permute(2, 0, 1), k=1)


def test_float_pixels_a_resize_rang_past_their_range_are_kept():
    """Bicubic resizes ring a little past [0, 1] or [0, 255]: such images were clipped and encoded before
    the range check, and still are."""
    from mrlstore.inputs.images import ImageItem, to_rgb

    ramp = np.linspace(0.0, 1.0, 8 * 8 * 3).reshape(8, 8, 3)
    for image, scale in ((ramp * 1.04 - 0.02, 255.0), ((ramp * 1.04 - 0.02) * 255.0, 1.0)):
        expected = np.clip(image * scale, 0, 255).round().astype(np.uint8)
        np.testing.assert_array_equal(to_rgb(ImageItem(image.astype(np.float32), None)), expected)


def test_bytes_that_are_not_an_image_say_so_and_point_at_paths(store, tmp_path):
    """Bytes are a file's contents; a path given as bytes said 'cannot identify image file
    <_io.BytesIO object at 0x...>'. Pillow's pixel limit says how to raise it."""
    with pytest.raises(mrlstore.UnreadableImageError, match="pass a path as str or Path") as error:
        store.add(str(tmp_path / "cat.jpg").encode())
    assert "BytesIO" not in str(error.value)
    with pytest.raises(mrlstore.UnreadableImageError, match="not an encoded image") as error:
        store.add(b"\x89PNG\r\n\x1a\n broken")
    assert "pass a path" not in str(error.value)
    big = io.BytesIO()
    Image.new("RGB", (64, 64)).save(big, "PNG")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        with pytest.raises(mrlstore.UnreadableImageError, match="MAX_IMAGE_PIXELS = None"):
            store.add(big.getvalue())
    assert len(store) == 0


def test_a_stream_that_cannot_be_read_fails_its_check_and_can_be_skipped(store, photos, tmp_path):
    """A socket given as a path failed the whole call, also with skip_errors."""
    import socket

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(mrlstore.UnreadableImageError, match="s.sock"):
            store.add([photos / "p1.png", path], commit_every=1)
        assert len(store) == 0
        result = store.add([photos / "p1.png", path], skip_errors=True)
    assert len(result.added) == 1 and [(f.index, f.source) for f in result.failed] == [(1, str(path))]


def test_one_metadata_dict_labels_every_image_of_a_folder(store, photos):
    """A dict was read as a list of its keys: 'got 1 metadata entries for 4 vectors' for a folder, and
    'metadata[0] must be a dict' for one image. A dict of n-long lists (columns?) is refused, not guessed."""
    result = store.add(photos, metadata={"label": "holiday", "tags": ["a", "b"]})
    rows = store.get(list(result)).to_pylist()
    assert [(r["label"], r["tags"]) for r in rows] == [("holiday", ["a", "b"])] * 4
    store.add(_pixels(8), metadata={"label": "one"})
    assert store.sql("SELECT count(*) AS n FROM items WHERE label = 'one'").column("n").to_pylist() == [1]
    with pytest.raises(mrlstore.MetadataError, match="ambiguous"):
        store.add([_pixels(9), _pixels(10)], metadata={"label": ["x", "y"]})
    with pytest.raises(mrlstore.MetadataError, match="for 2 images"):
        store.add([_pixels(9), _pixels(10)], metadata=[{"label": "x"}])
    from types import MappingProxyType

    assert len(store.add([_pixels(11), _pixels(12)], metadata=MappingProxyType({"label": "m"})).added) == 2
    with pytest.raises(mrlstore.MetadataError):  # typed, where len() of a 0-d array raised TypeError
        store.add([_pixels(13), _pixels(14)], metadata={"n": np.array(5)})
    assert len(store) == 7
