"""Small durable-file helpers shared by the tiers (no engine imports)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeGuard

from mrlstore.errors import InvalidInputError, UnsupportedStorageError


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``: pwrite may write less than asked (a signal, a full disk part way)
    and says so only in its return value."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset} ({len(view)} bytes left)")
        view, offset = view[written:], offset + written


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content after any crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_file(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """fsync a finished temporary file and atomically rename it into place."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


_COPY_BLOCK = 1 << 20
_PAGE = 4096
_ZEROS = bytes(_COPY_BLOCK)


def copy_sparse(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file leaving all-zero pages as holes: the store's preallocated chunk files are mostly holes,
    and a plain copy fills them (a 3.7 MB store's snapshot wrote 187 MB)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        while block := fi.read(_COPY_BLOCK):
            if block == _ZEROS[: len(block)]:
                fo.seek(len(block), os.SEEK_CUR)
                continue
            view = memoryview(block)
            for lo in range(0, len(block), _PAGE):  # data and holes share blocks at the edge of the data
                page = view[lo : lo + _PAGE]
                if page == _ZEROS[: len(page)]:
                    fo.seek(len(page), os.SEEK_CUR)
                else:
                    fo.write(page)
        fo.truncate(size)


def folder_id(path: Path) -> tuple[int, int] | None:
    """The identity of the folder at ``path`` (device, inode; None if absent): a compaction swaps in another."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class HeldFolder:
    """A folder held open, so that its identity (device, inode) names no other folder while held: a compaction
    deletes the folder it swapped out, and ext4 gives its inode to the next folder made (a reader checking
    "is my folder still there?" by identity alone took a later compaction's folder for its own)."""

    _fd: int | None = None  # until opened: an __init__ interrupted before it had nothing to release

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        info = os.fstat(self._fd)
        self.identity = info.st_dev, info.st_ino

    def is_at(self, path: Path) -> bool:
        """Whether ``path`` is still this folder."""
        return folder_id(path) == self.identity

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def hold_folder(path: Path) -> HeldFolder | None:
    """The folder at ``path`` held (None if absent)."""
    try:
        return HeldFolder(path)
    except OSError:
        return None


def is_url(path: object) -> TypeGuard[str]:
    """Whether ``path`` names a store on object storage (``s3://...``) rather than a local folder."""
    return isinstance(path, str) and "://" in path


def local_destination(dest: str | os.PathLike[str], what: str, store: Path) -> Path:
    """``dest`` as a local path; a URL is refused before anything is written (``Path("s3://b/x")`` would be
    the local folder ``s3:/b/x``), and so is a path inside the folder of ``store`` (its next compaction
    swaps the whole folder away, and what was written there with it)."""
    if is_url(dest):
        raise UnsupportedStorageError(
            f"{dest} is a URL: {what} writes local files (publish() uploads a store to object storage)"
        )
    target = local_path(dest)
    if target.is_relative_to(local_path(store)):  # resolved alike (a remote store's cache may be a link)
        raise InvalidInputError(
            f"{what} destination {target} is inside the store's folder {store}, which a compaction replaces "
            "whole: write it outside"
        )
    return target


def local_path(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, ``~`` expanded, symlinks resolved: DuckDB expands ``~`` where Python does not (a
    store at "~/x" had its catalog in the home folder and its other files under a folder named "~"); a
    relative path resolved again after ``os.chdir`` put a store's later chunks in another folder than its
    catalog; and a compaction of a store opened through a link swapped the link for the compacted folder,
    leaving the linked folder, uncompacted, as a second store that a writer could open beside it."""
    return Path(os.path.realpath(os.path.expanduser(path)))
