"""The store's folder on disk: creating it atomically, copying it consistently, and clearing the
temporaries of interrupted atomic writes (storage/FORMAT.md)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from mrlstore._fsutil import copy_sparse, fsync_dir, fsync_file
from mrlstore._version import __version__
from mrlstore.errors import MRLStoreError, StorageError, storage_error
from mrlstore.tiers.bands import GROUP_DIR, create_bands
from mrlstore.tiers.catalog import DB_FILE, Catalog
from mrlstore.tiers.id_index import ID_DIR
from mrlstore.tiers.locking import LOCK_FILE, WriteLease, pid_alive
from mrlstore.tiers.params import StoreParams

INDEX_DIR = "index"
STAGING_DIR = "staging"  # under the store's folder; a writer that opens the store clears what is left there
LEASE_FILE = "LEASE"  # in a staged write's folder: its workers write rows in place while it exists


def create_store(path: Path, config: StoreParams, generation: int = 0) -> None:
    """Build a new store in a temporary folder and rename it into place (creation is all-or-nothing);
    ``generation`` numbers its row layout (a compaction's new store gets the next one)."""
    manifest = config.manifest(created_by=f"mrlstore {__version__}")
    if generation:
        manifest["generation"] = generation
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        sharded = manifest["format_version"] >= 3
        create_bands(tmp, config.dim, config.bands, config.dtype, list(config.chunk_rows), {"mrlstore": manifest},
                     sharded=sharded)  # fmt: skip
        catalog = Catalog(tmp, read_only=False, create=True)
        try:
            catalog.create_schema(manifest)
        finally:
            catalog.close()
        (tmp / INDEX_DIR).mkdir()
        (tmp / LOCK_FILE).touch()
        fsync_tree(tmp)
        try:
            os.rename(tmp, path)  # also replaces an empty folder the user made
        except OSError:
            if not (path / DB_FILE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process created it first: open theirs
            return
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_store(src: Path, dest: Path, copy_catalog: Callable[[Path], None]) -> None:
    """Copy a store (its writer lock held by the caller) to ``dest``, atomically: vectors, index cache, and
    the catalog through ``copy_catalog(path)`` (a consistent point in time)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error("write a snapshot to", dest, e) from None
    for leftover, found in _own_leftovers(dest, "snapshot", r"(\d+)-\d+"):
        if not pid_alive(int(found[1])):  # what a snapshot killed part way left
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.snapshot-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src / GROUP_DIR, tmp / GROUP_DIR, copy_function=copy_sparse)
        if (src / INDEX_DIR).exists():
            shutil.copytree(src / INDEX_DIR, tmp / INDEX_DIR)
        else:
            (tmp / INDEX_DIR).mkdir()
        _copy_id_runs(src / ID_DIR, tmp / ID_DIR)
        copy_catalog(tmp / DB_FILE)
        (tmp / LOCK_FILE).touch()
        fsync_tree(tmp)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, shutil.Error):  # copytree gathers each file's OSError into one list of messages
            failures = e.args[0] if e.args and isinstance(e.args[0], list) and e.args[0] else [("", "", str(e))]
            raise StorageError(f"cannot write a snapshot to {dest}: {failures[0][-1]}") from None
        if isinstance(e, OSError) and not isinstance(e, MRLStoreError):
            raise storage_error("write a snapshot to", dest, e) from None
        raise


def _copy_id_runs(src: Path, dest: Path) -> None:
    """The id cache's runs (a cache: the copy's first writer drops those past its catalog). A reader's copy
    holds no lock that stops the writer's merges, so a run deleted meanwhile is left out (its pairs are in
    the merged run, or read from the catalog)."""
    dest.mkdir()
    for run in src.glob("*.run") if src.is_dir() else []:
        try:
            shutil.copyfile(run, dest / run.name)
        except (FileNotFoundError, IsADirectoryError):  # gone, or damage in a run's place (not copied)
            continue


def remove_stale_temporaries(path: Path) -> bool:
    """Temporary files of atomic writes that a killed writer never renamed, the fragments of a staged write
    that never committed, and the folder a killed compaction left beside the store (the caller holds the
    writer lock: no such write can be running). True when a staged write was left behind."""
    for pattern in (f"{GROUP_DIR}/*/.zarr.json.tmp-*", f"{INDEX_DIR}/.*.tmp-*", "published/.*.tmp-*"):
        for tmp in path.glob(pattern):
            tmp.unlink(missing_ok=True)
    # the folder is ".NAME.compact-PID" (and "..NAME.compact-PID.creating-..." while it is made)
    for leftover, _ in _own_leftovers(path, "compact", r"\d+", r"\d+\.creating-\d+-\d+"):
        shutil.rmtree(leftover, ignore_errors=True)
    for lease in path.glob(f"{STAGING_DIR}/*/{LEASE_FILE}"):
        WriteLease(lease).revoke()  # a dead write's workers may still live: no row of theirs after this
    staged = (path / STAGING_DIR).exists()
    shutil.rmtree(path / STAGING_DIR, ignore_errors=True)  # fragments of a staged write whose driver died
    return staged


def _own_leftovers(
    path: Path, kind: str, rest: str, hidden_rest: str | None = None
) -> Iterator[tuple[Path, re.Match[str]]]:
    """The temporary folders ``.NAME.<kind>-<rest>`` (``rest`` a regex) beside ``path``, and with
    ``hidden_rest`` those named ``..NAME.<kind>-<hidden_rest>``, with their match: a store named
    "NAME.<kind>-2" beside it is not one of them, nor the temporaries of a store named ".NAME", and
    "photos[2024]" is no glob pattern."""
    name = re.escape(path.name)
    forms = [rf"\.{name}\.{kind}-{rest}"] + ([rf"\.\.{name}\.{kind}-{hidden_rest}"] if hidden_rest else [])
    mine = re.compile("|".join(f"(?:{form})" for form in forms))
    for leftover in path.parent.glob(f"*.{glob.escape(path.name)}.{kind}-*"):
        if found := mine.fullmatch(leftover.name):
            yield leftover, found


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)
