"""Where an id may be stored: 64-bit id hashes mapped to rows, a cache beside the catalog (``ids/``).

DuckDB's unique index on ``_items.id`` takes about 50 bytes a row in every process that writes, cannot be
evicted, and a checkpoint rewrites all of it when ids arrive in random order: a store's writer grew with
the store. Stores of format 4 have no such index; the catalog finds an id's rows here and checks each
candidate row against ``_items`` (so this map may hold pairs that are no longer true, never miss a true one):

- *runs*: immutable files ``ids/<lo>-<hi>.run``, the (hash, row) pairs of catalog rows ``lo..hi`` sorted by
  hash, read through memory maps (held by the page cache, not by the process);
- a *tail* in memory: the pairs of rows past the last run, written out as a run once it has TAIL_ROWS.

A run is written, fsynced and renamed into place; its header holds the CRC-32 of its pairs, checked when
it is opened (a run whose bytes changed is not used: rebuilt by a writer, looked up in the catalog by a
reader). The newest two merge while the newer is at least half
the size of the older (like a binary counter: about log2(rows / TAIL_ROWS) runs; each pair is rewritten
that many times), a block at a time. The runs that follow each other from row 0 cover rows ``0..covered``;
a writer's load deletes every other run file and every run past the committed watermark (a dead write's
rows, which later writes reuse), then reads the rows past ``covered`` from the catalog.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

ID_DIR = "ids"
TAIL_ROWS = 65_536  # pairs held in memory before they go to a run
BUILD_ROWS = 262_144  # catalog rows read per run when a writer builds missing runs
READER_TAIL_ROWS = 262_144  # a reader past more uncovered rows than this asks the catalog instead of loading
MERGE_BLOCK = 262_144  # pairs taken from each run per step of a merge (bounded memory: about 20 MB)
_MAGIC = b"MRLIDS01"
_HEADER = np.dtype(
    [("magic", "S8"), ("guard", "<u8"), ("lo", "<i8"), ("hi", "<i8"), ("n", "<i8"), ("digest", "V16")]
)  # runs written before the digest have zeros there: their pairs are checked for order and range instead
_HEADER_BYTES = 64

# The catalog's rows lo..hi that are in _items: (their id hashes as uint64, their rows as int64).
ReadPairs = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Run:
    path: Path
    lo: int
    hi: int
    hashes: np.ndarray  # uint64, ascending (a memory map)
    rows: np.ndarray  # int64, the row of each hash


class IdIndex:
    """The (hash, row) pairs of a catalog's rows; ``guard`` is the catalog's hash of a fixed text (runs
    made with another hash function are not used); ``read_pairs`` reads pairs from the catalog."""

    def __init__(self, folder: Path, guard: int, read_pairs: ReadPairs, writable: bool):
        self.folder, self.guard, self.writable = folder, guard, writable
        self._read_pairs = read_pairs
        self._runs: list[_Run] = []
        self._tail_hashes = np.empty(0, np.uint64)
        self._tail_rows = np.empty(0, np.int64)
        self.covered = 0  # rows below this are in the runs
        self.tail_in_catalog = False  # a reader that left rows covered.. in the catalog (too many to load)

    def load(self, watermark: int) -> None:
        """Take the runs on disk (a writer: only those within ``watermark``, deleting the others, and builds
        runs for the rows they miss) and read the remaining rows' pairs into the tail."""
        self._runs = self._chain(watermark)
        self.covered = self._runs[-1].hi if self._runs else 0
        if self.writable:
            try:
                while watermark - self.covered >= TAIL_ROWS:
                    hi = min(self.covered + BUILD_ROWS, watermark)
                    self._add_run(*self._read_pairs(self.covered, hi), hi)
                    self._merge()
            except OSError:
                pass  # runs that cannot be written (a full disk): the rest of the pairs stay in memory
        elif watermark - self.covered > READER_TAIL_ROWS:
            self.tail_in_catalog = True
            return
        self._tail_hashes, self._tail_rows = self._read_pairs(self.covered, max(watermark, self.covered))
        self._sort_tail()

    def close(self) -> None:
        self._runs = []

    def candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every stored pair whose hash is in ``hashes``: (the position in ``hashes``, the pair's row)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        wanted = hashes[order]
        found = [_matches(run.hashes, run.rows, wanted, order) for run in self._runs]
        found.append(_matches(self._tail_hashes, self._tail_rows, wanted, order))
        return np.concatenate([p for p, _ in found]), np.concatenate([r for _, r in found])

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Pairs of rows being written (before their commit: a pair of a write that fails stays, untrue)."""
        self._tail_hashes = np.concatenate([self._tail_hashes, np.asarray(hashes, dtype=np.uint64)])
        self._tail_rows = np.concatenate([self._tail_rows, np.asarray(rows, dtype=np.int64)])
        self._sort_tail()

    def flush(self, keep_below: int = 0) -> None:
        """Write the tail as a run once it holds TAIL_ROWS pairs (a writer, after a commit), and merge runs;
        a run from ``keep_below`` on merges only with runs past it too (a write in steps passes its first
        row: if it fails, its runs go without the committed ones). Never raises OSError: the write has
        committed, and a tail that cannot be written (a full disk) stays in memory."""
        if not self.writable:
            return
        try:
            if len(self._tail_rows) >= TAIL_ROWS:
                self._add_run(self._tail_hashes, self._tail_rows, max(int(self._tail_rows.max()) + 1, self.covered))
                self._tail_hashes, self._tail_rows = np.empty(0, np.uint64), np.empty(0, np.int64)
            self._merge(keep_below)
        except OSError:
            return

    def copy_runs(self, dest: Path, watermark: int) -> list[Path]:
        """The runs within ``watermark`` as files in ``dest`` (for a copy of the catalog made at the same
        point), written from this index's maps: whole even if a writer merged a run away since the load."""
        within = [run for run in self._runs if run.hi <= watermark]  # the chain: those past it come last
        return [self._write_run(run.lo, run.hi, _blocks(run), len(run.hashes), dest).path for run in within]

    def _sort_tail(self) -> None:
        order = np.argsort(self._tail_hashes, kind="stable")
        self._tail_hashes, self._tail_rows = self._tail_hashes[order], self._tail_rows[order]

    # -- runs on disk --------------------------------------------------------------------------------
    def _chain(self, watermark: int) -> list[_Run]:
        """The runs that follow each other from row 0 (the longest at each step); a writer deletes the rest."""
        runs = [run for run in (self._open_run(p) for p in self._run_files()) if run is not None]
        if self.writable:
            runs = [run for run in runs if run.hi <= watermark]
        chain: list[_Run] = []
        covered = 0
        for run in sorted(runs, key=lambda r: (r.lo, -r.hi)):
            if run.lo == covered and run.hi > covered:
                chain.append(run)
                covered = run.hi
        if self.writable:
            kept = {run.path for run in chain}
            for path in self._run_files():
                if path not in kept:
                    path.unlink(missing_ok=True)
            for tmp in self.folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
        return chain

    def _run_files(self) -> list[Path]:
        """The run files (a folder of that name is damage: left alone, as unlink could not remove it)."""
        return sorted(p for p in self.folder.glob("*.run") if not p.is_dir()) if self.folder.is_dir() else []

    def _open_run(self, path: Path, written: bool = False) -> _Run | None:
        """The run in ``path``, or None when it is unreadable, cut short, misnamed, of another hash or its pairs
        do not match their digest (``written``: just written from these pairs, so not hashed again)."""
        try:
            lo_text, hi_text = path.stem.split("-")
            header = np.fromfile(path, dtype=_HEADER, count=1)
            size = path.stat().st_size
        except (OSError, ValueError):
            return None
        if len(header) != 1:
            return None
        magic, guard, lo, hi, n, digest = header[0].tolist()
        if (magic, guard, lo, hi) != (_MAGIC, self.guard, int(lo_text), int(hi_text)) or size != _HEADER_BYTES + 16 * n:
            return None
        if n == 0:
            empty = np.empty(0, np.uint64)
            return _Run(path, lo, hi, empty, empty.astype(np.int64))
        try:
            body = np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER_BYTES, shape=(16 * n,))
        except (OSError, ValueError):
            return None
        hashes, rows = body[: 8 * n].view(np.uint64), body[8 * n :].view(np.int64)
        if not written and not _intact(body, bytes(digest), hashes, rows, lo, hi):
            return None  # a damaged run trusted hid stored ids, and let a second row take one
        return _Run(path, lo, hi, hashes, rows)

    def _add_run(self, hashes: np.ndarray, rows: np.ndarray, hi: int) -> None:
        """A run of the pairs of rows ``covered..hi`` (any order); nothing changes if it cannot be written."""
        order = np.argsort(hashes, kind="stable")
        self._runs.append(self._write_run(self.covered, hi, [(hashes[order], rows[order])], len(order)))
        self.covered = hi

    def _merge(self, keep_below: int = 0) -> None:
        """Merge the newest two runs while the newer is at least half the older and both start at or past
        ``keep_below`` (a merge that fails leaves both, which still cover their rows)."""
        runs = self._runs
        while len(runs) >= 2 and len(runs[-2].hashes) <= 2 * len(runs[-1].hashes) and runs[-2].lo >= keep_below:
            older, newer = runs[-2], runs[-1]
            runs[-2:] = [
                self._write_run(older.lo, newer.hi, _merged_blocks(older, newer), len(older.hashes) + len(newer.hashes))
            ]
            older.path.unlink(missing_ok=True)
            newer.path.unlink(missing_ok=True)

    def _write_run(
        self, lo: int, hi: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]], n: int, folder: Path | None = None
    ) -> _Run:
        """Write ``n`` pairs, given as sorted blocks of (hashes, rows), to the run file of rows ``lo..hi`` in
        ``folder`` (default: this index's)."""
        folder = folder or self.folder
        folder.mkdir(exist_ok=True)
        path = folder / f"{lo:013d}-{hi:013d}.run"
        tmp = folder / f".{path.name}.tmp-{os.getpid()}"
        header = np.zeros(1, _HEADER)
        header[0] = (_MAGIC, self.guard, lo, hi, n, bytes(16))
        try:
            _write_run_file(tmp, header, blocks, n)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk: what it took goes now, not at the next writer's load
            raise
        os.replace(tmp, path)
        run = self._open_run(path, written=True)
        if run is None:
            raise OSError(f"the id run {path} just written does not read back")
        return run


def _write_run_file(tmp: Path, header: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], n: int) -> None:
    """The run file at ``tmp``: ``header`` (its digest filled in here), then the ``n`` hashes, then their rows,
    fsynced."""
    with open(tmp, "wb") as f:
        f.write(header.tobytes().ljust(_HEADER_BYTES, b"\0"))
        f.flush()
        _reserve(f, _HEADER_BYTES + 16 * n)
    if n:
        out = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=_HEADER_BYTES, shape=(16 * n,))
        out_hashes, out_rows = out[: 8 * n].view(np.uint64), out[8 * n :].view(np.int64)
        at = 0
        for hashes, rows in blocks:
            out_hashes[at : at + len(hashes)] = hashes
            out_rows[at : at + len(rows)] = rows
            at += len(hashes)
        header[0]["digest"] = _digest(out)
        out.flush()
        del out, out_hashes, out_rows
        with open(tmp, "r+b") as f:
            f.write(header.tobytes())
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # a run renamed into place is whole, even after a power cut
    finally:
        os.close(fd)


def _reserve(f: BinaryIO, size: int) -> None:
    """The file ``f`` grown to ``size`` bytes with its disk space taken now: a full disk is an OSError here,
    where a sparse file made a memory map's first write past the free space kill the process (SIGBUS). Where
    the system cannot (no posix_fallocate, or a file system refusing it), sparse, as before."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except AttributeError:
        f.truncate(size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        f.truncate(size)


def _digest(body: np.ndarray) -> bytes:
    """CRC-32 of the pairs plus one (never zero: zeros mark runs written before digests), 16 bytes. Damage,
    not an adversary, is what it catches: 4x faster than BLAKE2b (68 ms against 263 for 8M pairs)."""
    return (zlib.crc32(body.data) + 1).to_bytes(8, "little") + bytes(8)


def _intact(body: np.ndarray, digest: bytes, hashes: np.ndarray, rows: np.ndarray, lo: int, hi: int) -> bool:
    """Whether a run's pairs are as written: their digest, or for a run written before digests (zeros),
    hashes in order and rows within ``lo..hi``."""
    if any(digest):
        return _digest(body) == digest
    ordered = bool(np.all(hashes[1:] >= hashes[:-1]))
    return ordered and (len(rows) == 0 or (int(rows.min()) >= lo and int(rows.max()) < hi))


def _matches(
    stored: np.ndarray, rows: np.ndarray, wanted: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of (``stored``, ``rows``) whose hash is in ``wanted`` (sorted; ``order`` maps its positions back)."""
    left = np.searchsorted(stored, wanted, "left")
    counts = np.searchsorted(stored, wanted, "right") - left
    if not counts.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    hit = counts > 0
    left, counts = left[hit], counts[hit]
    starts = np.repeat(left - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    at = starts + np.arange(int(counts.sum()))
    return np.repeat(order[hit], counts).astype(np.int64), np.asarray(rows[at], dtype=np.int64)


def _blocks(run: _Run) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A run's pairs, MERGE_BLOCK at a time (bounded memory)."""
    for at in range(0, len(run.hashes), MERGE_BLOCK):
        yield np.asarray(run.hashes[at : at + MERGE_BLOCK]), np.asarray(run.rows[at : at + MERGE_BLOCK])


def _merged_blocks(older: _Run, newer: _Run) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs of two runs in hash order, MERGE_BLOCK pairs of each at a time."""
    a, b = older, newer
    ia = ib = 0
    na, nb = len(a.hashes), len(b.hashes)
    while ia < na or ib < nb:
        ea, eb = min(na, ia + MERGE_BLOCK), min(nb, ib + MERGE_BLOCK)
        lasts = [a.hashes[ea - 1]] if ea < na else []
        lasts += [b.hashes[eb - 1]] if eb < nb else []
        if lasts:  # both sides up to the same hash, so every later pair sorts after this block
            cut = min(lasts)
            ea = ia + int(np.searchsorted(a.hashes[ia:ea], cut, "right"))
            eb = ib + int(np.searchsorted(b.hashes[ib:eb], cut, "right"))
        hashes = np.concatenate([a.hashes[ia:ea], b.hashes[ib:eb]])
        rows = np.concatenate([a.rows[ia:ea], b.rows[ib:eb]])
        order = np.argsort(hashes, kind="stable")
        yield hashes[order], rows[order]
        ia, ib = ea, eb
