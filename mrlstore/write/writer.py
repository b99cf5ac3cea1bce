"""The commit protocol (storage/FORMAT.md has the details):

1. validate the whole batch, before any I/O;
2. write the vectors into Zarr rows past the committed watermark, fsync;
3. insert them into the in-memory HNSW indexes (invisible: past every query's snapshot watermark);
4. one DuckDB transaction records ids, metadata, tombstones and the new watermark: the commit point;
   it and the publish of a new in-memory ``Snapshot`` run under the exclusive visibility lock that queries
   hold shared, so a query sees the catalog and memory of one moment.

A crash at any moment reopens to the last commit: rows past the watermark are invisible and cut on the
next writer's open. The HNSW indexes are a cache: saved atomically now and then, rebuilt when untrustworthy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore._memory import release_freed_memory
from mrlstore.errors import (
    DuplicateIdError,
    InvalidInputError,
    MRLStoreError,
    ShapeError,
    StorageError,
    StoreClosedError,
    storage_error,
)
from mrlstore.inputs.staging import Fragments, StoreShape
from mrlstore.inputs.vectors import check_known, id_list, id_strings, metadata_table, vector_batch
from mrlstore.tiers.rows import kept_metadata, overlaid_metadata
from mrlstore.tiers.snapshot import Snapshot, load_snapshot
from mrlstore.tiers.state import StoreState

_TRIM_AFTER_BYTES = 4 << 20


def _keys_given(metadata: Any) -> dict[str, list[bool]] | None:
    """Per key, which entries of a list of dicts gave it (None: a table or one dict gives every column)."""
    if not isinstance(metadata, (list, tuple)) or not all(isinstance(r, Mapping) for r in metadata):
        return None
    keys = dict.fromkeys(k for r in metadata for k in r)
    return {k: [k in r for r in metadata] for k in keys}


class Writer:
    """Adds, replaces and deletes rows of one open store. ``on_commit`` runs after every commit (the
    versions component publishes for reader processes)."""

    def __init__(self, state: StoreState, on_commit: Callable[[], None]):
        self.state, self.on_commit = state, on_commit

    def shape(self) -> StoreShape:
        """What a batch must be to be written here (workers check and write fragments with it)."""
        p = self.state.params
        return StoreShape(p.dim, p.dtype, p.metric, tuple(p.index_dims))

    def add(self, vectors: Any, ids: Any, metadata: Any, on_conflict: str) -> list[str]:
        """``Store.add_vectors``: ``on_conflict`` decides for ids already present (error, skip, replace)."""
        if on_conflict not in ("error", "skip", "replace"):
            raise InvalidInputError(f"on_conflict must be 'error', 'skip' or 'replace', got {on_conflict!r}")
        replace = on_conflict == "replace"
        return self.write(vectors, ids, metadata, replace=replace, keep_metadata=replace, skip=on_conflict == "skip")

    def upsert(self, vectors: Any, ids: Any, metadata: Any, keep_metadata: bool) -> list[str]:
        """``Store.upsert_vectors``: replaced entries keep the metadata this call leaves out, if asked."""
        if ids is None:
            raise InvalidInputError("upsert_vectors needs ids (which entries to replace)")
        return self.write(vectors, ids, metadata, replace=True, keep_metadata=keep_metadata)

    def update_metadata(self, ids: Any, metadata: Any) -> int:
        """``Store.update_metadata``: entries ``ids`` committed again with their vectors and the columns
        ``metadata`` gives set (None clears); returns how many."""
        names = id_strings(ids)
        id_batch = id_list(names, len(names))  # refuses an id given twice
        meta = metadata_table(metadata, len(id_batch))
        p = self.state.params
        with self.state.writing():  # one writer: the rows read are the ones replaced
            found = self.state.catalog.rows_of(id_batch)
            check_known(id_batch, found)
            if meta is None:
                return 0
            rows = [found[i] for i in id_batch]
            stored = self.state.vectors.gather(np.asarray(rows, dtype=np.int64), 0, p.dim)
            batch = vector_batch(stored, p.dim, p.dtype, p.metric, p.index_dims)
            merged = overlaid_metadata(self.state.snap.table.metadata_of(rows), meta, _keys_given(metadata))
            self.commit([batch], id_batch, merged, replace=True, keep_metadata=False)
        return len(id_batch)

    def write(
        self, vectors: Any, ids: Any, metadata: Any, replace: bool, keep_metadata: bool = False, skip: bool = False
    ) -> list[str]:
        """Validate and commit one batch; ``skip`` leaves out rows whose ids are present. Returns all its ids."""
        p = self.state.params
        batch = vector_batch(vectors, p.dim, p.dtype, p.metric, p.index_dims)
        id_batch = id_list(ids, len(batch))
        meta = metadata_table(metadata, len(batch))
        with self.state.writing():  # one writer: ids present now stay present until the commit
            rows, new_ids, new_meta = batch, id_batch, meta
            present = self.state.catalog.rows_of(id_batch) if skip and ids is not None else {}
            if present:  # on_conflict="skip": leave those rows out
                keep = np.array([i not in present for i in id_batch])
                rows, new_ids = batch[keep], [i for i in id_batch if i not in present]
                new_meta = None if meta is None else meta.filter(keep)
            if new_ids:
                self.commit([rows], new_ids, new_meta, replace, keep_metadata)
        if batch.nbytes >= _TRIM_AFTER_BYTES:
            release_freed_memory()
        return id_batch

    def commit_staged(self, fragments: list[Any]) -> int:
        """The rows of staged fragments as one commit (all visible at once, or none); returns how many."""
        staged = Fragments(fragments, self.shape())
        if len(staged):
            ids, metadata = staged.whole()
            self.commit(staged.vectors(), ids, metadata, replace=False, keep_metadata=False)
        return len(staged)

    def commit(
        self,
        batches: Iterable[np.ndarray],
        id_batch: list[str],
        meta: pa.Table | None,
        replace: bool,
        keep_metadata: bool,
    ) -> None:
        """Write the rows of ``batches`` (checked vectors, ``len(id_batch)`` rows in all, read one batch at a
        time) and commit them as one: queries and a reopen see all of them or none."""
        state = self.state
        with state.writing():
            existing = state.catalog.rows_of(id_batch)
            if existing and not replace:
                raise DuplicateIdError(
                    f"{len(existing)} id(s) already in the store, e.g. {sorted(existing)[:5]}; "
                    "pass on_conflict='skip' or 'replace' (or use upsert_vectors)"
                )
            if keep_metadata and existing:
                meta = kept_metadata(meta, state.snap.table.metadata_of([existing.get(i, -1) for i in id_batch]))
            if meta is not None:
                state.catalog.check_metadata(meta)
            start = state.snap.watermark
            replaced = np.fromiter(existing.values(), dtype=np.int64, count=len(existing))
            try:
                self._write_rows(start, batches, len(id_batch))
                with state.visibility.write():  # queries see all of this write or none of it
                    end = start + len(id_batch)
                    stored = state.catalog.commit_rows(start, id_batch, meta, end, replace_rows=replaced)
                    self._show(start, end, replaced, stored)
                    state.vectors.release_retired()  # no query in flight: maps its growing files replaced
            except BaseException as e:
                self._after_failure(start, e)
                raise
            state.indexes.autosave()
            self.on_commit()

    def _write_rows(self, start: int, batches: Iterable[np.ndarray], n: int) -> None:
        """Rows ``start``... of an uncommitted write: to the bands, and into the HNSW cache before the commit
        so the visibility lock stays short. Rows past the watermark are invisible to queries; if the commit
        fails they stay behind as dead labels that the next append of those rows overwrites."""
        vectors, end = self.state.vectors, start
        for batch in batches:
            vectors.append(end, batch)
            vectors.prefault(end, end + len(batch))
            self.state.indexes.insert(end, batch)
            end += len(batch)
        if end != start + n:
            raise ShapeError(f"got {end - start} vectors for {n} ids")

    def _after_failure(self, start: int, error: BaseException) -> None:
        """An interruption can land after DuckDB's COMMIT: ask the catalog, never assume."""
        state = self.state
        self._closed_if_catalog_stopped(error)
        if state.catalog.committed_rows() == start:
            try:
                state.vectors.truncate(start)
            except OSError:
                pass  # a full disk: the leftovers past the watermark stay invisible, cleared on open
            with state.visibility.write():  # the maps truncate replaced (4 descriptors per failed add)
                state.vectors.release_retired()
            if isinstance(error, OSError) and not isinstance(error, MRLStoreError):
                raise storage_error("write to the store", state.path, error) from error
            return
        self._resync()  # committed: memory must catch up with the catalog

    def _closed_if_catalog_stopped(self, error: BaseException) -> None:
        """After a failed write: if DuckDB stopped the catalog (a fatal error, such as a checkpoint that found the
        disk full), nothing more can be read or written through it, so the store closes, saying why."""
        if not self.state.catalog.stopped():
            return
        why = "DuckDB stopped its catalog after a failed write (a fatal error, such as a full disk): open it again"
        self.state.shut(why)
        if isinstance(error, StorageError):  # the failure itself (a full disk), and what it did to the store
            raise StorageError(
                f"{error}; DuckDB stopped the catalog after it, and the store closed: open it again"
            ) from None
        raise StoreClosedError(f"store {self.state.location} is closed: {why}") from error

    def _resync(self) -> None:
        """Rebuild the in-memory state (snapshot, indexes) from the committed catalog and the bands. If even
        that fails, the store closes: reopening recovers from disk."""
        state = self.state
        try:
            watermark = state.catalog.committed_rows()
            state.snap = load_snapshot(state.catalog.live_items(), watermark, state.snap.version + 1)
            state.indexes.load(state.snap, state.vectors, state.catalog.tombstones(), state.indexes.projection)
        except BaseException:
            state.shut()
            raise

    def _show(self, start: int, end: int, replaced: np.ndarray, stored: pa.Table) -> None:
        """Make a committed write visible in memory: a new snapshot (``stored``: the new rows' ids and
        metadata as the catalog stored them), and the indexes' watermark."""
        snap = self.state.snap
        live = snap.live
        if end > len(live):
            live = np.zeros(max(end, 2 * len(live)), dtype=bool)
            live[:start] = snap.live[:start]
        live[start:end] = True  # past the old watermark: no older snapshot reads these, so filled in place
        if len(replaced):
            live = live.copy()  # copy-on-write: an older snapshot keeps the replaced rows live
            live[replaced] = False
        n_live = snap.n_live + (end - start) - len(replaced)
        self.state.snap = Snapshot(snap.version + 1, end, live, n_live, snap.table.appended(stored))
        self.state.indexes.committed(end, replaced, end - start)

    def delete(self, ids: Sequence[str], missing_ok: bool) -> int:
        """Delete entries by id; returns how many. Unknown ids raise UnknownIdError unless ``missing_ok``."""
        state = self.state
        ids = id_strings([ids] if isinstance(ids, str) else ids)
        with state.writing():
            found = state.catalog.rows_of(ids)
            if not missing_ok:
                check_known(ids, found)
            if not found:
                return 0
            rows = np.fromiter(found.values(), dtype=np.int64, count=len(found))
            with state.visibility.write():
                try:
                    state.catalog.delete_rows(rows)
                    self._show_deleted(rows)
                except BaseException as e:
                    self._catch_up_delete(rows, list(found), e)
                    raise
            self.on_commit()
        return len(rows)

    def _catch_up_delete(self, rows: np.ndarray, ids: list[str], error: BaseException) -> None:
        """After an interruption (Ctrl-C) anywhere in a delete: if the catalog committed it, memory shows it
        too (published with the next commit, or by the next reader). Ask the catalog, never assume."""
        self._closed_if_catalog_stopped(error)
        if self.state.catalog.rows_of(ids):
            return  # rolled back
        if self.state.snap.live[rows].any():
            self._show_deleted(rows)
        else:
            self.state.indexes.deleted(rows)  # in case it stopped between the snapshot and the indexes

    def _show_deleted(self, rows: np.ndarray) -> None:
        """Make a committed delete of ``rows`` visible in memory (under the visibility lock)."""
        snap = self.state.snap
        live = snap.live.copy()  # copy-on-write: a query in flight keeps its snapshot
        live[rows] = False
        self.state.snap = Snapshot(snap.version + 1, snap.watermark, live, snap.n_live - len(rows), snap.table)
        self.state.indexes.deleted(rows)
