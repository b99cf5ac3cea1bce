"""Published versions: how readers in other processes query a store while its writer keeps adding.

DuckDB lets no other process open a catalog while a writer has it. So the writer publishes: after its
commits it copies the catalog (ids, metadata, tombstones, manifest) to
``published/catalog-g<generation>-<n>.duckdb``, a file never written again, and then replaces
``published/HEAD`` (JSON naming it) atomically. Readers open
the copy HEAD names, never the live catalog, and take no lock: a writer never waits for readers, and a
reader never sees a partial batch (a version is a committed catalog). The vectors need no copy: rows below
a version's watermark never change in place (appends write past it; compaction swaps in a whole new folder,
and a reader's memory maps keep the old files), so the bands serve every version. A compaction links the
old folder's READERS into the new one, so the readers open across it are published for and refresh to it.

Publishing costs a catalog copy, so a writer publishes only while readers are there: each open reader holds a
shared flock on ``published/READERS``, which the writer probes (one non-blocking flock) after a commit. With
readers, it publishes when the last publish is old enough (``PUBLISH_INTERVAL`` seconds, or four times what
the last copy took), else once it is (a timer). Without readers it only marks ``published/PENDING`` and
checks again every interval; a reader that arrives and finds ``PENDING`` waits (a second or so) for the
writer's publish. A reader opening while no writer is alive publishes the live catalog itself if the newest
version trails it (a killed writer's last commits, or a writer that closed with no readers). So a reader
trails the writer by a few seconds at most, and an ingest with no readers copies nothing.
``Store.refresh()`` moves a reader to the newest version. storage/FORMAT.md describes the files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mrlstore._fsutil import HeldFolder, atomic_write_bytes, fsync_dir, fsync_file
from mrlstore.errors import (
    CorruptStoreError,
    MRLStoreError,
    NotAStoreError,
    StoreNotFoundError,
    UnsupportedStorageError,
)
from mrlstore.tiers.abc import VectorTier
from mrlstore.tiers.bands import BandedVectors
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.id_index import ID_DIR
from mrlstore.tiers.locking import NoLock, StoreLock
from mrlstore.tiers.params import INDEX_ENTRY_KEYS, StoreParams
from mrlstore.tiers.snapshot import Snapshot, load_snapshot
from mrlstore.tiers.state import HeldLock, StoreState

if TYPE_CHECKING:  # the object-store client (pyarrow's S3 filesystem) loads only for stores that use it
    from mrlstore.tiers.objectstore import RemoteSource

Reopen = Callable[[Callable[[], None]], None]
OpenBeside = Callable[[Callable[[], None], Callable[[], None]], None]

PUBLISHED_DIR = "published"
HEAD_FILE = "HEAD"
READERS_FILE = "READERS"  # open readers hold a shared flock on it
PENDING_FILE = "PENDING"  # exists while a live writer holds commits it has not published
READER_WAIT_S = 10.0  # how long a reader waits for a live writer's publish when PENDING says one is due
PUBLISH_INTERVAL = 1.0  # seconds: how far a reader may trail the writer's commits
KEEP_VERSIONS = 3  # older copies are deleted (a reader that has one open keeps reading it: POSIX unlink)


def read_head(store: Path) -> dict[str, Any] | None:
    """The newest published version of the store at ``store``, or None if none was ever published."""
    try:
        head = json.loads((store / PUBLISHED_DIR / HEAD_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a HEAD no writer of this format made: read the live catalog as before
    # JSON of another shape (a number, a list) raised TypeError at every open, the writer's included
    return head if isinstance(head, dict) and isinstance(head.get("catalog"), str) else None


def catalog_path(store: Path, head: dict[str, Any]) -> Path:
    return store / PUBLISHED_DIR / str(head["catalog"])


def usable_head(store: Path) -> dict[str, Any] | None:
    """HEAD, unless the catalog it names is gone or not of the size published (deleted or cut short): then
    a version is due, as with none (readers were refused until a write published again)."""
    head = read_head(store)
    if head is None:
        return None
    try:
        size = catalog_path(store, head).stat().st_size
    except OSError:
        return None
    return head if head.get("catalog_bytes", size) == size else None


def publish(store: Path, copy_catalog: Callable[[Path], None], state: dict[str, Any]) -> dict[str, Any]:
    """Publish a new version: ``copy_catalog(path)`` writes the catalog copy, then HEAD names it (with
    ``state``: what the writer compares to tell whether a version is behind). Returns the new HEAD."""
    folder = store / PUBLISHED_DIR
    folder.mkdir(exist_ok=True)
    previous = read_head(store) or {}
    # the generation in the name: a compaction's new folder numbers its versions from 1 again, and DuckDB hands
    # a process the database it already has open under a path, so one name must never mean two catalogs (past
    # the copies kept too: a HEAD lost or garbled numbered from 1 again, and a reader got the old catalog)
    prefix = f"catalog-g{int(state.get('generation', 0)):06d}-"
    kept = [int(p.stem[len(prefix) :]) for p in folder.glob(f"{prefix}*.duckdb") if p.stem[len(prefix) :].isdigit()]
    number = max([int(previous.get("version", 0)), *kept]) + 1
    name = f"{prefix}{number:010d}.duckdb"
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        copy_catalog(tmp)
        fsync_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        raise
    head = {"version": number, "catalog": name, "catalog_bytes": size, "published_at": time.time(), **state}
    atomic_write_bytes(folder / HEAD_FILE, json.dumps(head, indent=2).encode())
    (folder / PENDING_FILE).unlink(missing_ok=True)
    fsync_dir(folder)
    for old in sorted(folder.glob("catalog-*.duckdb"))[:-KEEP_VERSIONS]:
        old.unlink(missing_ok=True)
    for leftover in folder.glob(".catalog-*.tmp-*"):
        if leftover != tmp:
            leftover.unlink(missing_ok=True)  # a killed publisher's partial copy
    return head


def publish_first_version(store: Path, catalog: Catalog) -> None:
    """For a writer that never publishes (a staged write's driver), on a store with no version yet: one of
    its catalog now, so readers that come meanwhile open it instead of waiting for the writer's lock."""
    if read_head(store) is not None:
        return
    manifest = catalog.manifest()
    state = version_state(manifest, int(manifest["committed_rows"]), catalog.live_count())
    _publish_if_allowed(store, catalog.snapshot_to, state)


def carry_readers(old: Path, new: Path) -> None:
    """Before a compaction's exchange: the readers registered at ``old`` count as readers of ``new`` (the same
    READERS file, linked), so the writer publishes the new generation for them and their refresh finds it."""
    readers = old / PUBLISHED_DIR / READERS_FILE
    try:
        if readers.exists():
            (new / PUBLISHED_DIR).mkdir(exist_ok=True)
            os.link(readers, new / PUBLISHED_DIR / READERS_FILE)
    except OSError:
        pass  # no hard links here: those readers move on when another reader or writer publishes


def mark_pending(store: Path) -> None:
    """A compaction's new folder, before the exchange: no version of it is published yet, and its writer will
    publish one (readers that open it meanwhile wait for that, as for any pending commit)."""
    try:
        (store / PUBLISHED_DIR).mkdir(exist_ok=True)
        (store / PUBLISHED_DIR / PENDING_FILE).touch()
    except OSError:
        pass  # readers then find no version and wait for the writer's lock, as before


def newest_version(store: Path) -> dict[str, Any] | None:
    """For a reader opening ``store``: the newest published version. With no writer alive, the live catalog
    is published first if the newest version trails it (a killed writer may have committed after its last
    publish), so a reader then sees the last commit. None when nothing is published and nothing can be
    (a store no writer of this version has opened, in a folder this process may not write): the caller
    then reads the live catalog under a shared lock, as before versions."""
    from mrlstore.errors import StoreLockedError
    from mrlstore.tiers.locking import StoreLock

    head = usable_head(store)
    for attempt in range(3):  # again when the writer left without publishing: this reader publishes then
        try:
            lock = StoreLock(store, exclusive=False)
        except StoreLockedError:
            head = _await_writer(store, head)  # a live writer publishes for the readers it sees
            if head is None and (store / PUBLISHED_DIR / HEAD_FILE).exists():
                raise CorruptStoreError(
                    f"{store / PUBLISHED_DIR / HEAD_FILE} is unreadable (damaged?) while a writer holds the store: "
                    "its next commit publishes a new version for readers"
                ) from None
            if head is None and attempt < 2 and _writer_left(store):
                continue
            if head is None:
                raise
            return head
        try:
            return _published_if_trailing(store, head)
        finally:
            lock.release()
    raise AssertionError("unreachable: the last attempt returns or raises")


def _writer_left(store: Path) -> bool:
    """Whether no writer holds the store's lock now (a shared lock taken and let go at once)."""
    from mrlstore.errors import StoreLockedError
    from mrlstore.tiers.locking import StoreLock

    try:
        StoreLock(store, exclusive=False).release()
    except StoreLockedError:
        return False
    return True


def _published_if_trailing(store: Path, head: dict[str, Any] | None) -> dict[str, Any] | None:
    """``head``, or a new version of the live catalog if ``head`` trails it (None: publish one). The caller
    holds a shared StoreLock: no writer is alive."""
    from mrlstore.tiers.catalog import Catalog

    catalog = Catalog(store, read_only=True)  # a damaged catalog raises here, as for any open
    try:
        manifest = catalog.manifest()
        state = version_state(manifest, int(manifest["committed_rows"]), catalog.live_count())
        return _publish_if_allowed(store, catalog.snapshot_to, state) if trails(head, state) else head
    finally:
        catalog.close()


def _publish_over_damaged(store: Path) -> dict[str, Any] | None:
    """A new version in place of a published copy that does not open, if no writer is alive to publish one
    (None otherwise): readers were refused until some write published again."""
    from mrlstore.errors import StoreLockedError
    from mrlstore.tiers.locking import StoreLock

    try:
        lock = StoreLock(store, exclusive=False)
    except StoreLockedError:
        return None
    try:
        return _published_if_trailing(store, None)
    finally:
        lock.release()


def _await_writer(store: Path, head: dict[str, Any] | None) -> dict[str, Any] | None:
    """With a live writer: if it marked commits as not yet published, or nothing is published yet (a writer
    still opening a store it just made publishes when its open ends), wait (READER_WAIT_S at most) until it
    publishes them (the caller is registered as a reader, so it will)."""
    deadline = time.monotonic() + READER_WAIT_S
    while time.monotonic() < deadline:
        head = head or read_head(store)
        unpublished = head is None and not (store / PUBLISHED_DIR / HEAD_FILE).exists()  # not one damaged
        if not unpublished and not (store / PUBLISHED_DIR / PENDING_FILE).exists():
            break
        if unpublished and _writer_left(store):  # it will publish nothing: the caller can, now
            break
        time.sleep(0.02)
    return read_head(store) or head


class ReaderPresence:
    """A reader's mark on the store: a shared flock on published/READERS for as long as it is open (also a
    stand-in for the StoreLock readers of published versions do not take)."""

    def __init__(self, store: Path):
        self._fd = -1
        folder = store / PUBLISHED_DIR
        self._created = [] if folder.exists() else [folder]  # removed again if the open fails
        try:
            folder.mkdir(exist_ok=True)
            if not (folder / READERS_FILE).exists():
                self._created.insert(0, folder / READERS_FILE)
            self._fd = os.open(folder / READERS_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError:
            self.release()  # a folder this reader may not write: the writer publishes on its own schedule

    def release(self, remove_if_created: bool = False) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the flock
            self._fd = -1
        if remove_if_created:
            for path in self._created:
                try:
                    path.rmdir() if path.is_dir() else path.unlink()
                except OSError:
                    pass


class ReadersProbe:
    """The writer's view of the readers: whether any holds published/READERS."""

    def __init__(self, store: Path):
        folder = store / PUBLISHED_DIR
        if not folder.is_dir() and os.path.lexists(folder):
            folder.unlink()  # damage (every writer's open failed: FileExistsError): versions are copies, made again
        folder.mkdir(exist_ok=True)
        self._fd = os.open(store / PUBLISHED_DIR / READERS_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        self.pending_marker = store / PUBLISHED_DIR / PENDING_FILE

    def any(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _publish_if_allowed(store: Path, copy: Callable[[Path], None], state: dict[str, Any]) -> dict[str, Any] | None:
    from mrlstore.errors import MRLStoreError, StorageError

    try:
        return publish(store, copy, state)
    except OSError as e:
        if isinstance(e, MRLStoreError) and not isinstance(e, StorageError):
            raise
        # a folder this reader may not write, or a full disk: a published version would be stale, so the
        # reader reads the live catalog under a shared lock instead
        return None


def trails(head: dict[str, Any] | None, state: dict[str, Any]) -> bool:
    """Whether the published version ``head`` (None: none yet) is behind a catalog in ``state``."""
    return head is None or any(head.get(k) != v for k, v in state.items())


def version_state(manifest: dict[str, Any], committed_rows: int, live_rows: int) -> dict[str, Any]:
    """What tells whether a published version is behind the catalog."""
    return {
        "format_version": manifest.get("format_version"),  # compact() may remake the catalog alone
        "generation": int(manifest.get("generation", 0)),
        "committed_rows": committed_rows,
        "live_rows": live_rows,
        "tuned": hashlib.blake2b(json.dumps(manifest.get("tuned"), sort_keys=True).encode(), digest_size=8).hexdigest(),
        "indexes": hashlib.blake2b("".join(index_layout(manifest)).encode(), digest_size=8).hexdigest(),
    }


class Publisher:
    """A writer's publishing schedule: ``committed()`` after every change, ``close()`` at the end. Calls
    ``publish_now()`` with the store's write lock (``lock_of()``) held."""

    def __init__(
        self,
        publish_now: Callable[[], None],
        lock_of: Callable[[], AbstractContextManager[object]],
        readers: ReadersProbe,
        interval: float = PUBLISH_INTERVAL,
        gone: Callable[[], bool] = lambda: False,
    ):
        self._publish_now, self._lock_of, self.interval = publish_now, lock_of, interval
        self._gone = gone  # the store was closed by a failure (close() was not called): stop, publishing nothing
        self._readers = readers
        self._last = self._took = 0.0
        self._pending = False
        self._timer: threading.Timer | None = None
        self._closed = False

    def committed(self) -> None:
        """A change was committed (the caller holds the write lock)."""
        self._pending = True
        if not self._readers.any():  # nobody to publish for: say so, and look again later
            if not self._readers.pending_marker.exists():
                self._readers.pending_marker.touch()
            self._arm(self.interval)
            return
        wait = self._last + self._spacing() - time.monotonic()
        if wait <= 0:
            self._run()
        else:
            self._arm(wait)

    def _arm(self, wait: float) -> None:
        if self._timer is None and not self._closed:
            self._timer = threading.Timer(wait, self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def _spacing(self) -> float:
        """Seconds between publishes: the interval, or four times what the last publish took (a large
        catalog takes long to copy; the writer spends at most about a fifth of its time publishing)."""
        return max(self.interval, 4 * self._took)

    def _on_timer(self) -> None:
        with self._lock_of():
            self._timer = None
            if self._gone():
                self.stop()
                return
            if self._pending and not self._closed:
                self.committed()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._publish_now()
        except Exception as e:  # the commit itself is durable: readers just trail until the next publish
            warnings.warn(f"mrlstore could not publish a version for readers: {e}", RuntimeWarning, stacklevel=3)
            return
        self._pending = False
        self._last = time.monotonic()
        self._took = self._last - started

    def close(self) -> None:
        """Publish what is pending if readers are there, and stop the timer (the caller holds the write
        lock). Without readers PENDING stays: the next reader publishes the catalog itself."""
        if self._pending and self._readers.any():
            self._run()  # a timer firing meanwhile waits for the write lock, then finds the publisher closed
        self.stop()

    def stop(self) -> None:
        """Stop without publishing (the tiers are gone): the next writer's open publishes what trails."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        self._readers.close()


class Versions:
    """Which version of a store's files one handle has open, and keeping versions moving: a writer publishes
    for reader processes after its commits; a reader opens the newest published version (or, for a store on
    object storage, the newest uploaded one) and moves to newer ones on ``refresh``."""

    def __init__(
        self,
        path: Path,
        read_only: bool,
        remote: RemoteSource | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_dims: int | None = None,
    ):
        self.path, self.read_only, self.remote = path, read_only, remote
        self.cache_dir, self.local_dims = cache_dir, local_dims
        self.head: dict[str, Any] | None = None
        self.publisher: Publisher | None = None
        self._folder: HeldFolder | None = None  # a local reader's open folder (a compaction swaps another in)

    @property
    def location(self) -> str:
        """The store's folder, or the URL of a store on object storage (its small parts cached in ``path``)."""
        return self.remote.url if self.remote is not None else str(self.path)

    @property
    def version(self) -> int | None:
        """The published version open (None for a writer or a store never published)."""
        head = self.remote.head if self.remote is not None else self.head
        return None if head is None else int(head["version"])

    def holds(self, generation: int) -> bool:
        """Whether the store's folder still holds the row numbering this handle reads: a compaction swaps in
        a new folder, renumbered, which a local reader that has not refreshed does not read."""
        if not self.read_only or self.remote is not None or self.head is None:
            return True
        head = read_head(self.path)
        return head is not None and int(head.get("generation", 0)) == generation

    def take_checked(self) -> dict[str, str]:
        """Digests of the local copy's files downloaded and checked since the last call (see IndexSet)."""
        return {} if self.remote is None else self.remote.take_checked()

    def fetcher(self) -> Callable[[str], str | None] | None:
        """For a store on object storage, what downloads a part of the open version that its open left for
        later (an index loaded on first use) into the local copy, returning its checked digest."""
        remote, path = self.remote, self.path
        return None if remote is None else lambda part: remote.fetch_part(path, part)

    def _id_runs_fetcher(self) -> Callable[[], None] | None:
        """For a store on object storage, what downloads the open version's id runs (left for the first
        lookup by id: queries never need them)."""
        remote, path = self.remote, self.path
        if remote is None:
            return None
        runs = [part for part in remote.head.get("deferred", ()) if part.startswith(f"{ID_DIR}/")]

        def fetch() -> None:  # the runs are a cache: without them the catalog joins the ids they would find
            try:
                remote.fetch_parts(path, runs)
            except StoreNotFoundError:
                pass  # a version that newer publishes removed
            except CorruptStoreError as e:
                warnings.warn(f"{e}; looking ids up in the catalog instead", RuntimeWarning, stacklevel=2)

        return fetch

    def take_lock(self) -> HeldLock:
        """What keeps this handle's files consistent: nothing for a local copy of a remote version; for a
        reader, its registration (so a live writer publishes for it) and the newest version in ``head``, or a
        shared StoreLock over the live catalog for a store never published and not publishable here; for a
        writer, the exclusive StoreLock."""
        if self.remote is not None:
            return NoLock()
        if not self.read_only:
            return StoreLock(self.path, exclusive=True)
        presence = ReaderPresence(self.path)  # first: a live writer publishes for the readers it sees
        try:
            self.head = newest_version(self.path)
        except BaseException:
            presence.release(remove_if_created=True)
            raise
        if self.head is not None:
            return presence
        presence.release()
        return StoreLock(self.path, exclusive=False)

    def open_catalog(self) -> Catalog:
        """The live catalog (writers, unpublished stores), or the published version ``head`` names."""
        if not self.read_only or self.head is None:
            return Catalog(self.path, read_only=self.read_only, fetch_ids=self._id_runs_fetcher())
        catalog, self.head = _open_published(self.path, self.head)  # the head may be newer
        return catalog

    def open_bands(self, params: StoreParams) -> VectorTier:
        if self.remote is not None:
            from mrlstore.tiers.objectstore import RemoteBands

            return RemoteBands(self.path, params.dim, params.bands, params.dtype, self.remote, self.local_dims)
        return BandedVectors(self.path, params.dim, params.bands, params.dtype)

    # -- writers ---------------------------------------------------------------------------------------
    def start_publishing(self, state: StoreState) -> None:
        """Writers, on open: a publisher, and a version now if the newest one is behind the catalog."""
        if self.publisher is not None:
            self.publisher.close()
        self.publisher = Publisher(
            lambda: self.publish_version(state),
            lambda: state.write_lock,
            ReadersProbe(self.path),
            gone=lambda: state.closed,
        )
        if trails(usable_head(self.path), _state_of(state)):
            self.publisher.committed()  # published now if readers are waiting, else marked PENDING

    def publish_version(self, state: StoreState) -> None:
        """Publish the committed state for reader processes now (the caller holds the write lock)."""
        self.head = publish(self.path, state.catalog.snapshot_to, _state_of(state))

    def committed(self) -> None:
        """A change was committed (the caller holds the write lock)."""
        if self.publisher is not None:
            self.publisher.committed()

    def hold(self, folder: HeldFolder | None) -> None:
        """Keep ``folder``, the one a local reader opened its files in, in place of the one held before."""
        previous, self._folder = self._folder, folder
        if previous is not None and previous is not folder:
            previous.release()

    def close(self) -> None:
        """Stop publishing (a writer, its last version published) and let go of the folder (a reader)."""
        try:
            if self.publisher is not None:
                self.publisher.close()
                self.publisher = None  # it refers back here: a closed store would wait for the collector
        finally:
            self.hold(None)

    def stop(self) -> None:
        """Stop publishing without a last version (the tiers could not be opened again)."""
        if self.publisher is not None:
            self.publisher.stop()

    def publish(self, state: StoreState, url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
        """Upload the committed state to object storage as a new version there (see ``Store.publish``)."""
        if self.remote is not None:
            raise UnsupportedStorageError("publish() uploads a local store; this one is already on object storage")
        from mrlstore.tiers.objectstore import publish_store

        return publish_store(state, url, storage_options)

    # -- readers ---------------------------------------------------------------------------------------
    def refresh(self, state: StoreState, reopen: Reopen, open_beside: OpenBeside) -> bool:
        """Move to the newest version; True if there was a newer one. ``reopen(switch)`` closes the tiers,
        runs ``switch`` and opens them again (a new row numbering); ``open_beside(switch, undo)`` opens a new
        remote version before it closes the old one (``undo`` if that fails)."""
        if self.remote is not None:
            return self._refresh_remote(state, open_beside)
        if not self.read_only or self.head is None:
            return False
        with state.writing():  # one refresh at a time; HEAD read under it, so never an older one than ours
            head = read_head(self.path)
            if head is None or _key(head) == _key(self.head):
                return False

            def to_head() -> None:
                self.head = head

            # a compaction renumbered the rows, or tune fitted other codes: open the new version whole
            if head.get("generation", 0) != state.generation or not self._move_to(state, head):
                reopen(to_head)
        return True

    def _refresh_remote(self, state: StoreState, open_beside: OpenBeside) -> bool:
        """A store on object storage: a newer published version is downloaded (its small parts) and opened;
        if that fails, the reader stays on its version."""
        assert self.remote is not None
        old = self.remote, self.path  # before newer(): another refresh that moves meanwhile makes this one stale
        newer = self.remote.newer()
        if newer is None:
            return False
        try:
            path = newer.local_copy(self.cache_dir)
        except BaseException:
            newer.close()
            raise

        def to_newer() -> None:
            self.remote, self.path = newer, path

        def back() -> None:
            self.remote, self.path = old
            newer.close()

        with state.writing():
            if self.remote is not old[0]:  # another refresh moved meanwhile, to this version or a newer one
                newer.close()
                return False
            open_beside(to_newer, back)
        return True

    def _move_to(self, state: StoreState, head: dict[str, Any]) -> bool:
        """Same row numbering: the new rows into the prefix indexes (queries go on meanwhile), then the new
        catalog, snapshot and deletions swapped in at once. False, changing nothing, when the version found
        has another row numbering (the catalog ``head`` named was gone: a compaction) or its fitted codes or
        indexed prefixes are not the open ones."""
        catalog, head = _open_published(self.path, head)
        try:
            manifest = catalog.manifest()
            if (
                head.get("generation", 0) != state.generation  # a compaction since HEAD was read: renumbered
                or fit_id(manifest) != fit_id(state.manifest)
                or index_layout(manifest) != index_layout(state.manifest)
            ):
                catalog.close()
                return False
            old = state.snap
            snap = load_snapshot(catalog.live_items(), int(manifest["committed_rows"]), old.version + 1)
            if not self._mapped_in_place(state, snap):
                catalog.close()
                return False
            was_live = old.live[: old.watermark]
            newly_dead = np.flatnonzero(was_live & ~snap.live[: old.watermark])
        except BaseException:
            catalog.close()
            raise
        with state.visibility.write():
            previous, state.catalog = state.catalog, catalog
            state.snap, state.manifest, self.head = snap, manifest, head
            state.indexes.deleted(newly_dead)
        previous.close()
        return True

    def _mapped_in_place(self, state: StoreState, snap: Snapshot) -> bool:
        """The new rows into the prefix indexes and every array's maps (a compaction later swaps the folder:
        the maps keep this generation's files); False if one swapped before they were mapped."""
        try:
            state.indexes.extend_all(snap, state.vectors)
            state.vectors.map_committed(snap.watermark)
        except MRLStoreError:
            if self._opened_here():
                raise
            return False  # the swapped-in files are another numbering's: shorter, or missing
        return self._opened_here()

    def _opened_here(self) -> bool:
        """Whether the store's path is still the folder this reader opened."""
        return self._folder is not None and self._folder.is_at(self.path)


def fit_id(manifest: dict[str, Any]) -> str | None:
    """The id of the fitted projection a manifest holds (None: raw prefixes)."""
    return (manifest.get("fit") or {}).get("id")


def index_layout(manifest: dict[str, Any]) -> tuple[Any, ...]:
    """Which prefixes a manifest indexes, and how (``Store.set_index_dims`` changes them)."""
    return tuple(json.dumps(manifest.get(key), sort_keys=True) for key in INDEX_ENTRY_KEYS)


def _state_of(state: StoreState) -> dict[str, Any]:
    return version_state(state.manifest, state.snap.watermark, state.snap.n_live)


def _key(head: dict[str, Any]) -> tuple[int, int]:
    return int(head.get("generation", 0)), int(head["version"])


def _open_published(store: Path, head: dict[str, Any]) -> tuple[Catalog, dict[str, Any]]:
    """The published catalog ``head`` names, read-only, and that head; if the writer deleted it meanwhile (a
    reader between reading HEAD and opening the file), the newest one and its head."""
    for _ in range(5):
        try:
            catalog = Catalog(store, read_only=True, db_file=catalog_path(store, head))
        except (NotAStoreError, CorruptStoreError) as e:
            newer = read_head(store)
            if newer is None or newer == head:
                newer = _publish_over_damaged(store)
            if newer is None or newer == head:
                raise CorruptStoreError(
                    f"{store}: the published catalog {head.get('catalog')} that published/HEAD names is missing or "
                    f"unreadable ({e}); the live catalog is not affected: the writer's next commit or open "
                    "publishes a new version"
                ) from None
            head = newer
            continue
        if catalog.manifest().get("generation", 0) == head.get("generation", 0):
            return catalog, head
        catalog.close()  # a file of another generation under that name: never paired with these bands
        raise CorruptStoreError(f"{catalog.path} is not the catalog of generation {head.get('generation', 0)}")
    raise CorruptStoreError(f"{store}: published versions keep changing under the reader; try again")
