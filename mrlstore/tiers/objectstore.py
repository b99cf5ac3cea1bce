"""Stores on object storage (S3 and compatible), through pyarrow's S3 filesystem: ``store.publish(url)``
uploads a consistent version; ``mrlstore.open(url, read_only=True)`` downloads the small parts (catalog,
array metadata, the prefix index a default query searches first; the others on first use) once into a
local cache, downloads the near bands (kept by chunk key across versions) and reads the wider bands lazily,
with ranged requests for the shortlisted rows only. The only module that talks to object storage.

Layout under the store's URL (storage/FORMAT.md):

    HEAD                                  JSON naming the current version: written last (the commit point)
    versions/<n>/catalog.duckdb           the catalog as of version n
    versions/<n>/index/prefix_<d>.hnsw    the prefix indexes and their sidecars
    versions/<n>/vectors/...zarr.json     the Zarr metadata of the bands (shape = the version's rows)
    chunks/g<generation>/<band>/<chunk>-<rows>   the first <rows> rows of a chunk: immutable, so a later
                                          version reuses every chunk that did not grow (incremental)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs

from mrlstore._fsutil import copy_sparse, local_path
from mrlstore.errors import (
    CorruptStoreError,
    InvalidInputError,
    MRLStoreError,
    ObjectStorageError,
    StoreAccessError,
    StoreNotFoundError,
    UnsupportedStorageError,
    storage_error,
)
from mrlstore.tiers.abc import RowGather
from mrlstore.tiers.bands import BandedVectors, resident_rows
from mrlstore.tiers.id_index import ID_DIR
from mrlstore.tiers.indexes import default_first_stage
from mrlstore.tiers.state import StoreState

FORMAT = 1
KEEP_VERSIONS = 3  # older versions' catalogs and indexes are deleted, with chunks no kept version uses
HEAD_COPY = "HEAD.json"  # each version's HEAD, also under versions/<n>/: which chunks a kept version uses
# A reader's cache: beside each version's copy, the near chunks downloaded so far (by key, linked into the
# copies); copies beyond the KEEP_VERSIONS newest and leftovers go once untouched this long.
CHUNKS_DIR = "chunks"
STALE_COPY_S = 3600.0
# Rows at most this many bytes apart share one ranged request (0: adjacent rows only, nothing read that a
# query does not need). Requests, not bytes, dominate S3's cost and latency: raise it to trade bytes for them.
COALESCE_BYTES = int(os.environ.get("MRLSTORE_COALESCE_BYTES", "0"))
DENSE_SHARE = 4
ROW_CACHE_BYTES = int(os.environ.get("MRLSTORE_ROW_CACHE_MB", "256")) << 20  # rows kept in memory per open store
UPLOAD_THREADS = 8
FETCH_THREADS = 64  # requests in flight at once: a stage's rows come in one wave up to this many
# Whole objects (the small parts, near bands) come as ranged GETs RANGE_THREADS at a time: one stream of a
# large object is slow (benchmarks/whole_object.py on moto: 200 MiB in 108 s as one stream, 1.6 s as 16 MiB
# ranges from 8 threads; S3 advises ranges of 8-16 MB in parallel too). An object is cut into RANGE_THREADS
# ranges of RANGE_BYTES to MAX_RANGE_BYTES, so objects up to 512 MiB come in one wave of requests.
RANGE_BYTES, MAX_RANGE_BYTES, RANGE_THREADS = 16 << 20, 64 << 20, 8
_OPTION_NAMES = {  # fsspec/s3fs spellings -> pyarrow's
    "key": "access_key", "aws_access_key_id": "access_key",
    "secret": "secret_key", "aws_secret_access_key": "secret_key",
    "token": "session_token", "aws_session_token": "session_token",
    "region_name": "region", "endpoint_url": "endpoint_override",
}  # fmt: skip


def filesystem(url: str, options: dict[str, Any] | None) -> tuple[pafs.S3FileSystem, str]:
    """The S3 filesystem for ``url`` (s3://bucket/prefix) and its root "bucket/prefix". Credentials and the
    endpoint come from ``options`` (pyarrow or s3fs names), else the standard AWS environment variables."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ObjectStorageError(f"{url}: only s3:// URLs (S3 and compatible services) are supported")
    opts = _options(options)
    endpoint = opts.pop("endpoint_override", None) or _endpoint(options)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        opts.setdefault("scheme", scheme if host else "https")
        opts["endpoint_override"] = host or scheme
    opts.setdefault("region", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    opts.setdefault("connect_timeout", 5)
    opts.setdefault("request_timeout", 30)
    opts.setdefault("retry_strategy", pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    try:
        fs = pafs.S3FileSystem(**opts)
    except TypeError as e:
        raise ObjectStorageError(f"storage_options not understood by pyarrow's S3FileSystem: {e}") from None
    return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` in pyarrow's names."""
    if options is not None and not isinstance(options, dict):
        raise InvalidInputError(f"storage_options must be a dict, got {type(options).__name__}")
    return {_OPTION_NAMES.get(k, k): v for k, v in (options or {}).items()}


def _endpoint(options: dict[str, Any] | None) -> str | None:
    """The endpoint ``options`` (or the AWS environment variables) name; None: AWS's own."""
    return (
        _options(options).get("endpoint_override")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


@contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
    """Object-store failures as typed errors naming the URL (our own errors pass through)."""
    try:
        yield
    except MRLStoreError:
        raise
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"{url}: {what}: not found ({_short(e)})") from None
    except OSError as e:
        text = str(e)
        if any(s in text for s in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")):
            raise StoreAccessError(f"{url}: {what}: access denied (check the credentials): {_short(e)}") from None
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            raise StoreNotFoundError(f"{url}: {what}: the bucket does not exist") from None
        raise ObjectStorageError(f"{url}: {what} failed: {_short(e)}") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:300]


def read_json(fs: pafs.S3FileSystem, key: str) -> dict[str, Any]:
    with fs.open_input_stream(key) as f:
        return json.loads(f.read())


def write_bytes(fs: pafs.S3FileSystem, key: str, data: bytes) -> None:
    """One PUT (multipart when large), visible when complete; an exception in it may leave the object with
    what was written so far (pyarrow closes, so completes, the stream), so nothing relies on it whole."""
    with fs.open_output_stream(key) as f:
        f.write(data)


# -- publishing ----------------------------------------------------------------------------------------
def publish_store(store: StoreState, url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Upload the open store's current committed version to ``url``; returns the new HEAD. Only chunks the
    previous version there does not have are uploaded; HEAD is written last, so a crash part way leaves the
    previous version readable."""
    # Each write waits for its part's upload: with pyarrow's background writes a reader of the local files
    # faster than the network queues whole chunk objects in memory (a publish at 1M rows grew by 550 MiB, 172 now).
    fs, root = filesystem(url, {"background_writes": False, **_options(options)})
    with _publishing(url, options), tempfile.TemporaryDirectory(prefix="mrlstore-publish-") as tmp:
        with _errors(url, "publish"):
            head = _publish(fs, root, url, store, Path(tmp))
        try:
            _collect_garbage(fs, root, head)
        except OSError as e:  # the version is published: what is left costs storage, not correctness
            warnings.warn(f"{url}: published version {head['version']}, but could not delete old objects: "
                          f"{_short(e)}", RuntimeWarning, stacklevel=4)  # fmt: skip
    return head


def _publish(fs: pafs.S3FileSystem, root: str, url: str, store: StoreState, staged: Path) -> dict[str, Any]:
    """The uploads of one publish, HEAD last; returns the new HEAD."""
    parts, chunks, names, state = _capture(store, staged)
    try:
        previous = _previous_head(fs, root, url, state["store_id"])
        version = int(previous["version"]) + 1 if previous else 1
        have = set(previous["chunks"].values()) if previous else set()
        todo = [(key, fd, start, size) for key, (fd, start, size) in chunks.items() if key not in have]
        prefix = f"{root}/versions/{version}"
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda job: _upload_chunk(fs, f"{root}/{job[0]}", *job[1:]), todo))
            digests = list(pool.map(lambda p: _upload_part(fs, f"{prefix}/{p}", staged / p), parts))
    finally:
        for fd, _, _ in chunks.values():
            os.close(fd)
    head = {
        "format": FORMAT, "version": version, "published_at": time.time(), **state,
        "parts": {str(p): digest for p, digest in zip(parts, digests)},
        "chunks": names,
        "uploaded_chunk_bytes": sum(size for _, _, _, size in todo),
    }  # fmt: skip
    text = json.dumps(head, indent=1).encode()
    write_bytes(fs, f"{prefix}/{HEAD_COPY}", text)  # what garbage collection keeps for this version
    # HEAD replaced whole by one server-side copy of it: written through a stream, a Ctrl-C between opening
    # and writing completed the PUT empty (pyarrow closes a stream an exception leaves): the store was lost
    fs.copy_file(f"{prefix}/{HEAD_COPY}", f"{root}/HEAD")
    return head


def _previous_head(fs: pafs.S3FileSystem, root: str, url: str, store_id: Any) -> dict[str, Any] | None:
    """The HEAD a publish builds on: None at a new URL; refused if it is another store's."""
    previous = _remote_head(fs, root)
    if previous is None:
        return None
    _checked_head(url, previous)
    if previous.get("store_id") != store_id:
        raise InvalidInputError(
            f"{url} holds another store (store_id {previous.get('store_id')}, this one is "
            f"{store_id}): publish to a new URL, or delete the old one first"
        )
    return previous


@contextmanager
def _publishing(url: str, options: dict[str, Any] | None) -> Iterator[None]:
    """One publish to ``url`` at a time on this machine (a flock, so threads and processes alike): two that
    overlap would upload the same version's parts over each other. Object storage offers no lock here;
    keeping publishes from several machines apart is the caller's part."""
    key = hashlib.blake2b(json.dumps([url, _endpoint(options)]).encode(), digest_size=8).hexdigest()
    try:
        fd = os.open(Path(tempfile.gettempdir()) / f"mrlstore-publish-{key}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        fd = -1  # a temp folder this process may not write: unguarded, as before
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=16)


def _upload_part(fs: pafs.S3FileSystem, key: str, path: Path) -> str:
    """One small part up, 8 MiB at a time (a part held whole would cost its size in memory: at 1M rows the
    32-d index is 264 MiB, and the parts go up 8 at once); returns its digest, taken on the way."""
    digest = _hasher()
    with open(path, "rb") as f, fs.open_output_stream(key) as out:
        while block := f.read(8 << 20):
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


def _capture(
    store: StoreState, staged: Path
) -> tuple[list[Path], dict[str, tuple[int, int, int]], dict[str, str], dict[str, Any]]:
    """Under the store's write lock: the catalog, index files and band metadata copied to ``staged``; an
    open descriptor of every chunk holding committed rows (a compaction swapping files later cannot change
    what is uploaded) with where its rows start and the byte count of its committed rows, by object key;
    and the object key of each chunk by its name "band/chunk" (what HEAD maps)."""
    with store.writing():
        if not store.read_only:
            store.indexes.checkpoint()
        snap, vectors = store.snap, store.vectors
        if not isinstance(vectors, BandedVectors):  # the chunk files themselves are uploaded
            raise UnsupportedStorageError("publish() uploads a store whose bands are local files")
        store.catalog.snapshot_to(staged / "catalog.duckdb")
        id_runs = store.catalog.copy_id_runs(staged / ID_DIR)  # for a reader's first lookup by id
        for path in store.indexes.files():  # a reader downloads each at open: only those it loads
            target = staged / path.relative_to(store.path)
            target.parent.mkdir(exist_ok=True)
            shutil.copy(path, target)
        group = staged / "vectors"
        group.mkdir()
        shutil.copy(vectors.root / "zarr.json", group / "zarr.json")
        files: dict[str, tuple[Path, int, int]] = {}
        names: dict[str, str] = {}
        generation = store.generation
        for band in vectors.bands:
            meta = band.plain_meta(snap.watermark)  # objects hold each chunk's rows, without a shard index
            (group / band.dir.name).mkdir()
            (group / band.dir.name / "zarr.json").write_text(json.dumps(meta, indent=2))
            for chunk in range(-(-snap.watermark // band.chunk_rows)):
                rows = min(band.chunk_rows, snap.watermark - chunk * band.chunk_rows)
                key = f"chunks/g{generation}/{band.dir.name}/{chunk}-{rows}"
                names[f"{band.dir.name}/{chunk}"] = key
                files[key] = (band.chunk_path(chunk), band.data_offset, rows * band.row_bytes)
        first = default_first_stage(store.manifest, store.params, store.indexes.projection)
        later = [p.relative_to(store.path).as_posix() for p in store.indexes.deferred_files(first) if p.exists()]
        later += [p.relative_to(staged).as_posix() for p in id_runs]
        state = {
            "store_id": store.manifest.get("store_id") or store.manifest.get("created_at"),
            "generation": generation,
            "committed_rows": snap.watermark,
            "live_rows": snap.n_live,
            "deferred": later,  # parts a reader downloads when it first searches them, not at open
        }
        chunks = _open_all(files)  # last: nothing after it fails and leaves them open
    parts = [p.relative_to(staged) for p in staged.rglob("*") if p.is_file()]
    return parts, chunks, names, state


def _open_all(files: dict[str, tuple[Path, int, int]]) -> dict[str, tuple[int, int, int]]:
    """A read descriptor in place of each path (all of them, or none left open)."""
    opened: dict[str, tuple[int, int, int]] = {}
    try:
        for key, (path, start, size) in files.items():
            opened[key] = (os.open(path, os.O_RDONLY), start, size)
    except BaseException:
        for fd, _, _ in opened.values():
            os.close(fd)
        raise
    return opened


def _upload_chunk(fs: pafs.S3FileSystem, key: str, fd: int, start: int, size: int) -> None:
    """``size`` bytes of a chunk file from byte ``start`` (its rows) into the object ``key``."""
    with fs.open_output_stream(key) as out:
        offset = 0
        while offset < size:
            data = os.pread(fd, min(8 << 20, size - offset), start + offset)
            if not data:
                raise CorruptStoreError(f"chunk for {key} ended after {offset} of {size} bytes")
            out.write(data)
            offset += len(data)


def _remote_head(fs: pafs.S3FileSystem, root: str) -> dict[str, Any] | None:
    try:
        head = read_json(fs, f"{root}/HEAD")
    except FileNotFoundError:
        return None
    except ValueError:
        raise CorruptStoreError(f"{root}/HEAD is not valid JSON") from None
    if not isinstance(head, dict):
        raise CorruptStoreError(f"{root}/HEAD is not a JSON object")
    return head


_HEAD_FIELDS = {"version": int, "generation": int, "committed_rows": int, "parts": dict, "chunks": dict}


def _checked_head(url: str, head: dict[str, Any]) -> dict[str, Any]:
    """``head`` if it is a HEAD this reader can open, else a CorruptStoreError saying what is wrong."""
    if head.get("format") != FORMAT:
        raise CorruptStoreError(f"{url}/HEAD has format {head.get('format')!r}, expected {FORMAT}")
    for field, kind in _HEAD_FIELDS.items():
        if not isinstance(head.get(field), kind) or isinstance(head.get(field), bool):
            raise CorruptStoreError(f"{url}/HEAD has no valid {field!r} (expected {kind.__name__})")
    return head


def _collect_garbage(fs: pafs.S3FileSystem, root: str, head: dict[str, Any]) -> None:
    """Delete versions older than the KEEP_VERSIONS newest, and chunks that no kept version names (a reader
    that opened an older version keeps its downloaded parts; its lazy chunk reads fail once deleted)."""
    version = int(head["version"])
    keep = set(range(max(1, version - KEEP_VERSIONS + 1), version + 1))
    entries = fs.get_file_info(pafs.FileSelector(f"{root}/versions", allow_not_found=True))
    for entry in entries:
        name = entry.path.rsplit("/", 1)[-1]
        if entry.type == pafs.FileType.Directory and name.isdigit() and int(name) not in keep:
            fs.delete_dir(entry.path)
    # A grown chunk gets a new key, and a compaction a new generation: a chunk goes once no kept version
    # names it and it is an hour old (a publish running elsewhere may have uploaded it for its HEAD).
    used = set(head["chunks"].values())
    for kept in sorted(keep - {version}):
        try:
            used.update(read_json(fs, f"{root}/versions/{kept}/{HEAD_COPY}")["chunks"].values())
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return  # a version published before versions kept their HEAD: its chunks are unknown, so kept
    for entry in fs.get_file_info(pafs.FileSelector(f"{root}/chunks", recursive=True, allow_not_found=True)):
        key = entry.path[len(root) + 1 :]
        if entry.type == pafs.FileType.File and key not in used and _older_than(entry, 3600):
            fs.delete_file(entry.path)


def _version_key(head: dict[str, Any]) -> tuple[Any, int, int, Any]:
    """What tells two published versions apart: a store deleted and another published at its URL too, and
    the same store published again after its objects were deleted (numbered from 1 again)."""
    return head.get("store_id"), int(head["generation"]), int(head["version"]), head.get("published_at")


def _copy_name(head: dict[str, Any]) -> str:
    """The cache folder of one published version: its number, and a digest of its parts, so a version
    published again under the same number (its objects deleted) is never served from the old copy."""
    parts = json.dumps([head.get("published_at"), head["parts"]], sort_keys=True).encode()
    return f"g{head['generation']}-v{head['version']}-{hashlib.blake2b(parts, digest_size=6).hexdigest()}"


def _older_than(entry: pafs.FileInfo, seconds: float) -> bool:
    """Chunks unused for an hour: readers of the previous versions have long moved on."""
    return entry.mtime is not None and time.time() - entry.mtime.timestamp() > seconds


# -- reading ---------------------------------------------------------------------------------------------
class RemoteSource:
    """One remote store version: its filesystem, root and HEAD, with request and byte counters."""

    def __init__(self, url: str, options: dict[str, Any] | None, head: dict[str, Any] | None = None):
        self.url, self.options = url, options
        self.fs, self.root = filesystem(url, options)
        if head is None:
            with _errors(url, "open"):
                head = _remote_head(self.fs, self.root)
        if head is None:
            raise StoreNotFoundError(f"no store published at {url} (no HEAD object)")
        self.head = _checked_head(url, head)
        self.requests = self.bytes = self.cached_bytes = 0
        self.rounds = self.waves = 0  # batches of requests waited for one after another; FETCH_THREADS at a time
        self.local_dims = 0  # the bands downloaded whole (set by RemoteBands)
        self.chunks: list[RemoteChunk] = []
        self._lock = threading.Lock()
        self._files: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(FETCH_THREADS)
        self._checked: dict[str, str] = {}  # digests by part, of those local_copy downloaded and checked
        self.cache_root: Path | None = None  # this URL's folder in the local cache (set by local_copy)

    def object_problems(self, key: str, size: int) -> list[str]:
        """A chunk object that is missing or holds fewer than ``size`` bytes."""
        with _errors(self.url, "verify"):
            info = self.fs.get_file_info(f"{self.root}/{key}")
        if info.type != pafs.FileType.File:
            return [f"chunk object {key} holding committed rows is missing"]
        if info.size < size:
            return [f"chunk object {key} has {info.size} bytes, expected at least {size}"]
        return []

    def local_copy(self, cache_dir: str | os.PathLike[str] | None) -> Path:
        """The small parts of this version in the local cache (downloaded once; complete or absent)."""
        base = (
            local_path(cache_dir)
            if cache_dir
            else Path(os.environ.get("MRLSTORE_CACHE", Path.home() / ".cache" / "mrlstore"))
        )
        # one folder per store at this URL and endpoint: a copy is never taken for another store's
        key = json.dumps([self.url, _endpoint(self.options), self.head.get("store_id")])
        self.cache_root = base / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        dest = self.cache_root / _copy_name(self.head)
        if (dest / "catalog.duckdb").exists():
            return dest  # downloaded before: its index files are checked against their sidecars at load
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error("make the cache folder", dest.parent, e) from None
        _evict_old_copies(self.cache_root)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
        later = set(self.head.get("deferred", ()))  # indexes a default query does not search: on first use
        parts = {part: digest for part, digest in self.head["parts"].items() if part not in later}
        try:
            with _errors(self.url, "download"), ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                # all at once: a fresh reader's open waits for one round of requests, not one per part
                list(pool.map(lambda item: self._download_part(tmp / item[0], *item), parts.items()))
            (tmp / "index").mkdir(exist_ok=True)
            os.rename(tmp, dest)
            self._checked = parts
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (dest / "catalog.duckdb").exists():
                raise
            # another process downloaded it first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    @property
    def kept_chunks(self) -> Path:
        """Where this URL's downloaded near chunks are kept, by object key: shared by the copies of every
        version (a chunk object never changes), so a newer version downloads only the chunks that changed."""
        assert self.cache_root is not None, "local_copy first"
        return self.cache_root / CHUNKS_DIR

    def fetch_part(self, local: Path, part: str) -> str | None:
        """A part ``local_copy`` left for later (HEAD's ``deferred``) into the local copy at ``local``;
        returns its checked digest (None: it was there already, downloaded by an earlier open)."""
        target = local / part
        if target.exists():
            return None
        digest = self.head["parts"].get(part)
        if digest is None:
            raise CorruptStoreError(f"{self.url}: version {self.head['version']} has no part {part}")
        with _errors(self.url, "download"), _complete_or_absent(target) as tmp:
            self._download_part(tmp, part, digest)
        return digest

    def fetch_parts(self, local: Path, parts: list[str]) -> None:
        """Several parts ``local_copy`` left for later, all at once (one round of requests)."""
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda part: self.fetch_part(local, part), parts))

    def _download_part(self, target: Path, part: str, digest: str) -> None:
        """One small part into ``target`` (which the caller removes if anything fails), checked against the
        digest HEAD records for it."""
        target.parent.mkdir(parents=True, exist_ok=True)
        got = _hasher()
        with open(target, "wb") as out:
            _read_whole(self.fs, f"{self.root}/versions/{self.head['version']}/{part}", out, got)
        if got.hexdigest() != digest:
            raise CorruptStoreError(f"{self.url}: {part} of version {self.head['version']} is corrupted")

    def take_checked(self) -> dict[str, str]:
        """The digests of the parts ``local_copy`` downloaded and checked, once: a later open of the same copy
        checks its files again."""
        checked, self._checked = self._checked, {}
        return checked

    def newer(self) -> RemoteSource | None:
        """The store's current version if it is not this one (another publish happened), else None."""
        with _errors(self.url, "refresh"):
            head = _remote_head(self.fs, self.root)
        if head is None or _version_key(head) == _version_key(self.head):
            return None
        return RemoteSource(self.url, self.options, head)

    def read(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Byte ranges (offset, length) of one object, fetched concurrently."""
        return self.read_many([(key, ranges)])[0]

    def read_many(self, wanted: list[tuple[str, list[tuple[int, int]]]]) -> list[list[bytes]]:
        """Byte ranges of several objects, every request at once (one round): per object, its ranges' bytes."""
        handles = [self._handle(key) for key, _ in wanted]
        for (key, ranges), handle in zip(wanted, handles):
            end = max(offset + length for offset, length in ranges)
            if handle.size() < end:
                raise CorruptStoreError(f"{self.url}/{key} holds {handle.size()} bytes, rows need {end} (truncated)")

        def fetch(job: tuple[str, Any, tuple[int, int]]) -> bytes:
            key, handle, (offset, length) = job
            with _errors(self.url, f"read {key}"):
                data = handle.read_at(length, offset)
            if len(data) != length:
                raise CorruptStoreError(
                    f"{self.url}/{key}: {len(data)} bytes at {offset}, expected {length} (truncated)"
                )
            return data

        jobs = [(key, handle, r) for (key, ranges), handle in zip(wanted, handles) for r in ranges]
        fetched = iter(list(self._pool.map(fetch, jobs)) if len(jobs) > 1 else [fetch(jobs[0])])
        with self._lock:
            self.requests += len(jobs)
            self.bytes += sum(r[1] for _, _, r in jobs)
            self.rounds += 1
            self.waves += -(-len(jobs) // FETCH_THREADS)
        return [[next(fetched) for _ in ranges] for _, ranges in wanted]

    def _handle(self, key: str) -> Any:
        handle = self._files.get(key)
        if handle is None:
            with _errors(self.url, f"read {key}"):
                handle = self.fs.open_input_file(f"{self.root}/{key}")
            self._files[key] = handle
        return handle

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes, "rounds": self.rounds, "waves": self.waves,
                    "local_dims": self.local_dims}  # fmt: skip

    def cache_rows(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more rows fit the row cache (ROW_CACHE_BYTES); when full it starts over."""
        with self._lock:
            if self.cached_bytes + nbytes > ROW_CACHE_BYTES:
                for chunk in self.chunks:
                    chunk.row_cache = {}
                self.cached_bytes = 0
            if nbytes > ROW_CACHE_BYTES:
                return False
            self.cached_bytes += nbytes
            return True

    def close(self) -> None:
        """Stop fetching and drop the row caches, and the chunks' link back here (a cycle that kept each
        refreshed-away version, its S3 client's descriptors and up to ROW_CACHE_BYTES of rows, until a full
        garbage collection)."""
        self._pool.shutdown(wait=False)
        self._files.clear()
        with self._lock:
            for chunk in self.chunks:
                chunk.row_cache = {}
            self.chunks, self.cached_bytes = [], 0


_NO_ROWS = np.empty(0, np.int64)
_NO_ROWS.flags.writeable = False


class RemoteChunk:
    """A chunk's committed rows on object storage, indexed like the memory map of a local chunk: fancy row
    indices (sorted) or a row slice, then optional columns. Rows close together share one request."""

    def __init__(self, source: RemoteSource, key: str, rows: int, width: int, dtype: np.dtype):
        self.source, self.key, self.rows, self.width, self.dtype = source, key, rows, width, dtype
        self.row_bytes = width * dtype.itemsize
        self.row_cache: dict[int, np.ndarray] = {}  # rows read before (re-ranks revisit popular rows)
        source.chunks.append(self)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: Any) -> np.ndarray:
        rows, cols = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.rows)
            block = self._runs(np.array([start]), np.array([max(start, stop - 1)]))[: max(0, stop - start)]
        else:
            rows = np.asarray(rows, dtype=np.int64)  # sorted: the ends bound them
            if len(rows) and (rows[0] < 0 or rows[-1] >= self.rows):
                raise CorruptStoreError(f"{self.key}: row past the {self.rows} rows the version holds")
            block = self._gather(rows)
        return block[(slice(None), *cols)] if cols else block

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the order given, from the row cache or fetched (and cached)."""
        out = np.empty((len(rows), self.width), self.dtype)
        missing = self.missing(rows)
        cache = self.row_cache
        if len(missing):
            first, last = self.runs(missing)
            fetched = self.picked(missing, first, last, self.source.read(self.key, self.ranges(first, last)))
            if self.source.cache_rows(len(missing) * self.row_bytes):
                self.keep(missing, fetched)
            else:
                cache = {**cache, **dict(zip(missing.tolist(), fetched))}
        for i, r in enumerate(rows.tolist()):
            out[i] = cache[r]
        return out

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """Of ``rows``, those not in the row cache: sorted, unique."""
        cache = self.row_cache
        absent = [r for r in rows.tolist() if r not in cache]
        return np.unique(np.array(absent, np.int64)) if absent else _NO_ROWS  # warm queries: all cached

    def runs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique rows cut into runs of adjacent rows (gaps up to COALESCE_BYTES), one ranged request
        per run: (first rows, last rows). Rows filling at least 1/DENSE_SHARE of their span (filtered scans)
        make one run of the span."""
        if len(rows) * DENSE_SHARE >= rows[-1] - rows[0] + 1:
            cut = np.empty(0, np.int64)
        else:
            cut = np.flatnonzero(np.diff(rows) > 1 + COALESCE_BYTES // self.row_bytes) + 1
        return rows[np.r_[0, cut]], rows[np.r_[cut - 1, len(rows) - 1]]

    def ranges(self, first: np.ndarray, last: np.ndarray) -> list[tuple[int, int]]:
        return [(int(a) * self.row_bytes, (int(b) - int(a) + 1) * self.row_bytes) for a, b in zip(first, last)]

    def picked(self, rows: np.ndarray, first: np.ndarray, last: np.ndarray, parts: list[bytes]) -> np.ndarray:
        """``rows`` (sorted, unique) out of the bytes of the runs ``first``..``last``."""
        data = np.frombuffer(b"".join(parts), dtype=self.dtype).reshape(-1, self.width)
        run_start = np.concatenate([[0], np.cumsum(last - first + 1)[:-1]])
        run_of = np.searchsorted(first, rows, side="right") - 1
        return data[run_start[run_of] + rows - first[run_of]]

    def keep(self, rows: np.ndarray, fetched: np.ndarray) -> None:
        """Rows into the row cache (room reserved with ``RemoteSource.cache_rows``)."""
        self.row_cache.update(zip(rows.tolist(), fetched))

    def _runs(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        parts = self.source.read(self.key, self.ranges(first, last))
        return np.frombuffer(b"".join(parts), dtype=self.dtype).reshape(-1, self.width)


class RemoteBands(BandedVectors):
    """The bands of a remote version: the local cache holds their metadata, object storage their rows. Bands
    that end at or before ``local_dims`` are downloaded whole into the cache (the tier users keep near:
    short prefixes are small) and read like a local store's; None: ``near_dims``."""

    native = False  # the native kernels read memory maps: only the near bands' stages run natively

    def __init__(
        self,
        path: Path,
        dim: int,
        bands: tuple[int, ...],
        dtype: str,
        source: RemoteSource,
        local_dims: int | None = None,
    ):
        super().__init__(path, dim, bands, dtype)
        self.source = source
        rows = int(source.head["committed_rows"])
        self.local_dims = source.local_dims = self.near_dims(rows) if local_dims is None else local_dims
        self.native_dims = max((b.stop for b in self.bands if b.stop <= self.local_dims), default=0)
        downloads = []
        for band in self.bands:
            for chunk in range(-(-rows // band.chunk_rows)):
                name = f"{band.dir.name}/{chunk}"
                key = source.head["chunks"].get(name)
                if key is None:
                    raise CorruptStoreError(f"{source.url}/HEAD names no object for chunk {name}")
                filled = min(band.chunk_rows, rows - chunk * band.chunk_rows)
                if band.stop <= self.local_dims:
                    size = filled * band.width * band.dtype.itemsize
                    downloads.append((key, band.chunk_path(chunk), size, band.chunk_bytes))
                else:
                    band._maps[chunk] = RemoteChunk(source, key, filled, band.width, band.dtype)
        # All at once (one round of requests), in the background: the open loads the HNSW indexes meanwhile,
        # and map_committed waits for them (a failed download fails the open).
        self._downloads = ThreadPoolExecutor(UPLOAD_THREADS)
        kept = source.kept_chunks
        self._pending = [self._downloads.submit(_download_chunk, source, *job, kept) for job in downloads]

    def kernel_bands(self, rows_needed: int) -> list[tuple]:
        """The near bands' descriptions only: the native kernels run the stages within ``native_dims``."""
        return [band.kernel_described(rows_needed)[0] for band in self.bands if band.stop <= self.native_dims]

    def near_dims(self, rows: int) -> int:
        """The default ``local_dims``: the bands before the widest, as many as a local store of ``rows``
        rows holds whole in memory (``resident_rows``), so only the funnel's last stage reads remote rows."""
        near = self.bands[:-1]
        held = resident_rows(rows, [b.row_bytes for b in near], self.resident_bytes)
        whole = 0
        for band, count in zip(near, held):
            if count < rows:
                break
            whole = band.stop
        return whole

    def map_committed(self, rows: int) -> None:
        self._downloaded()
        super().map_committed(rows)

    def read_range(self, row_start: int, row_stop: int, col_start: int, col_stop: int) -> np.ndarray:
        self._downloaded()  # an index extended at open reads rows before map_committed
        return super().read_range(row_start, row_stop, col_start, col_stop)

    def _downloaded(self) -> None:
        """Wait for the near bands' download; raises its first failure."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        self._downloads.shutdown()

    def prefault(self, row_start: int, row_stop: int) -> None:
        pass  # remote rows come over the network when a query needs them; local ones fault in

    def frozen(self, rows: int, columns: int) -> RowGather:
        return self  # a version's objects never change; a refresh closes the tier, and a scan then says so

    def gather_bands(self, rows: np.ndarray, col_start: int, col_stop: int) -> list[tuple[int, np.ndarray]]:
        try:
            self._fetch_together(rows, col_start, col_stop)
            return super().gather_bands(rows, col_start, col_stop)
        except KeyError:  # a chunk's map gone: a refresh closed the tier while a scan read it (a bare KeyError)
            for band in self.bands:
                band.check_open()
            raise

    def take(self, band: Any, rows: np.ndarray) -> np.ndarray:
        """A remote band's ``rows`` from its chunks' row caches in one pass (a stage's few rows each fall in
        another chunk: a call per chunk cost more than the arithmetic), else chunk by chunk."""
        if band.stop <= self.local_dims or not len(rows):
            return band.take_sorted(rows)
        maps, rc = band._maps, band.chunk_rows
        try:
            return np.stack([maps[c].row_cache[r] for c, r in zip((rows // rc).tolist(), (rows % rc).tolist())])
        except KeyError:  # not fetched together (more rows than the row cache holds)
            return band.take_sorted(rows)

    def _fetch_together(self, rows: np.ndarray, col_start: int, col_stop: int) -> None:
        """A stage's rows from every remote chunk they fall in, in one round of requests (the gather that
        follows finds them in the row cache): chunk by chunk, a query would wait for one round per chunk."""
        wanted = []
        for band in self.bands:
            if max(col_start, band.start) >= min(col_stop, band.stop) or band.stop <= self.local_dims:
                continue  # not read, or kept local
            maps, rc = band._maps, band.chunk_rows
            absent: dict[int, list[int]] = {}  # one pass over the rows: warm queries find them all cached
            for c, r in zip((rows // rc).tolist(), (rows % rc).tolist()):
                if r not in maps[c].row_cache:
                    absent.setdefault(c, []).append(r)
            for c, local in absent.items():
                missing = np.unique(np.array(local, np.int64))
                wanted.append((maps[c], missing, *maps[c].runs(missing)))
        if len(wanted) < 2 or not self.source.cache_rows(sum(len(w[1]) * w[0].row_bytes for w in wanted)):
            return  # one chunk: its gather is one round anyway; more rows than the cache: chunk by chunk
        parts = self.source.read_many([(chunk.key, chunk.ranges(first, last)) for chunk, _, first, last in wanted])
        for (chunk, missing, first, last), got in zip(wanted, parts):
            chunk.keep(missing, chunk.picked(missing, first, last, got))

    def file_problems(self, watermark: int) -> list[str]:
        """Local problems of the cached arrays, and remote chunks that are missing or shorter than the rows
        the version commits there."""
        found = []
        for band in self.arrays:
            remote = {c: m for c, m in band._maps.items() if isinstance(m, RemoteChunk)}
            rc = band.chunk_rows
            local = [c for c in range(-(-watermark // rc)) if c not in remote]
            found += [p for c in local for p in band.chunk_problems(c, min(rc, watermark - c * rc))]
            for chunk in remote.values():
                found += self.source.object_problems(chunk.key, chunk.rows * chunk.row_bytes)
        return found

    def close(self) -> None:
        self._downloads.shutdown(cancel_futures=True)  # an open that failed: nothing written after it
        super().close()
        self.source.close()


def range_bytes(size: int) -> int:
    """The length of the ranged GETs an object of ``size`` bytes is downloaded in."""
    return min(MAX_RANGE_BYTES, max(RANGE_BYTES, -(-size // RANGE_THREADS)))


def _read_whole(fs: pafs.S3FileSystem, key: str, out: BinaryIO, digest: Any = None) -> int:
    """Object ``key`` written to ``out`` in order (and fed to ``digest``, a hashlib object, meanwhile), as
    ranged GETs RANGE_THREADS at a time (at most 256 MiB of them held in memory, or RANGE_THREADS ranges when
    they are longer); returns the bytes written."""
    handle = fs.open_input_file(key)
    try:
        size = int(handle.size())
        step = range_bytes(size)
        starts = list(range(0, size, step))
        held = max(RANGE_THREADS, 2 * RANGE_THREADS * RANGE_BYTES // step)
        with ThreadPoolExecutor(RANGE_THREADS) as pool:
            for lo in range(0, len(starts), held):
                window = starts[lo : lo + held]
                for block in pool.map(lambda at: handle.read_at(min(step, size - at), at), window):
                    out.write(block)
                    if digest is not None:
                        digest.update(block)  # while the next ranges arrive: no second pass over the part
        return size
    finally:
        handle.close()


def _download_chunk(source: RemoteSource, key: str, dest: Path, size: int, chunk_bytes: int, kept: Path) -> None:
    """A chunk object into the cache as a full-size local chunk file at ``dest``: a hard link to the copy
    kept under ``kept`` by its key, downloaded first when no earlier version's copy has it."""
    if dest.exists():
        return
    copy = kept / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            with _errors(source.url, f"download {key}"), _complete_or_absent(copy) as tmp, open(tmp, "wb") as out:
                copied = _read_whole(source.fs, f"{source.root}/{key}", out)
                out.truncate(chunk_bytes)
                if copied != size:
                    raise CorruptStoreError(f"{source.url}/{key} holds {copied} bytes, expected {size} (truncated)")
        try:
            with _complete_or_absent(dest) as link:
                _link(copy, link)
            return
        except FileNotFoundError:
            if attempt:
                raise  # another process evicted it meanwhile: downloaded again once


def _link(copy: Path, link: Path) -> None:
    try:
        os.link(copy, link)
    except FileNotFoundError:
        raise
    except OSError:  # a filesystem without hard links: a copy (the chunk files are mostly holes)
        copy_sparse(copy, link)


@contextmanager
def _complete_or_absent(target: Path) -> Iterator[Path]:
    """A temporary name beside ``target`` to write, renamed to ``target`` when the block ends (removed when
    it raises): processes sharing the cache see a file whole or not at all. No fsync, as before: the cache
    holds copies of objects, not commits."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _downloaded(copy: Path) -> float:
    """When a version's copy was made (its catalog's time: a reader's use changes neither)."""
    try:
        return (copy / "catalog.duckdb").stat().st_mtime
    except OSError:
        return 0.0  # incomplete: first to go


def _evict_old_copies(root: Path, keep: int = KEEP_VERSIONS, idle_s: float = STALE_COPY_S) -> None:
    """Version copies of one URL beyond the ``keep`` newest, untouched for ``idle_s`` seconds (readers of them
    have moved on: a process that still has one open keeps its mapped files), the kept chunks no copy links
    to any more, and what a killed download left, as old."""
    now = time.time()

    def idle(path: Path) -> bool:
        try:
            return now - path.stat().st_mtime > idle_s
        except OSError:
            return False

    # newest downloaded last: a store published again from version 1 has older copies of higher numbers
    copies = sorted((p for p in root.iterdir() if re.fullmatch(r"g\d+-v\d+(-[0-9a-f]+)?", p.name)), key=_downloaded)
    for old in copies[: max(0, len(copies) - keep)]:
        if idle(old):
            shutil.rmtree(old, ignore_errors=True)
    for leftover in [*root.glob(".download-*"), *root.rglob(".*.tmp-*")]:
        if not idle(leftover):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    for chunk in (root / CHUNKS_DIR).rglob("*"):
        if chunk.is_file() and chunk.stat().st_nlink == 1 and idle(chunk):
            chunk.unlink(missing_ok=True)
