"""Committing staged writes without opening the store's coarse tier: the writer of a Ray write's driver, and
the workers that write rows in place for it.

The writer holds the store's writer lock, its catalog and its bands, and never the ids, the metadata or the
HNSW indexes; the catalog checkpoints each step of a large commit and finds ids through the store's id cache
(format 4; DuckDB's unique index on id, about 50 bytes a row of the store, in formats 1-3) and connects
again after each step (DuckDB would keep every block the commit wrote), so its memory grows with neither
the store nor the write. Two ways in:

- fragments (``commit_staged``): workers write whole rows beside the store; the commit reads them one at a
  time through memory maps and appends their vectors to the bands;
- in place (``commit_in_place``): workers write their vectors straight into the bands, at rows reserved for
  each past the committed watermark, under the write's lease, and beside them a fragment of ids and
  metadata. The commit copies no vector: it fills the holes that failed tasks left with the last rows
  (normally none), sizes and indexes the chunk files the workers wrote, and registers the ids.

Either way the ids and metadata go in with ``Catalog.append_tables`` (all visible at once: the commit point,
as for every write; a large write in several transactions of bounded size). The
indexes are a cache that trails the catalog until the store is next opened as a writer, which extends them
from the bands (the Ray sink does that on a worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from mrlstore._fsutil import local_path
from mrlstore.errors import CorruptStoreError, MRLStoreError
from mrlstore.inputs.staging import Fragments, StoreShape, checked_rows, save_fragment
from mrlstore.options import StoreConfig
from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.bands import BandedVectors
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.locking import WriteLease
from mrlstore.tiers.params import StoreParams
from mrlstore.tiers.state import HeldLock, clear_uncommitted
from mrlstore.upkeep.opening import create_if_absent
from mrlstore.upkeep.versions import Versions, publish_first_version

MOVE_ROWS = 4096  # rows copied at a time when the commit fills a hole (16 MiB at 2048-d float16)


class StagedWriter:
    """The store at ``path`` (created when absent, with ``config``'s creation parameters) opened for staged
    commits only, under its exclusive writer lock until ``close()``."""

    def __init__(self, path: str | os.PathLike[str], config: StoreConfig):
        versions = Versions(local_path(path), read_only=False)
        requested = config.creation()
        create_if_absent(versions.path, config, requested)
        self.path = versions.path
        self._lock: HeldLock | None = versions.take_lock()
        self._catalog: Catalog | None = None
        self._vectors: VectorTier | None = None
        try:
            self._catalog = versions.open_catalog()
            self.params = StoreParams.from_manifest(self._catalog.manifest(), self.path)
            self.params.check_requested(requested, self.path)
            self._vectors = versions.open_bands(self.params)
            clear_uncommitted(self.path, self._vectors, self._catalog)
            publish_first_version(self.path, self._catalog)
        except BaseException:
            self.close()
            raise

    def shape(self) -> StoreShape:
        p = self.params
        return StoreShape(p.dim, p.dtype, p.metric, tuple(p.index_dims))

    def commit_staged(self, fragments: list[Any]) -> int:
        """The rows of staged fragments as one commit (all visible at once, or none); returns how many."""
        catalog, vectors = self._open()
        staged = Fragments(fragments, self.shape())
        start = end = catalog.committed_rows()
        with _undone_unless_committed(catalog, vectors, start):
            for batch in staged.vectors():
                vectors.append(end, batch)
                end += len(batch)
            columns = staged.metadata_columns(catalog.columns())
            catalog.append_tables(start, staged.catalog_tables(), end, columns=columns)
        return end - start

    def committed_rows(self) -> int:
        return self._open()[0].committed_rows()

    def commit_in_place(self, written: Sequence[dict[str, Any]], lease: WriteLease) -> tuple[int, int]:
        """The rows workers wrote in place (``RangeWriter.write``'s returns) as one commit; revokes ``lease``
        first, so no worker writes after this. Returns how many rows it added and how many it copied into
        the holes of failed tasks."""
        catalog, vectors = self._open()
        lease.revoke()
        start = catalog.committed_rows()
        with _undone_unless_committed(catalog, vectors, start):  # workers' rows are past start even before
            fragments = Fragments([w["path"] for w in written], self.shape())
            if [int(w["rows"]) for w in written] != fragments.rows:
                raise CorruptStoreError("staged fragments hold other row counts than their workers wrote")
            moves, pieces = place_rows(start, [(int(w["start"]), n) for w, n in zip(written, fragments.rows)])
            end = start + len(fragments)
            _copy_rows(vectors, moves)
            vectors.settle(start, end)
            columns = fragments.metadata_columns(catalog.columns())
            catalog.append_tables(start, _pieces(fragments, pieces), end, columns=columns)
        return end - start, sum(n for _, _, n in moves)

    def discard_in_place(self, lease: WriteLease) -> None:
        """A failed in-place write: its lease revoked, its rows erased."""
        catalog, vectors = self._open()
        lease.revoke()
        vectors.truncate(catalog.committed_rows())

    def _open(self) -> tuple[Catalog, VectorTier]:
        if self._catalog is None or self._vectors is None:
            raise RuntimeError("this StagedWriter is closed")
        return self._catalog, self._vectors

    def close(self) -> None:
        if self._vectors is not None:
            self._vectors.close()
            self._vectors = None
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextmanager
def _undone_unless_committed(catalog: Catalog, vectors: VectorTier, start: int) -> Iterator[None]:
    """On any error, the band rows past ``start`` erased unless the catalog committed them (never assume: the
    commit may have landed before the error). A catalog that cannot say (DuckDB shut down after a failed
    checkpoint) leaves them to the next writer's open, and the error stays the first one."""
    try:
        yield
    except BaseException:
        try:
            committed: int | None = catalog.committed_rows()
        except MRLStoreError:
            committed = None
        if committed == start:
            vectors.truncate(start)
        raise


class RangeWriter:
    """On a worker of an in-place write: checks rows as an add does, writes their vectors straight into the
    store's bands at rows ``reserve(n)`` returns (under the write's lease), and their ids and metadata as a
    fragment in ``staging``. Opens the bands' files only: never the catalog, the lock or the indexes."""

    def __init__(self, path: Path, shape: StoreShape, bands: tuple[int, ...], staging: Path, lease: WriteLease):
        self.shape, self.staging, self.lease = shape, staging, lease
        self.vectors = BandedVectors(path, shape.dim, bands, shape.dtype)

    def write(self, table: pa.Table, vector: str, id: str | None, reserve: Callable[[int], int]) -> dict[str, Any]:  # noqa: A002
        """Returns ``{"path", "rows", "start"}`` for ``StagedWriter.commit_in_place``."""
        vectors, ids, meta = checked_rows(table, vector, id, self.shape)
        with self.lease.held():  # the fragment too: a worker of an ended write leaves nothing behind
            start = reserve(len(vectors))
            self.vectors.write_rows(start, vectors, sized=False)
            fragment = save_fragment(self.staging, ids, meta)
        return {"path": str(fragment), "rows": len(ids), "start": start}

    def close(self) -> None:
        self.vectors.close()


Copy = tuple[int, int, int]  # (source row, destination row, rows)
Piece = tuple[int, int, int, int]  # (destination row, block, offset in the block, rows)


def place_rows(first: int, blocks: Sequence[tuple[int, int]]) -> tuple[list[Copy], list[Piece]]:
    """Where the rows of ``blocks`` (start, rows: disjoint ranges at or past ``first``) end up so that they fill
    ``first..first+total`` with no hole: rows already inside stay; holes (rows reserved by tasks that failed)
    take the rows past the end. Returns the copies ``(src, dst, rows)`` and the pieces
    ``(dst, block, offset in block, rows)`` in row order."""
    end = first + sum(n for _, n in blocks)
    pieces: list[Piece] = []
    holes: list[tuple[int, int]] = []
    sources: list[tuple[int, int, int, int]] = []  # (src, block, offset, rows) past the end
    at = first
    for i in sorted(range(len(blocks)), key=lambda i: blocks[i][0]):
        start, n = blocks[i]
        if n == 0:
            continue  # no rows, no place
        if start < at or n < 0:
            raise CorruptStoreError(f"staged rows {start}..{start + n} overlap others or precede row {first}")
        if start > at and at < end:
            holes.append((at, min(start, end) - at))
        kept = max(0, min(n, end - start))
        if kept:
            pieces.append((start, i, 0, kept))
        if kept < n:
            sources.append((start + kept, i, kept, n - kept))
        at = start + n
    moves: list[Copy] = []
    for dst, want in holes:
        while want:
            src, i, offset, n = sources[0]
            take = min(want, n)
            moves.append((src, dst, take))
            pieces.append((dst, i, offset, take))
            sources[0] = (src + take, i, offset + take, n - take)
            if take == n:
                sources.pop(0)
            dst, want = dst + take, want - take
    pieces.sort()
    return moves, pieces


def _copy_rows(vectors: VectorTier, moves: list[Copy]) -> None:
    """Rows past a commit's end into the holes before it, a block at a time (``settle`` sizes the files)."""
    for src, dst, n in moves:
        for lo in range(0, n, MOVE_ROWS):
            take = min(MOVE_ROWS, n - lo)
            vectors.write_rows(dst + lo, vectors.read_written(src + lo, take), sized=False)


def _pieces(fragments: Fragments, pieces: list[Piece]) -> Iterator[pa.Table]:
    for _, i, offset, n in pieces:
        yield fragments.catalog_table(i, offset, n)
