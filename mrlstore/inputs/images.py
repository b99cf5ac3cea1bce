"""Image inputs: telling them from vectors, finding the files, stable ids, and decoding to RGB arrays.

Imports neither torch nor the encoder: the store checks every input here before anything is encoded, then
hands the encoder decoded images (uint8 HxWx3 arrays) a batch at a time.

The rule (``add``/``query``): a 1-D numeric array or list is one vector; a 2-D numeric array (not uint8)
whose width is the store's ``dim``, or a list of such rows, is a batch of vectors; everything else is an
image or a collection of images: paths and folders (recursive, image files only, sorted), ``bytes`` and
binary file objects holding an encoded image, PIL images, uint8 arrays of any shape (HxW, HxWx3, HxWx4,
NxHxWx3), other arrays of 3 or 4 dimensions or 2-D with another width (HxW grayscale), tensors likewise.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore.errors import DuplicateIdError, EncoderUnavailableError, InvalidInputError, UnreadableImageError
from mrlstore.inputs.arrow import is_vector_column
from mrlstore.inputs.vectors import first_positions, id_list, metadata_table, positive_int
from mrlstore.tiers.params import BUNDLED_ENCODER

COMMIT_EVERY = 1024  # images per commit of an add: 8 MiB of 2048-d float32 vectors, ~10 s of encoding on 2 cores
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "ftp://", "memory://")


@dataclass
class Failure:
    """An input that could not be read: its position among the inputs, where it came from, why."""

    index: int
    source: str
    reason: str


@dataclass
class ImageItem:
    """One image input: ``value`` (a path string, bytes, or an in-memory image) and its file path if any."""

    value: Any
    path: str | None
    index: int = 0  # position among the call's images (after folders are expanded)

    def describe(self) -> str:
        return self.path if self.path is not None else type(self.value).__name__


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "dtype") and hasattr(x, "ndim")


def _is_pil(x: Any) -> bool:
    return hasattr(x, "convert") and hasattr(x, "mode") and hasattr(x, "size")


def looks_like_vectors(x: Any, dim: int | None = None) -> bool:
    """True when ``x`` is vectors by the module's rule; False for images and other encoder inputs. With
    ``dim=None`` every numeric array that is not uint8 counts as vectors (a store without an encoder: a
    wrong shape then gets the vectors' ShapeError)."""
    if type(x) is np.ndarray and x.ndim == 1 and x.dtype.kind == "f":  # the common query: decided at once
        return True
    if isinstance(x, (str, bytes, bytearray, os.PathLike)) or _is_pil(x) or hasattr(x, "read"):
        return False
    if is_vector_column(x):  # Arrow list columns and pandas Series hold vectors, never images
        return True
    if _is_tensor(x):
        if str(x.dtype) == "torch.uint8":
            return False
        return dim is None or x.ndim == 1 or (x.ndim == 2 and x.shape[-1] == dim)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fciub" or x.dtype == np.uint8:
            return x.dtype.kind not in "fciub" and dim is None  # object arrays: the vectors' error
        return dim is None or x.ndim == 1 or (x.ndim == 2 and x.shape[-1] == dim)
    if isinstance(x, (list, tuple)) and x:
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x):
            return True
        return all(isinstance(v, (list, tuple, np.ndarray)) and _is_vector_row(v) for v in x)
    return False


def _is_vector_row(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.dtype.kind in "fciu" and v.dtype != np.uint8
    return bool(v) and all(isinstance(a, (int, float, np.number)) and not isinstance(a, bool) for a in v)


def is_url(x: Any) -> bool:
    return isinstance(x, str) and x.lower().startswith(URL_SCHEMES)


def expand(images: Any) -> list[ImageItem]:
    """A flat list of single images: folders become their image files (recursive, sorted), a 4-D array or
    tensor its images. Raises InvalidInputError for inputs that are not images (URLs included)."""
    if isinstance(images, (str, os.PathLike)):
        return _expand_path(images)
    if isinstance(images, (bytes, bytearray, memoryview)) or hasattr(images, "read") or _is_pil(images):
        return [ImageItem(images, None)]
    if isinstance(images, np.ndarray) or _is_tensor(images):
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


def _expand_path(p: str | os.PathLike) -> list[ImageItem]:
    if is_url(p):
        raise InvalidInputError(
            f"{p} is a URL: mrlstore does not fetch images over the network; download the file and pass its path"
        )
    path = Path(os.path.abspath(p))  # stored as metadata: it must resolve from any working directory
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidInputError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [ImageItem(str(f), str(f)) for f in files]
    return [ImageItem(str(path), str(path))]


def check(items: list[ImageItem], skip_errors: bool) -> tuple[list[ImageItem], list[Failure]]:
    """Every file exists and its header reads as an image (cheap: pixels are decoded later). A bad one
    raises InvalidInputError naming it, or with ``skip_errors`` is left out and reported."""
    good: list[ImageItem] = []
    failures: list[Failure] = []
    for item in items:
        try:
            if item.path is not None or isinstance(item.value, (bytes, bytearray, memoryview)):
                with _opened(item) as im:
                    im.verify()
            good.append(item)
        except InvalidInputError as e:
            if not skip_errors:
                raise
            failures.append(Failure(item.index, item.describe(), str(e)))
    return good, failures


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
    except Exception as e:  # PIL raises many kinds for broken data
        raise UnreadableImageError(f"cannot read image {item.describe()}: {e}") from None


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
    if _is_pil(x):
        return np.asarray(_rgb(x))
    if _is_tensor(x):
        t = x.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)  # CHW -> HWC
        x = t.numpy()
    if isinstance(x, np.ndarray):
        return _array_rgb(x)
    raise InvalidInputError(f"cannot read an image from a {type(x).__name__}")


def _decode(item: ImageItem) -> np.ndarray:
    with _opened(item) as im:
        im.load()
        return np.asarray(_rgb(im))


def _array_rgb(arr: np.ndarray) -> np.ndarray:
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "fiu":
            raise InvalidInputError(f"an image array must be numeric, got dtype {arr.dtype}")
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InvalidInputError("an image array contains NaN or inf")
            if arr.max(initial=0.0) <= 1.0:  # floats in [0, 1]
                arr = arr * 255.0
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        return np.asarray(_rgb(pil().fromarray(np.ascontiguousarray(arr), "RGBA")))
    return arr


def _rgb(im: Any) -> Any:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = pil().new("RGBA", im.size, (255, 255, 255, 255))
        return pil().alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "encoder" / "weights"


def bundled_weights_id() -> str | None:
    """The sha256 of the installed bundled encoder's weights, read without torch (None when not installed)."""
    try:
        return (BUNDLED_WEIGHTS_DIR / "mrl_lite0.sha256").read_text().split()[0]
    except (OSError, IndexError):
        return None


def check_bundled_weights(recorded: str | None, where: object) -> None:
    """A store's vectors and its image queries must come from the same bundled weights: a store made by an
    earlier release (another encoder) would otherwise answer image queries with unrelated rows."""
    installed = bundled_weights_id()
    if recorded == installed:
        return
    made_by = f"weights with sha256 {recorded[:12]}..." if recorded else "an mrlstore before the v3 encoder"
    raise EncoderUnavailableError(
        f"{where} holds vectors of the bundled encoder of {made_by}, but the installed bundled encoder differs "
        f"(sha256 {str(installed)[:12]}...), so its image vectors would not match them. Pass that encoder: "
        "mrlstore.open(path, encoder=mrlstore.load_encoder(<its weights file>)); or query with vectors; or "
        "re-add the images to a new store"
    )


def load_bundled_encoder(path: Any = None, device: str | None = None) -> Any:
    """The bundled MRL image encoder (or one saved at ``path``); imports torch, so only when images come."""
    try:
        from mrlstore.encoder.model import load_encoder
    except ImportError as e:
        raise EncoderUnavailableError(
            f"images need the image extra ({e.name} is not installed): pip install 'mrlstore[images]' "
            "(install torch==2.13.0 first for the CPU build)"
        ) from e
    return load_encoder(path, device=device)


def pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise EncoderUnavailableError(
            "images need the image extra: pip install 'mrlstore[images]' (Pillow and torch)"
        ) from e
    return Image


@dataclass(repr=False)
class AddResult(Sequence[str]):
    """What an ``add`` did. As a sequence it is ``ids``: the ids of the images it covered (added, replaced,
    or already present and skipped), in input order. ``added``: the ids this call wrote (added or
    replaced); ``skipped``: ids already in the store (``on_conflict="skip"``) or repeated within the call;
    ``failed``: the inputs left out with ``skip_errors=True``, and why."""

    ids: list[str]
    added: list[str]
    skipped: list[str]
    failed: list[Failure]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: Any) -> Any:
        return self.ids[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AddResult):
            return (self.ids, self.added, self.skipped, self.failed) == (
                other.ids, other.added, other.skipped, other.failed)  # fmt: skip
        return isinstance(other, list) and self.ids == other

    def __repr__(self) -> str:
        return (
            f"AddResult({len(self.ids)} images: {len(self.added)} added, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed)"
        )


@dataclass
class ImageBatch:
    """Checked images with their ids and metadata rows (with ``path`` for files), ready to encode."""

    items: list[ImageItem]
    ids: list[str]
    metadata: pa.Table | None
    failed: list[Failure]
    repeats: list[str]  # content ids given twice in one call (the repeat is left out)

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
        meta = metadata_table(metadata, len(items))
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
        return ImageBatch(*self._subset(keep), self.failed, repeats)

    def without(self, ids: set[str]) -> ImageBatch:
        """The images whose ids are not in ``ids``."""
        return self.only([pos for pos, i in enumerate(self.ids) if i not in ids])

    def only(self, keep: list[int]) -> ImageBatch:
        """The images at positions ``keep``."""
        return self if len(keep) == len(self.ids) else ImageBatch(*self._subset(keep), self.failed, self.repeats)

    def _subset(self, keep: list[int]) -> tuple[list[ImageItem], list[str], pa.Table | None]:
        meta = None if self.metadata is None else self.metadata.take(np.asarray(keep, dtype=np.int64))
        return [self.items[p] for p in keep], [self.ids[p] for p in keep], meta


def is_single(query: Any) -> bool:
    """Whether a query input is one image (a result) rather than a collection (a list of results)."""
    if isinstance(query, (list, tuple)):
        return False
    if isinstance(query, (str, os.PathLike)) and not is_url(query):
        return not Path(query).is_dir()
    return not ((isinstance(query, np.ndarray) or _is_tensor(query)) and query.ndim == 4)


def encode(
    encoder: Any,
    items: list[ImageItem],
    batch_size: int,
    progress: bool | None,
    failures: list[Failure] | None = None,
    advance: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The encoder's vectors for ``items``, decoding a batch of images at a time (bounded memory), and the
    positions in ``items`` they belong to. An image that cannot be decoded raises UnreadableImageError, or
    with ``failures`` given is left out and reported there. ``advance(n)`` (instead of a progress bar of
    its own) is told of every batch done."""
    from tqdm import tqdm

    show = advance is None and (progress if progress is not None else len(items) > 4 * batch_size)
    out, kept = [], []
    with tqdm(total=len(items), desc="encode", unit="img", disable=not show) as bar:
        for lo in range(0, len(items), batch_size):
            batch = []
            for pos, item in enumerate(items[lo : lo + batch_size], start=lo):
                try:
                    batch.append(to_rgb(item))
                except InvalidInputError as e:
                    if failures is None:
                        raise
                    failures.append(Failure(item.index, item.describe(), str(e)))
                    continue
                kept.append(pos)
            if batch:
                vectors = np.asarray(encoder.encode(batch, batch_size=batch_size), dtype=np.float32)
                if vectors.shape[0] != len(batch):
                    raise EncoderUnavailableError(f"the encoder gave {len(vectors)} vectors for {len(batch)} images")
                out.append(vectors)
            (advance or bar.update)(min(batch_size, len(items) - lo))
    dim = int(getattr(encoder, "dim", 0))
    return (np.concatenate(out) if out else np.empty((0, dim), np.float32)), kept


@contextmanager
def _hint_skip_errors(committed: int) -> Iterator[None]:
    """An unreadable image's error, with what the caller can do about it."""
    try:
        yield
    except UnreadableImageError as e:
        kept = f"; the {committed} images committed before it stay (run the same add again to resume)"
        raise UnreadableImageError(
            f"{e}. Pass skip_errors=True (mrlstore add --skip-errors) to leave out unreadable images and list "
            f"them{kept if committed else ''}"
        ) from None


class ImageInputs:
    """The image half of :class:`mrlstore.Store` (its ``add``/``upsert``), kept beside the image rules.
    Relies on the store's ``encoder``, ``manifest``, ``dim``, ``_catalog`` and ``_write``."""

    encoder: Any
    manifest: dict
    dim: int

    def add(
        self,
        images: Any,
        ids: Sequence[str] | None = None,
        metadata: Any = None,
        *,
        batch_size: int = 64,
        commit_every: int = COMMIT_EVERY,
        atomic: bool = False,
        skip_errors: bool = False,
        on_conflict: str = "skip",
        progress: bool | None = None,
    ) -> AddResult:
        """Encode images with the store's encoder and add them; returns their ids in input order (an
        :class:`AddResult`).

        ``images``: a path, a folder (its image files, recursively, sorted), ``bytes`` or a binary file
        object holding an encoded image, a PIL image, an array or tensor (HxW, HxWx3, HxWx4; NxHxWx3 for
        several), or a list of any of these (see :mod:`mrlstore.inputs.images` for the rule that tells images from
        vectors). Files keep their absolute path as ``path`` metadata. Ids default to a hash of each image's
        content, so adding the same images again changes nothing; ``on_conflict`` decides for ids already
        in the store: ``"skip"`` (nothing is encoded for them; listed in the result's ``skipped``),
        ``"replace"`` or ``"error"`` (DuplicateIdError, nothing written). Every file's header is checked
        before anything is encoded: a bad file raises UnreadableImageError naming it and nothing is written;
        with ``skip_errors=True`` it is left out and listed, with the reason, in the result's ``failed``.

        Images are committed ``commit_every`` at a time (``batch_size`` is the encoder's batch), so memory
        stays bounded and an interrupt (Ctrl-C, a crash, a kill) keeps every committed batch: running the
        same add again encodes only what is missing. The progress bar counts committed images.
        ``atomic=True`` encodes everything first and commits once: all or nothing.
        """
        self._check_open()
        self._check_writable()
        if on_conflict not in ("skip", "replace", "error"):
            raise InvalidInputError(f"on_conflict must be 'skip', 'replace' or 'error', got {on_conflict!r}")
        size = positive_int(batch_size, "batch_size")
        group = positive_int(commit_every, "commit_every")
        encoder = self._image_encoder()
        with _hint_skip_errors(0):
            batch = ImageBatch.prepare(images, ids, metadata, skip_errors)
        existing = self._catalog.rows_of(batch.ids)
        if existing and on_conflict == "error":
            raise DuplicateIdError(
                f"{len(existing)} image id(s) already in the store, e.g. {sorted(existing)[:5]}; "
                "pass on_conflict='skip' or 'replace'"
            )
        todo = batch.without(set(existing) if on_conflict == "skip" else set())
        late: list[Failure] = []  # files whose header read but whose pixels did not (skip_errors only)
        written: list[str] = []
        step = len(todo.ids) if atomic else group
        show = progress if progress is not None else len(todo.ids) > 4 * size
        from tqdm import tqdm

        with tqdm(total=len(todo.ids), desc="add", unit="img", disable=not show) as bar:
            for lo in range(0, len(todo.ids), max(step, 1)):
                part = todo.only(list(range(lo, min(lo + step, len(todo.ids)))))
                failures = late if skip_errors else None
                with _hint_skip_errors(len(written)):
                    written += self._encode_and_commit(encoder, part, size, failures, on_conflict == "replace",
                                                       bar.update if atomic else None)  # fmt: skip
                if not atomic:
                    bar.update(len(part.ids))
        lost = {f.index for f in late}
        skipped = [i for i in batch.ids if i in existing] if on_conflict == "skip" else []
        kept_ids = [i for i, item in zip(batch.ids, batch.items) if item.index not in lost]
        return AddResult(kept_ids, written, skipped + batch.repeats, sorted(batch.failed + late, key=lambda f: f.index))

    def _encode_and_commit(
        self,
        encoder: Any,
        part: ImageBatch,
        batch_size: int,
        failures: list[Failure] | None,
        replace: bool,
        advance: Callable[[int], object] | None,
    ) -> list[str]:
        """Encode ``part`` and commit what decoded as one write; returns the ids written."""
        vectors, kept = encode(encoder, part.items, batch_size, False, failures, advance)
        decoded = part.only(kept)
        if not decoded.items:
            return []
        return list(self._write(vectors, decoded.ids, decoded.metadata, replace=replace, keep_metadata=replace))

    def upsert(self, images: Any, ids: Sequence[str] | None = None, metadata: Any = None, **options: Any) -> AddResult:
        """``add(images, ..., on_conflict="replace")``: re-encode and replace entries with the same ids."""
        return self.add(images, ids, metadata, on_conflict="replace", **options)

    def _no_encoder(self) -> bool:
        return self.encoder is None and self.manifest.get("encoder") != BUNDLED_ENCODER

    def _image_encoder(self) -> Any:
        if self.encoder is None and self.manifest.get("encoder") == BUNDLED_ENCODER:
            check_bundled_weights(self.manifest.get("encoder_weights"), self.path)
            self.encoder = load_bundled_encoder()  # imports torch: only when images are first encoded
        if self.encoder is None:
            raise EncoderUnavailableError(
                "this store has no encoder for images: pass encoder=... to mrlstore.open(), or give vectors "
                f"of length {self.dim} (add them with add_vectors())"
            )
        if getattr(self.encoder, "dim", self.dim) != self.dim:
            raise EncoderUnavailableError(f"the encoder makes {self.encoder.dim}-d vectors, the store holds {self.dim}")
        return self.encoder
