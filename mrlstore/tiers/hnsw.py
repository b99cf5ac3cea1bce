"""In-memory HNSW index over one vector prefix (hnswlib), saved as a rebuildable cache.

hnswlib is unmaintained, saves non-atomically, and is not safe for writes during queries, so this wrapper
(a) guards it with a readers-writer lock, (b) saves to a temporary file that is fsynced and renamed, with a
JSON sidecar that records the file's size, checksum and the catalog watermark it covers, and (c) refuses
to load a file whose sidecar does not match (the caller then rebuilds it from the Zarr tier). A reader's
index may be deferred: its sidecar checked at open, its file read (or downloaded) when first used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from mrlstore._fsutil import atomic_write_bytes, publish_file
from mrlstore._hugepages import huge_pages_for_new_regions
from mrlstore._rwlock import RWLock
from mrlstore.errors import CorruptStoreError, StoreNotFoundError
from mrlstore.tiers.hnsw_file import HnswFileError, check_file, read_state
from mrlstore.tiers.ip_lift import Lift

INDEX_FORMAT = 1
_SPACES = {"cosine": "cosine", "ip": "l2", "l2": "l2"}  # inner product: l2 over lifted rows (tiers/ip_lift.py)


def _grown(elements: int) -> int:
    """Capacity to reserve beyond ``elements``: hnswlib keeps a mutex (40 bytes) and more per reserved slot
    whether used or not (about 46 MB per million slots), so grow by half, not double."""
    return max(1024, elements + elements // 2)


class IndexUnusable(Exception):
    """The saved index cannot be trusted; rebuild it."""


# A saved index that cannot be read for these is rebuilt like a damaged one (it is a cache); other errors
# (too many open files, no memory) say something about the process, not the file, and are raised.
_UNREADABLE = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR})


class IndexNotSaved(Exception):
    """hnswlib wrote an incomplete file (it does not report failed writes): the saved copy is as it was."""


class _NeedsWriteLock(Exception):
    pass


@dataclass
class _Deferred:
    """What loading a saved index needs: where it is saved, the file's digest when already checked, how to
    make the file local first (a download; returns its checked digest), how to build the index from the
    vectors instead when the file turns out damaged or gone (a deferred index), and rows deleted meanwhile."""

    base: Path
    checked_digest: str | None
    fetch: Callable[[], str | None] | None
    rebuild: Callable[[], PrefixIndex] | None = None
    dead: list[np.ndarray] = field(default_factory=list)


def _live_items(index: hnswlib.Index) -> tuple[np.ndarray, np.ndarray]:
    """The labels an index holds unmarked, and their vectors (hnswlib refuses the items of deleted labels,
    and has no call that tells them: each is asked alone when some are)."""
    labels = np.asarray(index.get_ids_list(), dtype=np.int64)
    try:
        items = np.asarray(index.get_items(labels), dtype=np.float32).reshape(len(labels), index.dim)
        return labels, np.ascontiguousarray(items)
    except RuntimeError:
        pass
    rows: list[int] = []
    found: list[Any] = []
    for row in labels.tolist():
        try:
            found.append(index.get_items([row])[0])
            rows.append(row)
        except RuntimeError:
            continue
    return np.array(rows, dtype=np.int64), np.asarray(found, dtype=np.float32).reshape(len(rows), index.dim)


def _has_size(path: Path, size: object) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _side_digest(side: dict[str, Any]) -> str:
    """The checksum of a sidecar's own fields: an edited count or lift field made rows vanish from searches,
    or every query fail, where a damaged cache should be rebuilt."""
    body = json.dumps({k: v for k, v in side.items() if k != "side_blake2b"}, sort_keys=True)
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


_COUNTS = ("covered_rows", "element_count", "deleted_count")


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class PrefixIndex:
    """HNSW over the first ``dim`` numbers of each row (or of each row's fitted code); labels are the store's
    row numbers."""

    def __init__(
        self,
        dim: int,
        metric: str,
        M: int = 16,
        ef_construction: int = 200,
        capacity: int | None = 1024,
        generation: int = 0,
        fit_id: str | None = None,
    ):
        self.dim, self.metric, self.M, self.ef_construction = dim, metric, M, ef_construction
        self.generation = generation  # the store's row numbering it was built for (compaction renumbers)
        self.fit_id = fit_id  # the fitted projection its vectors are codes of (None: raw prefixes)
        self.covered_rows = 0  # every committed row below this is in the index (or was deleted)
        self._lift = Lift(dim) if metric == "ip" else None  # inner product: rows lifted to one norm
        self._index = hnswlib.Index(space=_SPACES[metric], dim=self._width)
        if capacity is not None:  # None: load replaces it with the saved index
            with huge_pages_for_new_regions():
                self._index.init_index(max_elements=max(capacity, 16), M=M, ef_construction=ef_construction)
        self._lock = RWLock()
        self._load_lock = threading.Lock()
        self._deferred: _Deferred | None = None  # a saved graph not loaded yet (see load)
        self._ef = 10  # hnswlib's default
        self._deleted = 0  # hnswlib's own counts include deleted elements

    @property
    def _width(self) -> int:
        """The length of the vectors the graph holds (a lifted row has one number more)."""
        return self.dim + (self._lift is not None)

    # -- persistence -------------------------------------------------------------------------------
    @staticmethod
    def paths(base: Path) -> tuple[Path, Path]:
        return base.with_suffix(".hnsw"), base.with_suffix(".json")

    def save(self, base: Path) -> None:
        data_path, side_path = self.paths(base)
        tmp = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}")
        self._ready()
        with self._lock.read():
            self._index.save_index(str(tmp))
            side = {
                "format": INDEX_FORMAT,
                "dim": self.dim,
                "metric": self.metric,
                "M": self.M,
                "ef_construction": self.ef_construction,
                "generation": self.generation,
                "fit_id": self.fit_id,
                **(self._lift.to_sidecar() if self._lift is not None else {"ip_radius": None}),
                "covered_rows": self.covered_rows,
                "element_count": self._index.element_count,
                "deleted_count": self._deleted,
            }
        try:
            check_file(tmp, side["element_count"])
            side["bytes"] = tmp.stat().st_size
            side["blake2b"] = _digest(tmp)
            side["side_blake2b"] = _side_digest(side)
            # Sidecar first would let a crash pair a new sidecar with an old file; the checksum catches both orders.
            publish_file(tmp, data_path)
            atomic_write_bytes(side_path, json.dumps(side, indent=2).encode())
        except HnswFileError as e:
            tmp.unlink(missing_ok=True)
            raise IndexNotSaved(f"hnswlib wrote an incomplete index (is the disk full?): {e}") from None
        except OSError as e:  # hnswlib writes nothing to a folder it may not write in, and says nothing
            tmp.unlink(missing_ok=True)
            raise IndexNotSaved(f"cannot save the index {data_path}: {e.strerror or e}") from None

    @classmethod
    def load(
        cls,
        base: Path,
        dim: int,
        metric: str,
        M: int,
        ef_construction: int,
        generation: int = 0,
        fit_id: str | None = None,
        checked_digest: str | None = None,
        fetch: Callable[[], str | None] | None = None,
        rebuild: Callable[[], PrefixIndex] | None = None,
    ) -> PrefixIndex:
        """The index saved at ``base``; IndexUnusable when it is missing, damaged or built otherwise.
        ``checked_digest``: the file's digest as checked since it was written (a download): not read again.
        ``fetch``: makes the file local first (a download), returning its checked digest. ``rebuild``: defer
        the graph to first use (only the sidecar is read now); a file then found damaged or gone is replaced
        by the index ``rebuild()`` builds from the vectors."""
        self = cls(dim, metric, M, ef_construction, capacity=None, generation=generation, fit_id=fit_id)
        pending = _Deferred(base, checked_digest, fetch, rebuild)
        if rebuild is None:
            self._fill(pending)
            return self
        side = self._sidecar(base, local=fetch is None)
        self.covered_rows, self._deleted = side["covered_rows"], side["deleted_count"]
        self._lift = self._lift_of(side, base)
        self._deferred = pending
        return self

    def _sidecar(self, base: Path, local: bool = True) -> dict[str, Any]:
        """The sidecar saved at ``base``, checked against this index's parameters (and, when ``local``, the
        file's size); IndexUnusable otherwise."""
        data_path, side_path = self.paths(base)
        try:
            side = json.loads(side_path.read_text())
        except (OSError, ValueError) as e:
            raise IndexUnusable(f"no usable index at {data_path}: {e}") from None
        if not isinstance(side, dict) or side.get("side_blake2b", None) not in (None, _side_digest(side)):
            raise IndexUnusable(f"{side_path} does not match its checksum (edited or damaged)")
        if any(isinstance(side.get(k), bool) or not isinstance(side.get(k), int) or side[k] < 0 for k in _COUNTS):
            raise IndexUnusable(f"{side_path} lacks a count of rows ({', '.join(_COUNTS)})")
        expected = {"format": INDEX_FORMAT, "dim": self.dim, "metric": self.metric, "M": self.M,
                    "ef_construction": self.ef_construction}  # fmt: skip
        if any(side.get(k) != v for k, v in expected.items()):
            raise IndexUnusable(f"{side_path} was written with other parameters")
        if side.get("generation", 0) != self.generation:  # older sidecars: generation 0, before any compaction
            raise IndexUnusable(f"{side_path} was built for another row numbering (before a compaction)")
        if side.get("fit_id") != self.fit_id:
            raise IndexUnusable(f"{side_path} holds codes of another fit")
        if self._lift is not None and not isinstance(side.get("ip_radius"), (int, float)):
            raise IndexUnusable(f"{side_path} is an hnswlib ip graph (before inner product was searched as l2)")
        if local and not _has_size(data_path, side.get("bytes")):
            raise IndexUnusable(f"{data_path} is missing or does not match its checksum (truncated or replaced)")
        return side

    @property
    def loaded(self) -> bool:
        """Whether the graph is in memory (a deferred index loads on first use)."""
        return self._deferred is None

    def _ready(self) -> None:
        """Load a deferred index's graph (once; concurrent callers wait for it)."""
        if self._deferred is None:
            return
        with self._load_lock:
            pending = self._deferred
            if pending is None:
                return
            try:
                self._fill(pending)
            except (IndexUnusable, CorruptStoreError, StoreNotFoundError) as e:
                # damaged since the open, or gone (a version on object storage that newer publishes removed)
                assert pending.rebuild is not None
                warnings.warn(f"{e}; rebuilding the index from the vectors", stacklevel=3)
                built = pending.rebuild()
                self._index, self._deleted, self.covered_rows = built._index, built._deleted, built.covered_rows
                self._lift = built._lift
            for rows in pending.dead:
                self._hide(rows)
            self._deferred = None  # last: a search that sees no deferral finds the deletions applied

    def _fill(self, pending: _Deferred) -> None:
        """The saved graph into memory, checked against its sidecar (IndexUnusable when it does not match).
        The sidecar is read now: a live writer may have saved the index again since a reader opened."""
        checked = (pending.fetch() if pending.fetch is not None else None) or pending.checked_digest
        side = self._sidecar(pending.base)
        data_path = self.paths(pending.base)[0]
        try:
            if side.get("blake2b") != (checked or _digest(data_path)):
                raise IndexUnusable(f"{data_path} does not match its checksum (truncated or replaced)")
            state = read_state(data_path, _SPACES[self.metric], self._width, _grown(side["element_count"]))
            # hnswlib's state constructor (pybind11's __setstate__, no pickle): whole-array copies
            index = hnswlib.Index.__new__(hnswlib.Index)
            with huge_pages_for_new_regions(collapse=True):
                index.__setstate__((state,))
        except (RuntimeError, ValueError, MemoryError) as e:
            raise IndexUnusable(f"hnswlib could not load {data_path}: {e}") from None
        except OSError as e:
            if e.errno not in _UNREADABLE:
                raise
            raise IndexUnusable(f"cannot read {data_path}: {e.strerror}") from None
        if index.element_count != side["element_count"] or index.dim != self._width:
            raise IndexUnusable(f"{data_path} holds {index.element_count} elements, sidecar says otherwise")
        self._index = index
        self.covered_rows, self._deleted = side["covered_rows"], side["deleted_count"]
        self._lift = self._lift_of(side, pending.base)

    def _lift_of(self, side: dict[str, Any], base: Path) -> Lift | None:
        """An ip index's lift as its sidecar saved it (None for other metrics); IndexUnusable if garbled."""
        if self._lift is None:
            return None
        try:
            return Lift.from_sidecar(self.dim, side)
        except ValueError as e:
            raise IndexUnusable(f"{self.paths(base)[1]}: {e}") from None

    # -- updates -----------------------------------------------------------------------------------
    def add(
        self, vectors: np.ndarray, rows: np.ndarray, covered_rows: int | None = None, num_threads: int = -1
    ) -> None:
        """Insert (or, for labels already present, update) rows; ``covered_rows`` advances the watermark the
        index vouches for (None: rows not committed yet, invisible to queries until they are). Updates come
        from the store's one writer (or one refresh) at a time."""
        self._ready()
        x = np.ascontiguousarray(vectors[:, : self.dim], dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        if self._lift is not None and len(rows):
            split = self._lift.split(x, rows)
            x, rows = split.graph_x, split.graph_rows
            self._set_beside(rows, split.beside)
            if split.radius is not None:
                self._relift(split.radius, split.limit, num_threads)
            x = self._lift.lifted(x)
        with self._lock.write():
            if len(rows):
                if self._lift is not None:
                    self._deleted -= self._lift.relinked(rows)  # hnswlib unmarks a label written again
                need = self._index.element_count + len(rows)
                if need > self._index.get_max_elements():
                    with huge_pages_for_new_regions(collapse=True):  # the graph moves to a larger region
                        self._index.resize_index(max(need, _grown(self._index.get_max_elements())))
                self._index.add_items(x, rows, num_threads=num_threads)
            if covered_rows is not None:
                self.covered_rows = max(self.covered_rows, covered_rows)

    def _set_beside(self, graph_rows: np.ndarray, beside: dict[int, np.ndarray]) -> None:
        """Rows kept beside the graph from now on (an older copy of one in the graph is marked deleted), and
        those going into it no longer kept beside it."""
        assert self._lift is not None
        if not beside and not self._lift.long:
            return
        with self._lock.write():
            for row in beside:
                try:
                    self._index.mark_deleted(row)
                except RuntimeError:
                    continue  # not in the graph: nothing to unlink
                self._deleted += 1
                self._lift.unlinked.add(row)
            self._lift.place(graph_rows, beside)

    def _relift(self, radius: float, limit: float, num_threads: int) -> None:
        """The graph built again with its rows (and those beside it that fit) lifted to ``radius``, while
        searches go on with the old one; then swapped in. Rows marked deleted are left out."""
        assert self._lift is not None
        rows, x = _live_items(self._index)  # reads: searches may run meanwhile, updates may not
        taken_rows, taken = self._lift.taken_in(radius)
        rows, x = np.concatenate([rows, taken_rows]), np.vstack([x[:, : self.dim], taken])
        graph = hnswlib.Index(space=_SPACES[self.metric], dim=self._width)
        with huge_pages_for_new_regions():
            graph.init_index(_grown(max(len(rows), 16)), M=self.M, ef_construction=self.ef_construction)
        if len(rows):
            graph.add_items(self._lift.lifted(x, radius), rows, num_threads=num_threads)
        with self._lock.write():
            graph.set_ef(self._ef)
            self._index, self._deleted = graph, 0
            self._lift.moved_in(radius, limit, taken_rows)

    def mark_deleted(self, rows: np.ndarray) -> None:
        if self._deferred is not None:
            with self._load_lock:
                if self._deferred is not None:  # hidden when the graph loads
                    self._deferred.dead.append(np.asarray(rows, dtype=np.int64))
                    return
        self._hide(rows)

    def _hide(self, rows: np.ndarray) -> None:
        with self._lock.write():
            labels = np.asarray(rows, dtype=np.int64).tolist()
            if self._lift is not None:
                self._lift.drop(labels)  # and any copy in the graph is marked below
            for row in labels:
                try:
                    self._index.mark_deleted(row)
                    self._deleted += 1
                except RuntimeError:
                    pass  # not in the index (never added, or already deleted): nothing to hide

    def holds(self, row: int) -> bool:
        """Whether ``row`` is in the index and not marked deleted (hnswlib refuses deleted labels)."""
        self._ready()
        with self._lock.read():
            if self._lift is not None and int(row) in self._lift.long:
                return True
            try:
                self._index.get_items([int(row)])
            except RuntimeError:
                return False
        return True

    # -- search ------------------------------------------------------------------------------------
    @property
    def live_count(self) -> int:
        self._ready()
        beside = len(self._lift.long) if self._lift is not None else 0
        return self._graph_count + beside

    @property
    def _graph_count(self) -> int:
        return int(self._index.element_count) - self._deleted

    def search(self, queries: np.ndarray, k: int, ef: int, num_threads: int = 1) -> np.ndarray:
        """Row numbers of the approximate ``k`` nearest rows per query (-1 pads when fewer exist)."""
        if self._deferred is not None:
            self._ready()
        if not (queries.ndim == 2 and queries.shape[1] == self.dim and queries.dtype == np.float32):
            queries = np.atleast_2d(queries)[:, : self.dim]  # (a query's codes come as hnswlib takes them)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._lift is not None:  # a query's lifting number is 0
            queries = np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), np.float32)]))
        k_eff = min(k, self.live_count)
        if k_eff <= 0:
            return np.full((len(queries), k), -1, dtype=np.int64)
        ef = max(ef, k_eff)
        labels = None
        # ef is index-wide state in hnswlib: change it only while no other search runs.
        if ef == self._ef:
            with self._lock.read():
                if ef == self._ef:
                    try:
                        labels = self._knn(queries, k_eff, num_threads)
                    except _NeedsWriteLock:
                        pass
        if labels is None:
            with self._lock.write():
                labels = self._knn(queries, k_eff, num_threads, ef)
        if labels.shape[1] == k:
            return labels
        out = np.full((len(queries), k), -1, dtype=np.int64)
        out[:, : labels.shape[1]] = labels
        return out

    def _knn(self, queries: np.ndarray, k: int, num_threads: int, ef: int | None = None) -> np.ndarray:
        """The best ``k`` labels per query (the caller holds the lock): the graph's, and for an inner-product
        index merged with the rows beside it."""
        graph_k = min(k, self._graph_count)
        if graph_k <= 0:
            labels, dists = np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32)
        else:
            if ef is not None and ef != self._ef:
                self._index.set_ef(ef)
                self._ef = ef
            try:
                found, dists = self._index.knn_query(queries, k=graph_k, num_threads=num_threads)
                labels = found.view(np.int64)  # hnswlib's uint64 labels are row numbers, far below 2**63
            except RuntimeError:
                if ef is None:
                    raise _NeedsWriteLock from None
                labels, dists = self._knn_fallback(queries, graph_k, num_threads)
        if self._lift is None:
            return labels
        return self._lift.merged(queries, labels, dists, k)

    def _knn_fallback(self, queries: np.ndarray, k: int, num_threads: int) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib could not fill k slots (deleted elements crowd the graph): widen the beam, then ask
        each query for fewer; missing slots stay -1 (at an infinite distance) and the caller completes them
        exactly."""
        self._index.set_ef(max(self._ef, k) * 4 + 100)
        try:
            found, dists = self._index.knn_query(queries, k=k, num_threads=num_threads)
            return found.view(np.int64), dists
        except RuntimeError:
            labels = np.full((len(queries), k), -1, dtype=np.int64)
            dists = np.full((len(queries), k), np.inf, dtype=np.float32)
            for i, q in enumerate(queries):
                kk = k
                while kk > 0:
                    try:
                        found, near = self._index.knn_query(q, k=kk, num_threads=1)
                        labels[i, :kk], dists[i, :kk] = found[0].view(np.int64), near[0]
                        break
                    except RuntimeError:
                        kk //= 2
            return labels, dists
        finally:
            self._index.set_ef(self._ef)
