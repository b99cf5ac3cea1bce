"""Image inputs: finding the files, checking them, stable ids, and decoding to RGB arrays.

Imports neither torch nor the encoder: the store checks every input here before anything is encoded, then
hands the encoder decoded images (uint8 HxWx3 arrays) a batch at a time. What counts as an image rather
than vectors is decided once, in :mod:`mrlstore.inputs.classify`.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore.errors import EncoderUnavailableError, InvalidInputError, UnreadableImageError
from mrlstore.inputs.vectors import first_positions, id_list, is_utf8, metadata_table
from mrlstore.results import Failure

# Phone photos come as HEIC and AVIF too: a folder's are added, or named where Pillow cannot read them (they
# were left out without a word).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
    | {".pgm", ".ppm", ".pbm", ".pnm"}  # Netpbm: older research sets (the AT&T faces) come as PGM
)
_PLUGINS = {
    ".heic": "HEIC photos need a Pillow plugin: pip install pillow-heif, then pillow_heif.register_heif_opener()",
    ".avif": "AVIF needs Pillow 11.3 or later, or the pillow-avif-plugin package",
}
_EXIF_ORIENTATION = 0x0112
FLOAT_OVERSHOOT = 0.05  # how far past its range a resized float image may ring (bicubic), as a share of it
MAX_STREAM_BYTES = 256 << 20  # the most a pipe given as an image path may give
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "ftp://", "memory://")


@dataclass
class ImageItem:
    """One image input: ``value`` (a path string, bytes, or an in-memory image) and its file path if any."""

    value: Any
    path: str | None
    index: int = 0  # position among the call's images (after folders are expanded)
    error: str | None = None  # why it cannot be read, found before the check (which raises it, skippable)

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return self.value if isinstance(self.value, str) else type(self.value).__name__


def is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "dtype") and hasattr(x, "ndim")


def is_pil(x: Any) -> bool:
    return hasattr(x, "convert") and hasattr(x, "mode") and hasattr(x, "size")


def is_url(x: Any) -> bool:
    return isinstance(x, str) and x.lower().startswith(URL_SCHEMES)


def expand(images: Any) -> list[ImageItem]:
    """A flat list of single images: folders become their image files (recursive, sorted), a 4-D array or
    tensor its images. Raises InvalidInputError for inputs that are not images (URLs included)."""
    if isinstance(images, (str, os.PathLike)):
        return _expand_path(images)
    if hasattr(images, "read"):  # read once: checked, hashed and decoded like bytes (a pipe cannot seek)
        data = images.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidInputError(f"a file object of images must be opened in binary mode, got {type(data).__name__}")
        return [ImageItem(bytes(data), None)]
    if isinstance(images, (bytes, bytearray, memoryview)) or is_pil(images):
        return [ImageItem(images, None)]
    if is_column(images):  # paths or encoded files in a numpy, pandas or Arrow column
        return expand(images.tolist() if hasattr(images, "tolist") else images.to_pylist())
    if isinstance(images, np.ndarray) or is_tensor(images):
        if images.ndim == 4:
            return [ImageItem(im, None) for im in images]
        return [ImageItem(images, None)]
    if isinstance(images, Iterable) and not isinstance(images, dict):
        out: list[ImageItem] = []
        for item in images:
            if isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4):
                raise InvalidInputError("images must be a flat collection of images, got a nested collection")
            out.extend(expand(item))
        return out
    raise InvalidInputError(
        f"cannot read images from a {type(images).__name__}: expected paths or folders, bytes, binary file "
        "objects, PIL images, arrays or tensors"
    )


def is_column(x: Any) -> bool:
    """A column of paths or encoded files: text or bytes in a 1-D numpy array, a pandas Series, an Arrow
    array (they were read as one image, or as vectors)."""
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and x.dtype.kind in "USO"
    if isinstance(x, (pa.Array, pa.ChunkedArray)):
        kinds = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view")
        return any(getattr(pa.types, kind, lambda _: False)(x.type) for kind in kinds)
    return type(x).__name__ == "Series" and hasattr(x, "tolist")


def _expand_path(p: str | os.PathLike) -> list[ImageItem]:
    if is_url(p):
        raise InvalidInputError(
            f"{p} is a URL: mrlstore does not fetch images over the network; download the file and pass its path"
        )
    if os.fspath(p) in ("", b""):  # abspath would make it the working directory: every image below it
        raise InvalidInputError("an empty path names no image (an unset variable?): pass a file or a folder")
    path = Path(os.path.abspath(p))  # stored as metadata: it must resolve from any working directory
    if path.exists() and not path.is_dir() and not path.is_file():
        try:
            return [ImageItem(_read_stream(path), None)]
        except UnreadableImageError as e:
            return [ImageItem(str(path), None, error=str(e))]
    if path.is_dir():
        unreadable: list[Path] = []  # listed as inputs: each fails its check, naming the folder
        files = sorted(f for f in _files_below(path, unreadable) if f.suffix.lower() in IMAGE_SUFFIXES)
        files = sorted(files + unreadable)
        if not files:
            raise InvalidInputError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [ImageItem(str(f), str(f)) for f in files]
    return [ImageItem(str(path), str(path))]


def _read_stream(path: Path) -> bytes:
    """The bytes of a pipe or device given as a path (``<(cat a.jpg)``), read once: it cannot be read again
    to check, hash and decode it like a file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STREAM_BYTES + 1)
    except OSError as e:
        raise UnreadableImageError(f"cannot read image {path}: {e.strerror or e}") from None
    if len(data) > MAX_STREAM_BYTES:
        raise UnreadableImageError(f"{path} is not a file and gives more than {MAX_STREAM_BYTES} bytes")
    return data


def _files_below(folder: Path, unreadable: list[Path]) -> Iterator[Path]:
    """Every file under ``folder``, through symlinked subfolders too (people link photo folders in), each
    real folder once, so a link back up cannot loop; the real folders first, so that a file inside ``folder``
    is named by its own path, not a link's. Folders that cannot be listed go to ``unreadable`` (their photos
    were left out without a word). Hidden files and folders are left out: a drive's ``.Trash-1000/`` holds
    deleted photos, and macOS writes a ``._IMG_0001.jpg`` beside each photo on shared drives (not an image)."""
    seen: set[str] = set()
    starts: list[tuple[str | Path, bool]] = [(folder, False)]
    skipped = lambda e: unreadable.append(Path(e.filename))  # noqa: E731
    for start, follow in starts:  # the list grows while it is read: linked folders after the real ones
        for root, dirs, names in os.walk(start, followlinks=follow, onerror=skipped):
            real = os.path.realpath(root)
            if real in seen:
                dirs.clear()
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            starts += [(os.path.join(root, d), True) for d in dirs if os.path.islink(os.path.join(root, d))]
            shown = (n for n in names if not n.startswith("."))
            yield from (Path(root, n) for n in shown if os.path.isfile(os.path.join(root, n)))


def check(items: list[ImageItem], skip_errors: bool) -> tuple[list[ImageItem], list[Failure]]:
    """Every file exists and its header reads as an image (cheap: pixels are decoded later). A bad one
    raises InvalidInputError naming it, or with ``skip_errors`` is left out and reported."""
    good: list[ImageItem] = []
    failures: list[Failure] = []
    for item in items:
        try:
            if item.error is not None:
                raise UnreadableImageError(item.error)
            if item.path is not None and not is_utf8(item.path):
                raise UnreadableImageError(f"cannot keep the file name {item.path!r}: it is not valid UTF-8")
            if item.path is not None or isinstance(item.value, (bytes, bytearray, memoryview)):
                with _opened(item) as im:
                    im.verify()
            else:
                _check_in_memory(item.value)
            good.append(item)
        except InvalidInputError as e:
            if not skip_errors:
                raise
            failures.append(Failure(item.index, item.describe(), str(e)))
    return good, failures


def _check_in_memory(x: Any) -> None:
    """An in-memory image (PIL image, array, tensor) has pixels, in a shape ``to_rgb`` reads."""
    if is_pil(x):
        _pil_pixels(x)
        width, height = x.size
        _pil_rgb(x.crop((0, 0, min(width, 1), min(height, 1))))  # a mode PIL cannot convert fails here, skippable
    else:
        arr = _hwc_array(x) if is_tensor(x) else x
        _check_shape(arr.shape, tuple(x.shape))
        _pixel_values(arr)
        height, width = arr.shape[:2]
    if width == 0 or height == 0:
        raise UnreadableImageError(f"an image of {width}x{height} pixels has none to encode")


@contextmanager
def _opened(item: ImageItem) -> Iterator[Any]:
    """The PIL image of a file, bytes or file object; what PIL raises becomes InvalidInputError naming it."""
    x = item.value
    source = item.path if item.path is not None else x if hasattr(x, "read") else io.BytesIO(bytes(x))
    try:
        with pil().open(source) as im:
            yield im
    except FileNotFoundError:
        raise UnreadableImageError(f"image file not found: {item.path}") from None
    except PermissionError:
        what = "folder" if item.path is not None and os.path.isdir(item.path) else "image"
        raise UnreadableImageError(f"cannot read {what} {item.describe()}: permission denied") from None
    except Exception as e:  # PIL raises many kinds for broken data
        raise UnreadableImageError(f"cannot read image {item.describe()}: {_why_unreadable(item, e)}") from None


def _why_unreadable(item: ImageItem, error: Exception) -> str:
    """PIL's reason, with what to do where there is something: a plugin, a larger pixel limit, a path."""
    why = str(error)
    if type(error).__name__ == "DecompressionBombError":
        return f"{why} (to read larger images: PIL.Image.MAX_IMAGE_PIXELS = None, or a larger limit)"
    if "cannot identify" not in why:
        return why
    if item.path is not None:
        suffix = Path(item.path).suffix.lower().replace(".heif", ".heic")
        return f"{why} ({_PLUGINS[suffix]})" if suffix in _PLUGINS else why
    if hasattr(item.value, "read"):
        return "not an image format Pillow reads"
    hint = ": pass a path as str or Path" if _looks_like_a_path(bytes(item.value)) else ""
    return f"{len(item.value)} bytes are not an encoded image Pillow reads (bytes are a file's contents{hint})"


def _looks_like_a_path(data: bytes) -> bool:
    """Short printable text (an encoded image's first bytes never are)."""
    try:
        return 0 < len(data) <= 4096 and data.decode().isprintable()
    except UnicodeDecodeError:
        return False


def content_id(item: ImageItem) -> str:
    """A stable id from the image's content: the file's bytes, or the pixels of an in-memory image."""
    h = hashlib.blake2b(digest_size=16)
    if item.path is not None:
        with open(item.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif isinstance(item.value, (bytes, bytearray, memoryview)):
        h.update(bytes(item.value))
    else:
        arr = to_rgb(item)
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def to_rgb(item: ImageItem) -> np.ndarray:
    """One image as a uint8 HxWx3 array (alpha composited on white, grayscale repeated)."""
    x = item.value
    if item.path is not None or isinstance(x, (bytes, bytearray, memoryview)) or hasattr(x, "read"):
        return _decode(item)
    if is_pil(x):
        return _pil_rgb(_pil_pixels(x))
    if is_tensor(x):
        x = _hwc_array(x)
    if isinstance(x, np.ndarray):
        return _array_rgb(x)
    raise InvalidInputError(f"cannot read an image from a {type(x).__name__}")


def _pil_pixels(im: Any) -> Any:
    """A PIL image with its pixels loaded: one opened lazily from a broken or closed file fails here, typed
    (it raised OSError or AssertionError out of add and query, also with skip_errors)."""
    try:
        im.load()
    except Exception as e:  # PIL raises many kinds for broken data
        why = str(e) or f"{type(e).__name__} (was its file closed?)"
        raise UnreadableImageError(f"cannot read the pixels of a PIL image: {why}") from None
    return im


def _pil_rgb(im: Any) -> np.ndarray:
    """A loaded PIL image's pixels upright as RGB; a mode PIL cannot convert (La) is UnreadableImageError."""
    try:
        return np.asarray(_rgb(_upright(im)))
    except Exception as e:  # PIL raises ValueError, and other kinds
        raise UnreadableImageError(f"cannot read a PIL image of mode {im.mode} as RGB: {e}") from None


def _decode(item: ImageItem) -> np.ndarray:
    with _opened(item) as im:
        im.load()
        return np.asarray(_rgb(_upright(im)))


def _hwc_array(tensor: Any) -> np.ndarray:
    """A tensor's pixels as a numpy array, channels last (tensors come channels first)."""
    t = tensor.detach().cpu()
    if _channels_first(tuple(t.shape)):
        t = t.permute(1, 2, 0)
    return (t.float() if t.is_floating_point() else t).numpy()  # bfloat16 has no numpy type


def _channels_first(shape: tuple[int, ...]) -> bool:
    """A tensor shape read as CxHxW (tensors come channels first; arrays never are)."""
    return len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)


def _check_shape(shape: tuple[int, ...], given: tuple[int, ...]) -> None:
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise UnreadableImageError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {given}")


def _array_rgb(arr: np.ndarray) -> np.ndarray:
    _check_shape(arr.shape, arr.shape)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        arr = np.clip(_pixel_values(arr), 0, 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        return np.asarray(_rgb(pil().fromarray(np.ascontiguousarray(arr), "RGBA")))
    return arr


def _pixel_values(arr: np.ndarray) -> np.ndarray:
    """Numeric pixels on a 0..255 scale; InvalidInputError for other dtypes and float ranges."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"an image array must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        return _float_pixels(arr)
    if arr.dtype.kind == "i" and int(arr.min(initial=0)) < 0:
        raise InvalidInputError(f"integer image pixels must not be negative, got {int(arr.min())}")
    return _to_8_bits(arr)


def _float_pixels(arr: np.ndarray) -> np.ndarray:
    """Float pixels as 0..255 (clipped later): [0, 1] scaled, [0, 255] as they are, each with the overshoot a
    resize leaves (FLOAT_OVERSHOOT of the range). Anything else is refused: a tensor normalized for a network
    (values to about -2) read as pixels was a dark image, encoded without a word."""
    if not np.isfinite(arr).all():
        raise InvalidInputError("an image array contains NaN or inf")
    low, top = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    over = FLOAT_OVERSHOOT
    if low >= -over and top <= 1.0 + over:
        return arr * 255.0
    # [0, 255] with a resize's overshoot; negatives with no value above 3 are a normalized tensor's signature
    if not (-over * 255.0 <= low and top <= 255.0 * (1.0 + over) and (low >= 0.0 or top > 3.0)):
        hint = " (a normalized tensor? pass the pixels from before the normalization)" if low < 0.0 else ""
        raise InvalidInputError(
            f"float image pixels must lie in [0, 1] or [0, 255], got values from {low:.3g} to {top:.3g}{hint}"
        )
    return arr


def _to_8_bits(arr: np.ndarray) -> np.ndarray:
    """Integer pixels as 0..255: values up to 255 as they are, up to 65535 as 16-bit (divided by 257),
    larger ones by their type's range."""
    top = int(arr.max(initial=0))
    if top <= 255:
        return arr
    return arr / (257.0 if top <= 65535 else np.iinfo(arr.dtype).max / 255.0)


def _upright(im: Any) -> Any:
    """The image as viewers show it: cameras and phones store pixels sideways and an EXIF orientation tag
    (an EXIF block PIL cannot parse: as stored, where it refused an image whose pixels read well)."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
            return im
    except Exception:  # PIL raises many kinds for a broken EXIF block (SyntaxError: "not a TIFF file")
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def _rgb(im: Any) -> Any:
    """RGB pixels; transparent ones (alpha, or a colour a PNG marks transparent) composited on white."""
    keyed = "transparency" in im.info and im.mode in ("RGB", "L")  # convert("RGB") would keep the key colour
    if im.mode == "RGB" and not keyed:
        return im
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PPM"):  # 16 bits by its mode or
        # its format (PIL opens a 16-bit PGM as "I", scaled to 65535): a dark one was read as 8-bit, bright
        return pil().fromarray(_array_rgb((np.asarray(im) / 257.0).round().astype(np.uint8)))
    if im.mode.startswith(("I", "F")):  # 16- and 32-bit pixels: scaled to 8 bits (convert() would clip them)
        return pil().fromarray(_array_rgb(np.asarray(im)))
    if im.mode in ("RGBA", "LA", "P", "PA") or keyed:
        im = im.convert("RGBA")
        bg = pil().new("RGBA", im.size, (255, 255, 255, 255))
        return pil().alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise EncoderUnavailableError(
            "images need the image extra: pip install 'mrlstore[images]' (Pillow and torch)"
        ) from e
    return Image


@dataclass
class ImageBatch:
    """Checked images with their ids and metadata rows (with ``path`` for files), ready to encode."""

    items: list[ImageItem]
    ids: list[str]
    metadata: pa.Table | None
    failed: list[Failure]
    repeats: list[str]  # content ids given twice in one call (the repeat is left out)
    given: list[str] = field(default_factory=list)  # every checked input's id in input order, repeats too

    @classmethod
    def prepare(cls, images: Any, ids: Any, metadata: Any, skip_errors: bool) -> ImageBatch:
        """Expand and check ``images`` (nothing is decoded beyond the files' headers); ``ids`` and
        ``metadata`` are aligned with the expanded images."""
        items = expand(images)
        if not items:
            raise InvalidInputError("no images given")
        for i, item in enumerate(items):
            item.index = i
        id_values = None if ids is None else id_list(ids, len(items))
        meta = metadata_table(metadata, len(items), "images")
        good, failures = check(items, skip_errors)
        if failures:
            keep = [item.index for item in good]
            id_values = None if id_values is None else [id_values[i] for i in keep]
            meta = None if meta is None else meta.take(np.asarray(keep, dtype=np.int64))
        paths = [item.path for item in good]
        if any(p is not None for p in paths):
            column = pa.array(paths, pa.string())
            meta = pa.table({"path": column}) if meta is None else meta.drop_columns(
                [c for c in meta.column_names if c == "path"]).append_column("path", column)  # fmt: skip
        batch = cls(good, id_values or [content_id(item) for item in good], meta, failures, [])
        return batch if ids is not None else batch._first_of_each()

    def _first_of_each(self) -> ImageBatch:
        keep = first_positions(self.ids)
        if len(keep) == len(self.ids):
            return self
        first = set(keep)
        repeats = [i for pos, i in enumerate(self.ids) if pos not in first]
        return ImageBatch(*self._subset(keep), self.failed, repeats, self.ids)

    def without(self, ids: set[str]) -> ImageBatch:
        """The images whose ids are not in ``ids``."""
        return self.only([pos for pos, i in enumerate(self.ids) if i not in ids])

    def only(self, keep: list[int]) -> ImageBatch:
        """The images at positions ``keep``."""
        return self if len(keep) == len(self.ids) else ImageBatch(*self._subset(keep), self.failed, self.repeats)

    def _subset(self, keep: list[int]) -> tuple[list[ImageItem], list[str], pa.Table | None]:
        meta = None if self.metadata is None else self.metadata.take(np.asarray(keep, dtype=np.int64))
        return [self.items[p] for p in keep], [self.ids[p] for p in keep], meta
