"""The disk tier: one Zarr v3 array per dimension band, read and appended through a fast path.

zarr-python creates the arrays; after that this module reads and writes the chunk files itself. That is
safe because the layout is pinned and checked on open: regular chunks spanning the whole band width, no
compression, little-endian ``bytes`` codec, default "/" chunk keys. Two layouts of a chunk file ``c/<i>/0``:

- sharded (format 3): Zarr's ``sharding_indexed`` codec with the shard index at the start, padded to whole
  pages, then the rows in order, one inner chunk of ``inner_rows`` rows after another. Row ``r`` lives at
  byte ``data_offset + (r % chunk_rows) * width * itemsize``. The file grows with its rows (its capacity
  doubles, in inner chunks, up to the whole chunk), and the index lists the inner chunks that hold rows,
  so any Zarr v3 reader reads exactly what was written while the file stays about the size of its data;
- plain (formats 1 and 2): the ``bytes`` codec, the file created full-size and sparse, ``data_offset`` 0.

Either way a read is a memory-map gather instead of zarr's decode pipeline (orders of magnitude faster
for a few hundred scattered rows). A file that grew is mapped again when rows past its old map are
needed; the old map stays alive until the store closes (queries in flight may hold it), so a chunk is
mapped at most about log2(inner chunks per chunk) times.

Appends write in place, only into rows past the committed watermark. A torn write therefore cannot damage
committed bytes; rows past the watermark are invisible until the catalog commits them.

Beside the bands, ``row_norms`` holds each row's squared norm per band (float32, one column per band),
written with the row: the re-rank bounds a row's unread columns with them and skips rows that cannot make
the top k (the results are the same as reading every row). Stores made before it existed have none.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrlstore._fsutil import atomic_write_bytes, fsync_dir, fsync_file, pwrite_all
from mrlstore.errors import CorruptStoreError, StoreClosedError, storage_error
from mrlstore.kernels import as_float32
from mrlstore.tiers.abc import RowGather

MapOf = Callable[[int, int], np.ndarray]  # (chunk, rows it must cover) -> that chunk's map
BlocksOf = Callable[[np.ndarray, int, int], list[tuple[int, np.ndarray]]]  # sorted rows, columns -> band blocks

GROUP_DIR = "vectors"
NORMS_ARRAY = "row_norms"
NORM_DTYPE = np.dtype("<f4")
NORM_BLOCK_ROWS = 2048  # rows widened at a time while computing norms (bounded memory)
TARGET_CHUNK_BYTES = 64 << 20
INNER_CHUNK_BYTES = 64 << 10  # a sharded chunk file grows by whole inner chunks of about this size
PAGE = 4096
EMPTY = np.uint64(2**64 - 1)  # a shard index entry for an inner chunk that holds nothing
WRITE_BUFFER_BYTES = 4 << 20  # rows pass through one reused buffer on their way to the chunk files
# A sorted row list of at least DENSE_READ_ROWS rows over a span under DENSE_READ_SPAN rows per row is read
# ahead whole (an export's or a compaction's rows); a query's shortlist is far sparser and reads as it comes
DENSE_READ_ROWS, DENSE_READ_SPAN = 64, 4
# The kernel reads at most max(read_ahead_kb, max_sectors_kb) of one MADV_WILLNEED: ask in pieces that
# every disk's default (128 KiB) covers
READ_AHEAD_PIECE = 128 << 10
_DTYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def band_edges(dim: int, bands: tuple[int, ...]) -> list[tuple[int, int]]:
    edges = [0, *bands]
    return [(edges[i], edges[i + 1]) for i in range(len(bands))]


def band_name(start: int, stop: int) -> str:
    return f"band_{start:05d}_{stop:05d}"


def auto_chunk_rows(width: int, dtype: str) -> int:
    """Rows per chunk so that one chunk file is about TARGET_CHUNK_BYTES (a power of two, 1k to 1M)."""
    rows = TARGET_CHUNK_BYTES // (width * _DTYPES[dtype].itemsize)
    rows = 1 << max(10, min(20, int(rows).bit_length() - 1))
    return rows


def inner_rows_for(width: int, itemsize: int, chunk_rows: int) -> int:
    """Rows per inner chunk of a sharded chunk file: Zarr needs a divisor of ``chunk_rows``; the largest one
    of at most INNER_CHUNK_BYTES (a power of two for the default chunk sizes), unless that is tiny (a
    ``chunk_rows=`` with few factors), then the smallest of at least a sixteenth of it: tiny inner chunks
    make Zarr readers slow and the index large."""
    row_bytes = width * itemsize
    small = [i for i in range(1, int(chunk_rows**0.5) + 1) if chunk_rows % i == 0]
    divisors = sorted({*small, *(chunk_rows // i for i in small)})
    fitting = [d for d in divisors if d * row_bytes <= INNER_CHUNK_BYTES]
    if fitting and fitting[-1] * row_bytes * 16 >= INNER_CHUNK_BYTES:
        return fitting[-1]
    return next(d for d in divisors if d * row_bytes * 16 >= INNER_CHUNK_BYTES or d == chunk_rows)


def create_bands(
    path: Path, dim: int, bands: tuple[int, ...], dtype: str, chunk_rows: list[int], attributes: dict,
    sharded: bool = True,
) -> None:  # fmt: skip
    """Create the empty Zarr v3 group and its band arrays with zarr-python itself (``sharded=False``: the
    plain layout of formats 1 and 2)."""
    import zarr  # slow to import; only needed when a store is created

    group = zarr.create_group(store=str(path / GROUP_DIR), zarr_format=3, attributes=attributes)
    arrays = [(band_name(a, b), b - a, rows, dtype) for (a, b), rows in zip(band_edges(dim, bands), chunk_rows)]
    # row_norms: chunks as small as the smallest band's (a norm row is 16-ish bytes)
    arrays.append((NORMS_ARRAY, len(bands), min(chunk_rows), "float32"))
    for name, width, rows, kind in arrays:
        group.create_array(
            name, shape=(0, width), chunks=(rows, width), dtype=kind, compressors=None, filters=None, fill_value=0,
            serializer=_sharding(width, np.dtype(kind).itemsize, rows) if sharded else "auto",
        )  # fmt: skip


def _sharding(width: int, itemsize: int, chunk_rows: int) -> Any:
    from zarr.codecs import BytesCodec, ShardingCodec

    inner = inner_rows_for(width, itemsize, chunk_rows)
    return ShardingCodec(
        chunk_shape=(inner, width), codecs=[BytesCodec()], index_codecs=[BytesCodec()], index_location="start"
    )


def band_norms(vectors: np.ndarray, edges: list[tuple[int, int]], dtype: np.dtype) -> np.ndarray:
    """Squared norm of each row's columns in each band (n x bands, float32), from the values as stored in
    ``dtype`` (the re-rank's bounds hold only for the stored values)."""
    out = np.empty((len(vectors), len(edges)), dtype=NORM_DTYPE)
    for lo in range(0, len(vectors), NORM_BLOCK_ROWS):
        block = vectors[lo : lo + NORM_BLOCK_ROWS]
        for j, (a, b) in enumerate(edges):
            x = as_float32(np.ascontiguousarray(block[:, a:b], dtype=dtype))
            out[lo : lo + len(block), j] = np.einsum("ij,ij->i", x, x)
    return out


class _Band:
    def __init__(self, root: Path, start: int, stop: int, dtype: np.dtype, name: str | None = None):
        self.start, self.stop, self.width = start, stop, stop - start
        self.dir = root / (name or band_name(start, stop))
        self.dtype = dtype
        meta_path = self.dir / "zarr.json"
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CorruptStoreError(f"missing Zarr array metadata {meta_path}") from None
        except (OSError, ValueError) as e:
            raise CorruptStoreError(f"unreadable Zarr array metadata {meta_path}: {e}") from None
        self.row_bytes = self.width * dtype.itemsize
        self.chunk_rows, inner_rows = self._check_layout(meta_path)
        self.chunk_bytes = self.chunk_rows * self.row_bytes
        self.sharded = inner_rows is not None
        self.inner_rows = inner_rows or 0  # 0: the plain layout
        self.n_inner = self.chunk_rows // self.inner_rows if self.sharded else 0
        self.inner_bytes = self.inner_rows * self.row_bytes
        self.data_offset = -(-16 * self.n_inner // PAGE) * PAGE  # the index, padded to whole pages
        self.label = name or f"band {start}-{stop}"  # in messages
        self._maps: dict[int, Any] = {}
        self._retired: list[Any] = []  # maps replaced by larger ones: queries in flight may still read them
        # (rows covered, chunk base addresses) for the kernels: replaced whole, read once per query
        self._kernel: tuple[int, np.ndarray] = (0, np.zeros(0, dtype=np.uint64))
        self._map_lock = threading.RLock()  # maps change under it: a replaced map must reach _retired
        self._closed = False  # then its path may hold another store's file (a compaction swapped folders)
        # Queries read scattered rows: a fault reads one page, not read_ahead_kb (8 MiB here). Sequential
        # readers say what they read next (read_ahead; the scan kernel does the same)
        self.random_access = True
        self.rows_held = 0  # rows the store reads at open and keeps mapped (BandedVectors plans them)

    def _check_layout(self, meta_path: Path) -> tuple[int, int | None]:
        """(chunk_rows, inner_rows or None for the plain layout), or CorruptStoreError."""
        m = self.meta
        try:
            chunk_shape = m["chunk_grid"]["configuration"]["chunk_shape"]
            ok = (
                m["zarr_format"] == 3
                and m["node_type"] == "array"
                and m["data_type"] == self.dtype.name
                and m["shape"][1] == self.width
                and m["chunk_grid"]["name"] == "regular"
                and chunk_shape[1] == self.width
                and m["chunk_key_encoding"]["name"] == "default"
                and m["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
                and not m.get("storage_transformers")
            )
            inner = _inner_rows(m["codecs"], self.width, int(chunk_shape[0])) if ok else False
        except (KeyError, IndexError, TypeError, ValueError):
            ok, inner = False, False
        if not ok or inner is False:
            raise CorruptStoreError(f"{meta_path} does not describe the band layout mrlstore writes")
        return int(chunk_shape[0]), inner

    @property
    def shape_rows(self) -> int:
        return int(self.meta["shape"][0])

    def chunk_path(self, chunk: int) -> Path:
        return self.dir / "c" / str(chunk) / "0"

    def file_rows(self, size: int) -> int:
        """Rows a chunk file of ``size`` bytes can hold."""
        return min(self.chunk_rows, max(0, size - self.data_offset) // self.row_bytes)

    def mapped(self, chunk: int, rows: int = 1) -> np.ndarray:
        """The rows of chunk ``chunk`` as an array (rows x width, stored dtype) mapping at least its first
        ``rows`` rows; mapped again if the file grew past the current map."""
        mm = self._maps.get(chunk)
        if mm is not None and len(mm) >= rows:
            return mm
        with self._map_lock:  # two threads may both find the map short: one maps, the other reuses it
            return self._map_again(chunk, rows)

    def _map_again(self, chunk: int, rows: int) -> np.ndarray:
        mm = self._maps.get(chunk)
        if mm is not None and len(mm) >= rows:
            return mm
        self.check_open()
        size, problem = self._size_problem(chunk, rows)
        if problem is not None:
            raise CorruptStoreError(problem)
        # A plain ndarray view (the map stays alive as its base): np.memmap's indexing hooks cost more than
        # the gather itself on the re-rank path.
        shape, path = (self.file_rows(size), self.width), self.chunk_path(chunk)
        try:
            mapping = np.memmap(path, dtype=self.dtype, mode="r", offset=self.data_offset, shape=shape)
        except OSError as e:  # a file this user may not read
            raise storage_error("read", path, e) from None
        if self.random_access and hasattr(mmap, "MADV_RANDOM"):
            _advise(mapping, mmap.MADV_RANDOM, 0, mapping.nbytes)
        if mm is not None:
            self._retired.append(mm)
        self._maps[chunk] = fresh = mapping.view(np.ndarray)
        return fresh

    def read_ahead(self, row_start: int, row_stop: int, mapped: MapOf | None = None) -> None:
        """Start reading rows ``row_start:row_stop`` (mapped) into the page cache without waiting: the
        maps advise random access, so a sequential reader would otherwise fault one page at a time (a cold
        exact scan of 262k rows of the 2048-wide band: 14.4 s that way against 1.9 s, benchmarks/cold_scan.py).
        ``mapped``: where the chunks' maps come from (default: this band's, mapped as needed)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        rc, mapped = self.chunk_rows, mapped or self.mapped
        for chunk in range(row_start // rc, -(-row_stop // rc)):
            lo, hi = max(row_start, chunk * rc) - chunk * rc, min(row_stop, (chunk + 1) * rc) - chunk * rc
            mapping = mapped(chunk, hi)
            if not isinstance(mapping, np.ndarray):
                continue  # rows elsewhere (object storage), not in a file's map
            for a in range(lo * self.row_bytes, hi * self.row_bytes, READ_AHEAD_PIECE):
                _advise(mapping, mmap.MADV_WILLNEED, a, min(a + READ_AHEAD_PIECE, hi * self.row_bytes))

    def read_in(self, chunk: int, lo: int, hi: int, step: int) -> None:
        """Read rows ``lo:hi`` of chunk ``chunk`` and map their pages, touching one value in ``step``: with the
        kernel's read-around for the time of the read, then random access again. Read-around brings large
        folios, which the kernel maps 2 MiB at a time (after a cold open of a 1M-row store, 1,042 MiB of its
        rows were mapped so, against none when read with MADV_WILLNEED): fewer TLB misses when scanned."""
        mapping = self.mapped(chunk, hi)
        advise = self.random_access and hasattr(mmap, "MADV_RANDOM")
        if advise:
            _advise(mapping, mmap.MADV_NORMAL, lo * self.row_bytes, hi * self.row_bytes)
        mapping[lo:hi].reshape(-1)[::step].max()
        if advise:
            _advise(mapping, mmap.MADV_RANDOM, lo * self.row_bytes, hi * self.row_bytes)
            # Some pages come out unmapped (at 12M rows, 50 MiB; likely large folios mapped across the split that
            # advice on part of a map makes): map them again, from memory, or drop_caches would take them
            mapping[lo:hi].reshape(-1)[::step].max()

    def take_sorted(self, rows: np.ndarray, mapped: MapOf | None = None) -> np.ndarray:
        """Rows ``rows`` (sorted) of the whole band, in the stored dtype, gathered chunk by chunk from the maps
        (``mapped``: as ``read_ahead``)."""
        rc, mapped = self.chunk_rows, mapped or self.mapped
        dense = len(rows) >= DENSE_READ_ROWS and rows[-1] - rows[0] < DENSE_READ_SPAN * len(rows)
        if dense and rows[-1] >= self.rows_held:  # rows held are in memory: asking for them costs a page walk
            self.read_ahead(max(int(rows[0]), self.rows_held), int(rows[-1]) + 1, mapped)  # most pages are read anyway
        chunk_of = rows // rc
        first, last = int(chunk_of[0]), int(chunk_of[-1])
        if first == last:
            return mapped(first, int(rows[-1]) - first * rc + 1)[rows - first * rc]
        block = np.empty((len(rows), self.width), dtype=self.dtype)
        bounds = [0, *np.searchsorted(chunk_of, np.arange(first + 1, last + 1)).tolist(), len(rows)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a < b:
                chunk = int(chunk_of[a])
                block[a:b] = mapped(chunk, int(rows[b - 1]) - chunk * rc + 1)[rows[a:b] - chunk * rc]
        return block

    def maps_now(self, rows: int) -> list[np.ndarray]:
        """The maps of the chunks of the first ``rows`` rows, as they are now."""
        rc = self.chunk_rows
        return [self.mapped(c, min(rc, rows - c * rc)) for c in range(-(-rows // rc))]

    def kernel_band(self, rows_needed: int) -> tuple:
        """(chunk base addresses, chunk_rows, first column, width, is_float16) for the native kernels,
        covering at least ``rows_needed`` rows. The maps stay alive while the store is open."""
        return self.kernel_described(rows_needed)[0]

    def kernel_described(self, rows_needed: int) -> tuple[tuple, int]:
        """``kernel_band(rows_needed)`` and the rows its addresses cover (read together: one snapshot)."""
        covered, addresses = self._kernel
        if covered < rows_needed:
            with self._map_lock:
                rc, need = self.chunk_rows, -(-rows_needed // self.chunk_rows)
                maps = [self.mapped(c, min(rc, rows_needed - c * rc)) for c in range(need)]
                addresses = np.array([mm.ctypes.data for mm in maps], dtype=np.uint64)
                covered = (need - 1) * rc + len(maps[-1])
                self._kernel = (covered, addresses)  # replaced whole: a concurrent reader keeps its copy
        return (addresses, self.chunk_rows, self.start, self.width, int(self.dtype.itemsize == 2)), covered

    def check_open(self) -> None:
        """StoreClosedError once closed: a compaction or refresh replaced the files while a read went on."""
        if self._closed:
            raise StoreClosedError(
                f"{self.label} of {self.dir.parent.parent} was closed (a compaction or refresh replaced the store's "
                "files) while a read of it went on: read again"
            )

    def release_retired(self) -> None:
        """Drop the replaced maps, and the kernels' description, which may still hold their addresses (no
        read in flight uses either: see ``BandedVectors.release_retired``)."""
        with self._map_lock:
            if self._retired:
                self._kernel = (0, np.zeros(0, dtype=np.uint64))  # first: an interrupt next leaves no stale address
                self._retired.clear()

    @property
    def has_retired(self) -> bool:
        return bool(self._retired)

    def forget_maps(self, from_chunk: int = 0) -> None:
        """Map chunks at or past ``from_chunk`` again when next read (their files changed size)."""
        with self._map_lock:
            for chunk in [c for c in self._maps if c >= from_chunk]:
                self._retired.append(self._maps.pop(chunk))
            covered, addresses = self._kernel
            keep = min(len(addresses), from_chunk)
            self._kernel = (min(covered, keep * self.chunk_rows), addresses[:keep])

    def write(self, start_row: int, block: np.ndarray, scratch: np.ndarray, sized: bool = True) -> list[Path]:
        """Write rows ``start_row..`` in place (``scratch``: a reused 1-D buffer of the band's dtype);
        returns the files touched (not yet fsynced). ``sized=False`` writes the rows alone, leaving the file's
        size and shard index to ``settle`` (workers writing one file side by side must not resize it)."""
        touched = []
        row, end = start_row, start_row + len(block)
        while row < end:
            chunk, offset = divmod(row, self.chunk_rows)
            n = min(end - row, self.chunk_rows - offset)
            path = self.chunk_path(chunk)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                touched += [path.parent, path.parent.parent, self.dir]  # new entries need their dirs synced
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if sized:
                    self._size(fd, offset + n)
                self._pwrite_rows(fd, offset, block[row - start_row : row - start_row + n], scratch)
            finally:
                os.close(fd)
            touched.append(path)
            row += n
        return touched

    def _size(self, fd: int, rows: int) -> None:
        if self.sharded:
            self._grow(fd, rows)
        elif os.fstat(fd).st_size < self.chunk_bytes:
            os.ftruncate(fd, self.chunk_bytes)  # the plain layout: full-size chunk files

    def settle(self, chunk: int, rows: int) -> list[Path]:
        """Size and index chunk file ``chunk`` for its first ``rows`` rows after ``write(sized=False)`` put
        them there; returns it and its folders (not yet fsynced: the worker that made it may have died
        before it synced them)."""
        path = self.chunk_path(chunk)
        fd = os.open(path, os.O_RDWR)
        try:
            self._size(fd, rows)
        finally:
            os.close(fd)
        return [path, path.parent, path.parent.parent, self.dir]

    def read_written(self, row: int, n: int) -> np.ndarray:
        """Rows ``row..row+n`` (within one chunk) as written, uncommitted ones included, read from the file."""
        chunk, offset = divmod(row, self.chunk_rows)
        want = n * self.row_bytes
        try:
            fd = os.open(self.chunk_path(chunk), os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptStoreError(f"chunk file {self.chunk_path(chunk)} of written rows is missing") from None
        try:
            data = os.pread(fd, want, self.data_offset + offset * self.row_bytes)
        finally:
            os.close(fd)
        if len(data) != want:
            raise CorruptStoreError(f"chunk file {self.chunk_path(chunk)} ends before rows {row}..{row + n}")
        return np.frombuffer(data, dtype=self.dtype).reshape(n, self.width)

    def _grow(self, fd: int, rows: int) -> None:
        """A sharded chunk file ready for its first ``rows`` rows: capacity doubled (in inner chunks) if
        short, and the index listing every inner chunk up to them."""
        size = os.fstat(fd).st_size
        if size < self.data_offset:  # a new file: an index of empty entries
            pwrite_all(fd, np.full(2 * self.n_inner, EMPTY, dtype="<u8").tobytes(), 0)
            size = self.data_offset
        have = (size - self.data_offset) // self.inner_bytes
        need = -(-rows // self.inner_rows)
        if need > have:
            os.ftruncate(fd, self.data_offset + min(self.n_inner, max(need, 2 * have)) * self.inner_bytes)
        self._set_index(fd, need)

    def _set_index(self, fd: int, present: int) -> None:
        """List inner chunks ``0..present-1`` in the shard index and no others (only changed entries are
        written)."""
        index = np.frombuffer(os.pread(fd, 16 * self.n_inner, 0), dtype="<u8").reshape(-1, 2)
        want = self._wanted_index(present)
        changed = np.flatnonzero((index != want).any(axis=1))
        if len(changed):
            lo, hi = int(changed[0]), int(changed[-1]) + 1
            pwrite_all(fd, want[lo:hi].tobytes(), 16 * lo)

    def _wanted_index(self, present: int) -> np.ndarray:
        """The shard index listing inner chunks ``0..present-1`` at their places, the rest empty."""
        index = np.full((self.n_inner, 2), EMPTY, dtype="<u8")
        index[:present, 0] = self.data_offset + np.arange(present, dtype=np.uint64) * np.uint64(self.inner_bytes)
        index[:present, 1] = self.inner_bytes
        return index

    def index_problems(self, chunk: int, rows: int) -> list[str]:
        """Inner chunks holding the first ``rows`` rows of a sharded chunk file that its index does not list
        where they are (a Zarr reader would see zeros or other rows)."""
        path = self.chunk_path(chunk)
        with open(path, "rb") as f:
            index = np.frombuffer(f.read(16 * self.n_inner), dtype="<u8").reshape(-1, 2)
        need = -(-rows // self.inner_rows)
        wrong = np.flatnonzero((index[:need] != self._wanted_index(need)[:need]).any(axis=1))
        if not len(wrong):
            return []
        return [f"the shard index of {path} misplaces {len(wrong)} inner chunk(s) of committed rows, e.g. {wrong[0]}"]

    def _pwrite_rows(self, fd: int, offset: int, rows: np.ndarray, scratch: np.ndarray) -> None:
        """Write ``rows`` at row ``offset`` of a chunk file, through a reused contiguous buffer: a fresh
        temporary per batch costs more in page faults than the copy itself (measured: 507 ms to copy
        65,536 rows of the widest band into a new array, 17 ms into one already touched)."""
        step = max(1, len(scratch) // self.width)
        for lo in range(0, len(rows), step):
            part = rows[lo : lo + step]
            if part.dtype == self.dtype and part.flags.c_contiguous:
                data = part
            else:
                data = scratch[: len(part) * self.width].reshape(len(part), self.width)
                np.copyto(data, part, casting="same_kind")
            pwrite_all(fd, data.data, self.data_offset + (offset + lo) * self.row_bytes)

    def file_problems(self, watermark: int) -> list[str]:
        """What is wrong with this array's files for ``watermark`` committed rows, read from disk now (the
        open maps would hide a lost file)."""
        found = []
        try:
            rows = int(json.loads((self.dir / "zarr.json").read_text())["shape"][0])
            if rows < watermark:
                found.append(f"{self.label} records {rows} rows but {watermark} are committed")
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            found.append(f"{self.label}: unreadable Zarr metadata ({e})")
        for chunk in range(-(-watermark // self.chunk_rows)):
            found += self.chunk_problems(chunk, min(self.chunk_rows, watermark - chunk * self.chunk_rows))
        return found

    def chunk_problems(self, chunk: int, rows: int) -> list[str]:
        """A chunk file holding ``rows`` committed rows that is missing, too short or (sharded) misindexed."""
        _, problem = self._size_problem(chunk, rows)
        if problem is not None:
            return [problem]
        if not os.access(self.chunk_path(chunk), os.R_OK):
            return [f"chunk file {self.chunk_path(chunk)} holding committed rows cannot be read (permission denied)"]
        return self.index_problems(chunk, rows) if self.sharded else []

    def _size_problem(self, chunk: int, rows: int) -> tuple[int, str | None]:
        """The size of chunk file ``chunk`` and, if it cannot hold its first ``rows`` rows (missing, short,
        or a plain one not full-size), what is wrong with it."""
        path = self.chunk_path(chunk)
        try:
            info = path.stat()
        except FileNotFoundError:
            return -1, f"chunk file {path} holding committed rows is missing"
        if not stat.S_ISREG(info.st_mode):
            return -1, f"chunk file {path} holding committed rows is not a file"
        size = info.st_size
        if not self.sharded and size != self.chunk_bytes:
            return size, f"chunk file {path} has {size} bytes, expected {self.chunk_bytes}"
        if self.file_rows(size) < rows:
            need = self.data_offset + rows * self.row_bytes
            return size, f"chunk file {path} has {size} bytes, expected at least {need} for its {rows} committed rows"
        return size, None

    def plain_meta(self, rows: int) -> dict:
        """This array's metadata as the plain layout with ``rows`` rows (what object storage holds: each
        chunk's rows, without a shard index)."""
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
        return dict(self.meta, shape=[rows, self.width], codecs=codecs)

    def set_shape_rows(self, rows: int) -> None:
        if self.shape_rows != rows:
            meta = dict(self.meta, shape=[rows, self.width])
            atomic_write_bytes(self.dir / "zarr.json", json.dumps(meta, indent=2).encode())
            self.meta = meta

    def discard_from(self, first_row: int) -> None:
        """Erase rows at or past ``first_row`` (never committed): in a partly committed chunk, zero them
        (sharded: cut the file after the inner chunk holding ``first_row``, zero the rest of that inner
        chunk, unlist the inner chunks after it); delete chunk files that lie wholly past it."""
        chunk, offset = divmod(first_row, self.chunk_rows)
        path = self.chunk_path(chunk)
        if offset and path.exists():
            self.forget_maps(chunk)
            fd = os.open(path, os.O_RDWR)
            try:
                stop = self.chunk_rows
                if self.sharded:
                    keep = -(-offset // self.inner_rows)
                    stop = min(keep * self.inner_rows, self.file_rows(os.fstat(fd).st_size))
                    self._set_index(fd, keep)
                    os.ftruncate(fd, min(os.fstat(fd).st_size, self.data_offset + keep * self.inner_bytes))
                if stop > offset:
                    pwrite_all(fd, bytes((stop - offset) * self.row_bytes), self.data_offset + offset * self.row_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.drop_chunks_from(-(-first_row // self.chunk_rows))

    def drop_chunks_from(self, first_chunk: int) -> None:
        """Delete the chunk files from ``first_chunk`` on."""
        cdir = self.dir / "c"
        if not cdir.exists():
            return
        self.forget_maps(first_chunk)
        for child in cdir.iterdir():
            if child.name.isdigit() and int(child.name) >= first_chunk:
                for f in child.iterdir():
                    f.unlink()
                child.rmdir()

    def close(self) -> None:
        with self._map_lock:
            self._closed = True
            self._kernel = (0, np.zeros(0, dtype=np.uint64))
            self._maps.clear()
            self._retired.clear()


class _FrozenRows:
    """Rows read through a fixed set of chunk maps (``BandedVectors.frozen``)."""

    def __init__(self, maps: dict[_Band, list[np.ndarray]], rows: int, columns: int):
        self._maps, self.rows, self.columns = maps, rows, columns  # only the bands of those columns: held

    def gather(self, rows: np.ndarray, col_start: int, col_stop: int) -> np.ndarray:
        return _gather_in_order(self._blocks, rows, col_start, col_stop)

    def _blocks(self, rows: np.ndarray, col_start: int, col_stop: int) -> list[tuple[int, np.ndarray]]:
        def take(band: _Band, rows: np.ndarray) -> np.ndarray:
            maps = self._maps[band]
            return band.take_sorted(rows, lambda chunk, _: maps[chunk])

        if (len(rows) and rows[-1] >= self.rows) or col_stop > self.columns:
            raise IndexError(f"rows up to {self.rows} and columns up to {self.columns} are read through these maps")
        return _band_blocks(list(self._maps), take, rows, col_start, col_stop)


def _gather_in_order(blocks_of: BlocksOf, rows: np.ndarray, col_start: int, col_stop: int) -> np.ndarray:
    """Rows in any order through ``blocks_of`` (which reads sorted rows band by band), as float32."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), col_stop - col_start), dtype=np.float32)
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    col = col_start
    for stop, block in blocks_of(rows[order], col_start, col_stop):
        out[order, col - col_start : stop - col_start] = as_float32(block)
        col = stop
    return out


def _band_blocks(
    bands: Sequence[_Band],
    take: Callable[[_Band, np.ndarray], np.ndarray],
    rows: np.ndarray,
    col_start: int,
    col_stop: int,
) -> list[tuple[int, np.ndarray]]:
    """Columns ``col_start:col_stop`` of sorted ``rows``, one block per band (``take`` reads a band's rows
    whole) in the stored dtype, each paired with its last column + 1."""
    blocks = []
    for band in bands:
        lo, hi = max(col_start, band.start), min(col_stop, band.stop)
        if lo >= hi:
            continue
        block = take(band, rows)
        if lo > band.start or hi < band.stop:
            block = block[:, lo - band.start : hi - band.start]
        blocks.append((hi, block))
    return blocks


def _fsync_each(paths: list[Path]) -> None:
    """fsync every file and folder in ``paths`` once."""
    for p in dict.fromkeys(paths):
        if p.is_dir():
            fsync_dir(p)
        else:
            fsync_file(p)


def _inner_rows(codecs: list[dict], width: int, chunk_rows: int) -> int | None | bool:
    """None for the plain layout (the ``bytes`` codec), the inner chunk's rows for the sharded one, False
    for anything else."""

    def little_bytes(chain: list[dict]) -> bool:
        return [c["name"] for c in chain] == ["bytes"] and chain[0].get("configuration", {}).get(
            "endian", "little") == "little"  # fmt: skip

    if little_bytes(codecs):
        return None
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return False
    cfg = codecs[0]["configuration"]
    inner, inner_width = (int(v) for v in cfg["chunk_shape"])
    ok = (
        cfg.get("index_location") == "start"
        and little_bytes(cfg["codecs"])
        and little_bytes(cfg["index_codecs"])
        and inner_width == width
        and 0 < inner <= chunk_rows
        and chunk_rows % inner == 0
    )
    return inner if ok else False


def _advise(mapping: Any, advice: int, from_byte: int, to_byte: int) -> None:
    """madvise bytes ``from_byte:to_byte`` of the array ``mapping`` (a map of a chunk file), widened to
    whole pages; a hint, so its failure costs only speed."""
    array: Any = mapping if hasattr(mapping, "_mmap") else mapping.base  # an np.memmap, or a view of one
    raw = array._mmap  # the map starts at a page boundary, the array after it
    ahead = len(raw) - array.nbytes
    start = (ahead + from_byte) // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min(len(raw), ahead + to_byte)
    if start < stop:
        try:
            raw.madvise(advice, start, stop - start)
        except OSError:
            pass


def _resident_budget() -> int:
    """Bytes of rows a store reads at open and keeps mapped: a quarter of RAM."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    return ram // 4


def resident_rows(rows: int, row_bytes: Sequence[int], budget: int) -> list[int]:
    """Rows of each array (of ``row_bytes`` bytes a row) that a store of ``rows`` rows holds in memory
    within ``budget`` bytes: the narrowest arrays whole first, so the funnel's early stages never wait
    for the disk and only the widest band's rows, re-ranked a few per query, are read cold."""
    held = [0] * len(row_bytes)
    for i in sorted(range(len(row_bytes)), key=lambda i: row_bytes[i]):
        held[i] = min(rows, budget // row_bytes[i])
        budget -= held[i] * row_bytes[i]
    return held


def _group_problems(root: Path) -> list[str]:
    """What keeps Zarr v3 readers from opening the bands' group (the store itself does not read it)."""
    try:
        meta = json.loads((root / "zarr.json").read_text())
    except (OSError, ValueError) as e:
        return [f"the Zarr group metadata {root / 'zarr.json'} is unreadable ({e}): Zarr readers cannot open it"]
    if not isinstance(meta, dict) or (meta.get("zarr_format"), meta.get("node_type")) != (3, "group"):
        return [f"{root / 'zarr.json'} is not Zarr v3 group metadata: Zarr readers cannot open the group"]
    return []


class BandedVectors:
    """Reads and appends rows of a store's Zarr band arrays."""

    def __init__(self, path: Path, dim: int, bands: tuple[int, ...], dtype: str):
        self.root = Path(path) / GROUP_DIR
        if not (self.root / "zarr.json").exists():
            raise CorruptStoreError(f"missing Zarr group {self.root}")
        self.dim = dim
        self.dtype = _DTYPES[dtype]
        self.edges = band_edges(dim, bands)
        self.band_bounds = (0, *bands)  # band b spans columns band_bounds[b]:band_bounds[b + 1]
        self.bands = [_Band(self.root, a, b, self.dtype) for a, b in self.edges]
        has_norms = (self.root / NORMS_ARRAY / "zarr.json").exists()
        self.norms = _Band(self.root, 0, len(bands), NORM_DTYPE, name=NORMS_ARRAY) if has_norms else None
        self.arrays = self.bands + ([self.norms] if self.norms is not None else [])  # every array of the group
        self._write_lock = threading.Lock()
        self._write_buffer: np.ndarray | None = None  # allocated by the first write, then reused
        self._kernel_bands: tuple[int, list[tuple]] = (0, [])  # rows covered, band descriptions
        self.resident_bytes = _resident_budget()
        self.prefault_rows = 0  # rows every array holds in memory; the kernels page in rows past it
        self._resident: list[int] = []
        self._planned_for = -1
        self._plan_residency(max(band.shape_rows for band in self.arrays))

    def _plan_residency(self, rows: int) -> list[int]:
        """Each array's rows held in memory (read at open) for a store of ``rows`` rows. Planned at open
        and again as the store grows."""
        if rows > self._planned_for:
            self._planned_for = rows
            self._resident = resident_rows(rows, [a.row_bytes for a in self.arrays], self.resident_bytes)
            for array, held in zip(self.arrays, self._resident):
                array.rows_held = held
            self.prefault_rows = min(self._resident)
        return self._resident

    @property
    def held_rows(self) -> list[int]:
        """Rows each array (``arrays``, in order) reads at open and holds in memory."""
        return list(self._resident)

    def _scratch(self) -> np.ndarray:
        if self._write_buffer is None:
            self._write_buffer = np.empty(WRITE_BUFFER_BYTES // self.dtype.itemsize, dtype=self.dtype)
        return self._write_buffer

    def prefault(self, row_start: int, row_stop: int) -> None:
        """Map the page tables of rows ``row_start:row_stop`` now, reading one value per page: otherwise a
        fresh process pays a page fault the first time it re-ranks each row (measured: it doubled the
        p50 of its first queries). Only the rows each array holds in memory (``resident_rows``, a quarter
        of RAM in all): the rest fault in as queries touch them, rather than being read at open."""
        for band, held in zip(self.arrays, self._plan_residency(row_stop)):
            rc, step, stop = band.chunk_rows, max(1, PAGE // band.dtype.itemsize), min(row_stop, held)
            for chunk in range(row_start // rc, -(-stop // rc)):
                lo, hi = max(row_start, chunk * rc) - chunk * rc, min(stop, (chunk + 1) * rc) - chunk * rc
                if lo < hi:
                    band.read_in(chunk, lo, hi, step)

    def file_problems(self, watermark: int) -> list[str]:
        """What is wrong with the files of every array (bands and row_norms) for ``watermark`` rows."""
        found = [problem for band in self.arrays for problem in band.file_problems(watermark)]
        found += _group_problems(self.root)
        if self.norms is None and any(band.sharded for band in self.bands):  # made with them (format 3 on)
            found.append("row_norms is missing: the store opens without it, and re-ranks read whole rows")
        return found

    @property
    def chunk_rows(self) -> list[int]:
        return [b.chunk_rows for b in self.bands]

    def physical_rows(self) -> int:
        return min(b.shape_rows for b in self.arrays)

    def map_committed(self, rows: int) -> None:
        """Map the chunk files of the first ``rows`` rows of every array; CorruptStoreError when one is missing
        or short. A reader's maps keep its version's files after a compaction swaps in other ones."""
        for band in self.arrays:
            rc = band.chunk_rows
            for chunk in range(-(-rows // rc)):
                band.mapped(chunk, min(rc, rows - chunk * rc))

    def has_norms(self) -> bool:
        return self.norms is not None

    def is_clean(self, rows: int) -> bool:
        """True when every array's shape is ``rows`` and no chunk file lies wholly past it."""
        for band in self.arrays:
            if band.shape_rows != rows:
                return False
            cdir = band.dir / "c"
            last = -(-rows // band.chunk_rows)
            if cdir.exists() and any(c.name.isdigit() and int(c.name) >= last for c in cdir.iterdir()):
                return False
        return True

    def append(self, start_row: int, vectors: np.ndarray) -> None:
        """Write ``vectors`` (n x dim) at rows ``start_row..`` durably; visible after the catalog commits."""
        with self._write_lock:
            self.write_rows(start_row, vectors)
            self.set_rows(start_row + len(vectors))

    def write_rows(self, start_row: int, vectors: np.ndarray, sized: bool = True) -> None:
        """Write ``vectors`` and their band norms at rows ``start_row..`` and fsync them, leaving the arrays'
        shapes alone. ``sized=False``: the rows alone, for processes that write one store side by side at
        rows reserved for each (its writer then calls ``settle``)."""
        touched: list[Path] = []
        for band in self.bands:
            touched += band.write(start_row, vectors[:, band.start : band.stop], self._scratch(), sized)
        if self.norms is not None:
            norms = band_norms(vectors, self.edges, self.dtype)
            touched += self.norms.write(start_row, norms, norms.reshape(-1), sized)  # contiguous: written as is
        _fsync_each(touched)

    def read_written(self, row: int, n: int) -> np.ndarray:
        """Rows ``row..row+n`` as written (n x dim, stored dtype), uncommitted ones included."""
        out = np.empty((n, self.dim), dtype=self.dtype)
        for band in self.bands:
            at = row
            while at < row + n:
                take = min(row + n - at, band.chunk_rows - at % band.chunk_rows)
                out[at - row : at - row + take, band.start : band.stop] = band.read_written(at, take)
                at += take
        return out

    def settle(self, first_row: int, end_row: int) -> None:
        """After rows ``first_row..end_row`` were written with ``sized=False`` (and maybe more past them):
        size and index their chunk files, make ``end_row`` the arrays' shape and erase rows past it."""
        with self._write_lock:
            touched: list[Path] = []
            for array in self.arrays:
                rc = array.chunk_rows
                for chunk in range(first_row // rc, -(-end_row // rc)):
                    touched += array.settle(chunk, min(rc, end_row - chunk * rc))
            _fsync_each(touched)
        self.truncate(end_row)

    def set_rows(self, rows: int) -> None:
        """Record ``rows`` as the arrays' shape so zarr-python readers see exactly the committed rows."""
        for band in self.arrays:
            band.set_shape_rows(rows)

    def release_retired(self) -> None:
        if any(band.has_retired for band in self.arrays):
            self._kernel_bands = (0, [])  # first: an interrupt (Ctrl-C) next leaves maps, no stale address
            for band in self.arrays:
                band.release_retired()

    def truncate(self, rows: int) -> None:
        """Forget everything past ``rows`` (uncommitted leftovers of a crashed or failed append)."""
        with self._write_lock:
            self._kernel_bands = (0, [])  # chunk files past rows go away or shrink: so do their maps
            for band in self.arrays:  # first what frees space: a writer a full disk killed reopens on it
                band.drop_chunks_from(-(-rows // band.chunk_rows))
            for band in self.arrays:
                band.discard_from(rows)
            self.set_rows(rows)

    def gather(self, rows: np.ndarray, col_start: int, col_stop: int) -> np.ndarray:
        """Rows (any order, may repeat) x columns ``col_start:col_stop`` as float32, in the order given."""
        return _gather_in_order(self.gather_bands, rows, col_start, col_stop)

    def gather_bands(self, rows: np.ndarray, col_start: int, col_stop: int) -> list[tuple[int, np.ndarray]]:
        """The re-rank read: for sorted ``rows``, columns ``col_start:col_stop`` as one block per band,
        in the stored dtype, each paired with its last column + 1. Whole-row reads from each chunk's
        memory map, no reassembly: within 2x of a raw memmap gather of the same bytes."""
        return _band_blocks(self.bands, self.take, rows, col_start, col_stop)

    def frozen(self, rows: int, columns: int) -> RowGather:
        """The first ``columns`` numbers of the first ``rows`` rows, read through the maps the tier holds now,
        which keep their files: a long read (a scan) goes on after a compaction or refresh closes the tier.
        The caller holds the store's read lock, and a compaction maps every committed row before it swaps
        folders, so none is mapped here from a swapped-in file."""
        return _FrozenRows({band: band.maps_now(rows) for band in self.bands if band.start < columns}, rows, columns)

    def take(self, band: _Band, rows: np.ndarray) -> np.ndarray:
        """``rows`` (sorted) of ``band``, whole, in the stored dtype."""
        return band.take_sorted(rows)

    def kernel_bands(self, rows_needed: int) -> list[tuple]:
        """Every band's description for the native kernels (see ``_Band.kernel_band``); the list is kept
        until more rows are needed (every query asks for it)."""
        covered, described = self._kernel_bands
        if rows_needed <= covered:
            return described
        pairs = [band.kernel_described(rows_needed) for band in self.bands]
        described = [d for d, _ in pairs]
        self._kernel_bands = (min(covered for _, covered in pairs), described)  # replaced whole
        return described

    def norm_mismatches(self, rows: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """Of ``rows`` (sorted), those whose stored band norms disagree with their stored values (beyond
        float32 rounding): the bounded re-rank trusts the norms. ``values``: the rows' whole vectors, where
        the caller has read them."""
        if self.norms is None or not len(rows):
            return np.empty(0, np.int64)
        stored = self.norms.take_sorted(rows)
        want = band_norms(self.gather(rows, 0, self.dim) if values is None else values, self.edges, self.dtype)
        bad = ~np.isclose(stored, want, rtol=1e-3, atol=1e-6 * want.sum(axis=1, keepdims=True) + 1e-30).all(axis=1)
        return rows[bad]

    def kernel_norms(self, rows_needed: int) -> tuple | None:
        """``row_norms`` described like a band for the native kernels (None in stores made without it)."""
        return None if self.norms is None else self.norms.kernel_band(rows_needed)

    def read_range(self, row_start: int, row_stop: int, col_start: int, col_stop: int) -> np.ndarray:
        """A contiguous block of rows as float32 (used for exact scans and index rebuilds)."""
        out = np.empty((row_stop - row_start, col_stop - col_start), dtype=np.float32)
        for band in self.bands:
            lo, hi = max(col_start, band.start), min(col_stop, band.stop)
            if lo >= hi:
                continue
            band.read_ahead(row_start, row_stop)
            row = row_start
            while row < row_stop:
                chunk, offset = divmod(row, band.chunk_rows)
                n = min(row_stop - row, band.chunk_rows - offset)
                out[row - row_start : row - row_start + n, lo - col_start : hi - col_start] = as_float32(
                    band.mapped(chunk, offset + n)[offset : offset + n, lo - band.start : hi - band.start]
                )
                row += n
        return out

    def close(self) -> None:
        self._kernel_bands = (0, [])
        for band in self.arrays:
            band.close()
