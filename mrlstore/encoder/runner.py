"""Running an encoder: loading the bundled one, which one a store uses (:class:`EncoderSlot`), and turning
checked image inputs into vectors a batch at a time (:func:`encode_images`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mrlstore.encoder.bundled import bundled_input_size
from mrlstore.encoder.protocol import Encoder
from mrlstore.errors import EncoderUnavailableError, InvalidInputError
from mrlstore.inputs.images import ImageItem, to_rgb
from mrlstore.results import Failure
from mrlstore.tiers.params import BUNDLED_ENCODER

if TYPE_CHECKING:  # torch loads only when images are encoded
    from mrlstore.encoder.model import ImageEncoder


def load_bundled_encoder(
    path: str | os.PathLike[str] | None = None, device: str | None = None, image_size: int | None = None
) -> ImageEncoder:
    """The bundled MRL image encoder (or one saved at ``path``), resizing inputs to ``image_size`` px if given
    (default: the weights' own); imports torch, so only when images come."""
    try:
        from mrlstore.encoder.model import load_encoder
    except ModuleNotFoundError as e:
        raise EncoderUnavailableError(
            f"images need the image extra ({e.name} is not installed): pip install 'mrlstore[images]' "
            "(install torch==2.13.0 first for the CPU build)"
        ) from e
    except ImportError as e:  # installed but broken, or its import interrupted earlier in this process
        raise EncoderUnavailableError(
            f"the image encoder could not be loaded: importing {e.name or 'torch'} failed ({e}); if an import was "
            "interrupted (Ctrl-C) in this process, start a new one"
        ) from e
    return load_encoder(path, device=device, image_size=image_size)


class EncoderSlot:
    """The encoder of one store: the one passed to ``open()``, or for a store made for the bundled encoder,
    the bundled one, loaded (with torch) when the first image comes."""

    def __init__(self, encoder: Encoder | None, dim: int, where: object):
        self.encoder, self.dim, self.where = encoder, dim, where

    def available(self, manifest: dict[str, Any]) -> bool:
        """Whether images can be encoded (an encoder was given, or the store is the bundled encoder's)."""
        return self.encoder is not None or manifest.get("encoder") == BUNDLED_ENCODER

    def get(self, manifest: dict[str, Any]) -> Encoder:
        """The encoder, loaded if need be; EncoderUnavailableError when the store has none for images."""
        if self.encoder is None and manifest.get("encoder") == BUNDLED_ENCODER:
            size = bundled_input_size(manifest.get("encoder_weights"), self.where)
            self.encoder = load_bundled_encoder(image_size=size)  # imports torch: only when images first come
        if self.encoder is None:
            raise EncoderUnavailableError(
                "this store has no encoder for images: pass encoder=... to mrlstore.open(), or give vectors "
                f"of length {self.dim} (add them with add_vectors())"
            )
        if getattr(self.encoder, "dim", self.dim) != self.dim:
            raise EncoderUnavailableError(f"the encoder makes {self.encoder.dim}-d vectors, the store holds {self.dim}")
        return self.encoder


def encode_images(
    encoder: Encoder,
    items: list[ImageItem],
    batch_size: int,
    progress: bool | None,
    failures: list[Failure] | None = None,
    advance: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The encoder's vectors for ``items``, decoding a batch of images at a time (bounded memory), and the
    positions in ``items`` they belong to. An image that cannot be decoded raises UnreadableImageError, or
    with ``failures`` given is left out and reported there. ``advance(n)`` (instead of a progress bar of
    its own) is told of every batch done.

    Each image is shrunk to the encoder's input as soon as it is decoded where the encoder can say how
    (``prepare``, the bundled one), else a batch goes to the encoder early once its decoded images hold
    DECODED_BATCH_BYTES: a batch of 64 phone photos of 12 MP held 2.3 GB of pixels (48 MP: 9 GB)."""
    from tqdm import tqdm

    show = advance is None and (progress if progress is not None else len(items) > 4 * batch_size)
    prepared = callable(getattr(encoder, "prepare", None)) and callable(getattr(encoder, "embed_prepared", None))
    out, kept = [], []
    with tqdm(total=len(items), desc="encode", unit="img", disable=not show) as bar:
        for lo in range(0, len(items), batch_size):
            batch: list[np.ndarray] = []
            held = 0
            for pos, item in enumerate(items[lo : lo + batch_size], start=lo):
                try:
                    batch.append(encoder.prepare(to_rgb(item)) if prepared else to_rgb(item))  # type: ignore[attr-defined]
                except InvalidInputError as e:
                    if failures is None:
                        raise
                    failures.append(Failure(item.index, item.describe(), str(e)))
                    continue
                kept.append(pos)
                held += batch[-1].nbytes
                if held >= DECODED_BATCH_BYTES:
                    out.append(_encoded(encoder, batch, prepared))
                    batch, held = [], 0
            if batch:
                out.append(_encoded(encoder, batch, prepared))
            (advance or bar.update)(min(batch_size, len(items) - lo))
    dim = int(getattr(encoder, "dim", 0))
    return (np.concatenate(out) if out else np.empty((0, dim), np.float32)), kept


DECODED_BATCH_BYTES = 256 << 20


def _encoded(encoder: Encoder, batch: list[np.ndarray], prepared: bool) -> np.ndarray:
    """Vectors of ``batch``: ``prepare``'d images through ``embed_prepared``, else decoded ones through ``encode``."""
    if prepared:
        vectors = np.asarray(encoder.embed_prepared(np.stack(batch)), dtype=np.float32)  # type: ignore[attr-defined]
    else:
        vectors = np.asarray(encoder.encode(batch), dtype=np.float32)  # a batch already: README's encode(images)
    if vectors.shape[0] != len(batch):
        raise EncoderUnavailableError(f"the encoder gave {len(vectors)} vectors for {len(batch)} images")
    return vectors
