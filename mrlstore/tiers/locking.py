"""One writer per store, across threads and processes (an advisory flock on the store's LOCK file), and the
lease under which a staged write's workers write rows in place for that writer."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mrlstore.errors import MRLStoreError, StoreLockedError, WriteEndedError, storage_error

LOCK_FILE = "LOCK"
READER_WAIT_S = 5.0
LEASE_WAIT_S = 120.0  # a worker holds a staged write's lease for one block's write (seconds)


class StoreLock:
    def __init__(self, store_path: Path, exclusive: bool):
        self.path = Path(store_path) / LOCK_FILE
        self.created = False  # so a failed open can remove the file it made
        self.exclusive = exclusive
        self._fd = -1
        try:
            self._take(store_path)
        except OSError as e:  # a full disk, a read-only file system: typed, and nothing held
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if isinstance(e, MRLStoreError):
                raise
            raise storage_error("take the lock" if exclusive else "read the lock", self.path, e) from None

    def _take(self, store_path: Path) -> None:
        if self.exclusive:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.created = True
            except FileExistsError:
                self._fd = os.open(self.path, os.O_RDWR)
        else:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return  # every writer creates LOCK first: without one, no writer is there
        try:
            self._acquire()
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = -1
            if self.exclusive:
                raise StoreLockedError(
                    f"{store_path} is already open for writing{holder}; one writer at a time: close that one "
                    "to write here, or open this one with read_only=True, which works at any time, beside a live "
                    "writer"
                ) from None
            raise StoreLockedError(f"{store_path} is open for writing{holder}; readers must wait for it") from None
        if self.exclusive:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _acquire(self) -> None:
        """The flock, or BlockingIOError. A writer waits up to READER_WAIT_S for readers: they hold the lock
        only while they bring the published version up to date (versions.newest_version)."""
        mode = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + READER_WAIT_S
        while True:
            try:
                fcntl.flock(self._fd, mode)
                return
            except BlockingIOError:
                if not self.exclusive or self._writer_pid() or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _writer_pid(self) -> str:
        try:
            pid = os.pread(self._fd, 32, 0).decode().strip()
        except OSError:
            return ""
        return pid if pid.isdigit() and pid_alive(int(pid)) else ""

    def _holder(self) -> str:
        """Who holds the lock: the writer's pid is in LOCK while it lives; readers write nothing, so a pid
        of a process that has exited means readers hold it now."""
        pid = self._writer_pid()
        if pid == str(os.getpid()):
            return " by this process (another Store object, or one not closed yet)"
        if pid:
            return f" by process {pid}"
        return " by a reader (another process has it open read_only)" if self.exclusive else ""

    def release(self, remove_if_created: bool = False) -> None:
        if self._fd >= 0:
            if remove_if_created and self.created:
                self.path.unlink(missing_ok=True)
            if self.exclusive:
                os.ftruncate(self._fd, 0)  # no stale pid for the next error message
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class NoLock:
    """Stands in for a StoreLock where none is taken (readers of published versions, a store being built)."""

    def release(self, remove_if_created: bool = False) -> None:
        pass


class WriteLease:
    """A file that lets a staged write's workers write rows in place, beside the writer that holds the store's
    lock: each worker holds it shared while it writes; the writer revokes it (takes it exclusively, waiting
    for writes in flight, and deletes it) before it commits or clears those rows, so a worker of a write that
    ended (its driver killed, its task given up) never writes again. flock: one machine, or a shared file
    system whose locks reach every worker."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def grant(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))

    @contextmanager
    def held(self) -> Iterator[None]:
        """Shared, for one worker's write; WriteEndedError when the lease was revoked."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise WriteEndedError(f"{self.path}: the write this task belongs to has ended") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # revoked between our open and our lock
                raise WriteEndedError(f"{self.path}: the write this task belongs to has ended")
            yield
        finally:
            os.close(fd)

    def revoke(self, timeout: float = LEASE_WAIT_S) -> None:
        """Wait for the workers' writes in flight, then end the lease (no-op when already ended);
        StoreLockedError if a worker still holds it after ``timeout`` seconds (a stopped or hung process)."""
        try:
            fd = os.open(self.path, os.O_RDWR)  # over NFS an exclusive lock needs a file open for writing
        except FileNotFoundError:
            return
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreLockedError(
                            f"a worker of a staged write still holds {self.path} after {timeout:.0f} s; end that "
                            "process (a Ray worker of a write that ended), then open the store again"
                        ) from None
                    time.sleep(0.01)
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return pid != 0
