"""Adding images: check every input, skip what the store holds, encode and commit ``commit_every`` at a
time (bounded memory; an interrupted add keeps its commits and a re-run resumes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from mrlstore.encoder.protocol import Encoder
from mrlstore.encoder.runner import EncoderSlot, encode_images
from mrlstore.errors import DuplicateIdError, InvalidInputError, UnreadableImageError
from mrlstore.inputs.classify import looks_like_vectors
from mrlstore.inputs.images import ImageBatch
from mrlstore.results import AddResult, Failure
from mrlstore.tiers.params import positive_int
from mrlstore.tiers.state import StoreState
from mrlstore.write.writer import Writer

COMMIT_EVERY = 1024  # images per commit of an add: 8 MiB of 2048-d float32 vectors, ~10 s of encoding on 2 cores


SKIP_HINT = "Pass skip_errors=True (mrlstore add --skip-errors) to leave out unreadable images and list them"


@contextmanager
def _hint_skip_errors(committed: int, hint: str) -> Iterator[None]:
    """An unreadable image's error, with what the caller can do about it."""
    try:
        yield
    except UnreadableImageError as e:
        kept = f"; the {committed} images committed before it stay (run the same add again to resume)"
        raise UnreadableImageError(f"{e}. {hint}{kept if committed else ''}") from None


class ImageAdder:
    """``Store.add``: images through the store's encoder into its writer."""

    def __init__(self, state: StoreState, writer: Writer, encoders: EncoderSlot):
        self.state, self.writer, self.encoders = state, writer, encoders

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
        hint: str = SKIP_HINT,
    ) -> AddResult:
        """Encode and add ``images`` (see ``Store.add``); returns what was done. ``hint``: what an unreadable
        image's error tells the caller to do."""
        if on_conflict not in ("skip", "replace", "error"):
            raise InvalidInputError(f"on_conflict must be 'skip', 'replace' or 'error', got {on_conflict!r}")
        size = positive_int(batch_size, "batch_size")
        group = positive_int(commit_every, "commit_every")
        encoder = self.encoders.get(self.state.manifest)
        dim = self.state.params.dim
        if looks_like_vectors(images, dim):  # the rule of mrlstore.inputs.classify
            raise InvalidInputError(
                f"add() encodes images, and this looks like vectors of length {dim}: add vectors with add_vectors()"
            )
        with _hint_skip_errors(0, hint):
            batch = ImageBatch.prepare(images, ids, metadata, skip_errors)
        existing = self.state.catalog.rows_of(batch.ids)
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
                with _hint_skip_errors(len(written), hint):
                    written += self._encode_and_commit(encoder, part, size, failures, on_conflict == "replace",
                                                       bar.update if atomic else None)  # fmt: skip
                if not atomic:
                    bar.update(len(part.ids))
        lost = {f.index for f in late}
        skipped = [i for i in batch.ids if i in existing] if on_conflict == "skip" else []
        lost_ids = {i for i, item in zip(batch.ids, batch.items) if item.index in lost}
        kept_ids = [i for i in batch.given or batch.ids if i not in lost_ids]  # one per input, repeats too
        replaced = [i for i in written if i in existing] if on_conflict == "replace" else []
        failed = sorted(batch.failed + late, key=lambda f: f.index)
        return AddResult(kept_ids, written, skipped + batch.repeats, failed, replaced)

    def _encode_and_commit(
        self,
        encoder: Encoder,
        part: ImageBatch,
        batch_size: int,
        failures: list[Failure] | None,
        replace: bool,
        advance: Callable[[int], object] | None,
    ) -> list[str]:
        """Encode ``part`` and commit what decoded as one write; returns the ids written."""
        vectors, kept = encode_images(encoder, part.items, batch_size, False, failures, advance)
        decoded = part.only(kept)
        if not decoded.items:
            return []
        return list(self.writer.write(vectors, decoded.ids, decoded.metadata, replace=replace, keep_metadata=replace))
