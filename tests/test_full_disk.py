"""A full disk, a read-only folder: every verb that writes files fails with a typed StorageError (or, for
the index cache, which is rebuildable, a warning), holds no lock or descriptor afterwards, and the store
is consistent and writable once there is space again. Real tmpfs mounts (root only; skipped elsewhere)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import mrlstore

DIM = 64


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _fill(disk: Path) -> Path:
    """A file that takes every free block of ``disk``; delete it to free them."""
    filler = disk / "filler"
    block = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(filler, "ab", buffering=0) as f:  # the last partial block too
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def _descriptors_under(disk: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(disk)):
            found.append(target)
    return found


@pytest.fixture
def store_on_disk(mount_tmpfs):
    disk = mount_tmpfs("24m")
    path = disk / "s.mrl"
    with mrlstore.open(path, dim=DIM, bands=(16, DIM), index_dims=(16,)) as store:
        store.add_vectors(_vectors(2000), ids=[f"r{i}" for i in range(2000)])
        store.delete([f"r{i}" for i in range(0, 2000, 3)])
    return disk, path


def test_a_writer_open_on_a_full_disk_is_typed_and_holds_no_lock(store_on_disk):
    """The lock's pid could not be written: a bare OSError, and the descriptor kept the flock, so every
    later open said StoreLockedError until the process ended."""
    disk, path = store_on_disk
    filler = _fill(disk)
    with pytest.raises(mrlstore.StorageError, match="disk is full"):
        mrlstore.open(path)
    assert not _descriptors_under(disk)
    filler.unlink()
    with mrlstore.open(path) as store:
        assert len(store) == 1333 and store.verify() == []


def test_compact_and_snapshot_on_a_full_disk_are_typed_and_change_nothing(store_on_disk, tmp_path):
    disk, path = store_on_disk
    with mrlstore.open(path) as store:
        filler = _fill(disk)
        with pytest.raises(mrlstore.StorageError, match="disk is full|No space left"):
            store.compact()
        with pytest.raises(mrlstore.StorageError, match="snapshot.*(disk is full|No space left)"):
            store.snapshot(disk / "copy.mrl")  # was shutil.Error, which no MRLStoreError handler catches
        filler.unlink()
        assert len(store) == 1333 and store.verify() == []
        assert store.compact().rows_after == 1333
        assert store.get(["r1"]).num_rows == 1
    assert not _descriptors_under(disk)
    assert sorted(p.name for p in disk.iterdir()) == ["s.mrl"]  # no temporary copy left beside it


def test_an_index_folder_it_cannot_write_warns_and_never_fails_a_committed_add(store_on_disk):
    """hnswlib writes nothing to a read-only folder and says nothing: the save's check raised a bare
    FileNotFoundError out of add_vectors after its commit, and out of checkpoint() and close()."""
    _, path = store_on_disk
    index = path / "index"
    subprocess.run(["mount", "--bind", str(index), str(index)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(index)], check=True)
        with mrlstore.open(path) as store, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store.add_vectors(_vectors(300, seed=1), ids=[f"n{i}" for i in range(300)])
            store.checkpoint()
        assert any("stays in memory" in str(w.message) for w in caught)
    finally:
        subprocess.run(["umount", "-l", str(index)], check=False)
    with mrlstore.open(path) as store:
        assert len(store) == 1633 and store.verify() == []
        assert store.query(_vectors(300, seed=1)[7], k=1).ids == ["n7"]


def test_set_index_dims_that_cannot_delete_the_old_index_files_returns_committed(store_on_disk):
    """It committed the new prefixes, then raised a bare OSError (EROFS) removing the dropped prefix's files:
    a call that raised had changed the store."""
    _, path = store_on_disk
    index = path / "index"
    with mrlstore.open(path) as store:
        store.checkpoint()  # the 16-d index saved: the file the change drops
        subprocess.run(["mount", "--bind", str(index), str(index)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(index)], check=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the new index stays in memory (warned)
                store.set_index_dims((32,))
            assert store.config.index_dims == (32,)
        finally:
            subprocess.run(["umount", "-l", str(index)], check=False)
    assert list(index.glob("prefix_00016*"))  # left for the next writer's open
    with mrlstore.open(path) as store:
        assert store.config.index_dims == (32,) and store.verify() == []
        assert not list(index.glob("prefix_00016*"))


def test_a_writer_killed_mid_append_reopens_on_the_disk_it_filled(store_on_disk):
    """The open rewrote the arrays' metadata (new space) before deleting the chunk files of the append that
    never committed (what frees space): a bare OSError, and no writer could open until space was freed."""
    disk, path = store_on_disk
    leftovers = []
    for first in (path / "vectors").glob("*/c/0/0"):  # what a killed append leaves: chunks past the watermark
        leftovers.append(first.parent.parent / "7" / "0")
        leftovers[-1].parent.mkdir()
        shutil.copy(first, leftovers[-1])
        meta = first.parent.parent.parent / "zarr.json"  # the arrays grown first, as every append does
        grown = json.loads(meta.read_text())
        grown["shape"][0] = 8 * grown["chunk_grid"]["configuration"]["chunk_shape"][0]
        meta.write_text(json.dumps(grown))
    (path / "LOCK").write_text("999999\n")  # and its pid
    filler = _fill(disk)
    with mrlstore.open(path) as store:
        assert len(store) == 1333 and not any(f.exists() for f in leftovers)
    filler.unlink()
    with mrlstore.open(path) as store:
        assert store.verify(full=True) == []


def test_a_commit_whose_checkpoint_finds_the_disk_full_closes_the_store_saying_why(mount_tmpfs):
    """DuckDB checkpoints at the commit that takes its log past 16 MB; on a full disk that is a fatal error,
    after which it refuses every statement. The add said CorruptStoreError ("database has been invalidated")
    and the handle stayed open, every later call saying the same, even with space again."""
    disk = mount_tmpfs("64m")
    path = disk / "s.mrl"
    store = mrlstore.open(path, dim=8)
    wal = path / "catalog.duckdb.wal"

    def add(batch: int) -> None:
        labels = [{"label": f"{batch}-{i}-" + "x" * 2000} for i in range(1000)]
        store.add_vectors(np.ones((1000, 8), np.float32), ids=[f"{batch}-{i}" for i in range(1000)], metadata=labels)

    batch = 0
    while not wal.exists() or wal.stat().st_size < 14_500_000:  # the next add's 2 MB take it past 16 MB
        add(batch)
        batch += 1
    before = len(store)
    filler = _fill(disk)
    os.truncate(filler, filler.stat().st_size - 3_000_000)  # room for the add, not for the checkpoint
    with pytest.raises(mrlstore.StorageError, match="No space left.*the store closed: open it again"):
        add(batch)
    with pytest.raises(mrlstore.StoreClosedError, match="DuckDB stopped its catalog"):
        len(store)
    store.close()
    for _ in range(100):  # its publishing timer stops at its next turn (it re-armed forever, touching PENDING)
        if not any(isinstance(t, threading.Timer) for t in threading.enumerate()):
            break
        time.sleep(0.05)
    assert not any(isinstance(t, threading.Timer) for t in threading.enumerate())
    filler.unlink()
    with mrlstore.open(path) as again:
        assert len(again) in (before, before + 1000) and again.verify(full=True) == []


def test_a_snapshot_killed_part_way_leaves_nothing_after_the_next(tmp_path):
    with mrlstore.open(tmp_path / "s.mrl", dim=DIM, bands=(16, DIM), index_dims=(16,)) as store:
        store.add_vectors(_vectors(50), ids=[f"r{i}" for i in range(50)])
        dead = _a_dead_pid()
        (tmp_path / f".copy.mrl.snapshot-{dead}-1" / "vectors").mkdir(parents=True)  # a killed snapshot's copy
        live = tmp_path / f".copy.mrl.snapshot-{os.getpid()}-99"  # one that may still be running
        live.mkdir()
        other = tmp_path / f".copy.mrl.x.snapshot-{dead}-1"  # another destination's
        other.mkdir()
        store.snapshot(tmp_path / "copy.mrl")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([live.name, other.name])


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


ID_RUN_ON_A_FULL_DISK = """
import errno, sys
from pathlib import Path
import numpy as np
import mrlstore
from mrlstore.tiers import id_index

disk = Path(sys.argv[1])
real = id_index.IdIndex._write_run


def disk_full_first(*args, **kwargs):  # the disk fills between the catalog's commit and the id run
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        f.truncate(f.tell() - 65536)  # room for the run's header, not for its 1.1 MB of pairs
    return real(*args, **kwargs)


store = mrlstore.open(disk / "s.mrl", dim=8)
id_index.IdIndex._write_run = disk_full_first
store.add_vectors(np.ones((70_000, 8), np.float32), ids=[f"n{i}" for i in range(70_000)])
print("returned", len(store), store.get(["n69999"]).num_rows, flush=True)
store.close()
"""


def test_an_add_whose_id_run_finds_the_disk_full_returns_committed(mount_tmpfs, tmp_path):
    """The id run (16 bytes a row, written after the commit once 65,536 rows wait) was a sparse file written
    through a memory map: a page the full disk could not give killed the process (SIGBUS), no exception."""
    disk = mount_tmpfs("24m")
    script = tmp_path / "id_run.py"
    script.write_text(ID_RUN_ON_A_FULL_DISK)
    done = subprocess.run([sys.executable, str(script), str(disk)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout == "returned 70000 1\n"
    assert not list((disk / "s.mrl" / "ids").glob(".*.tmp-*"))  # what the failed run took is given back
    (disk / "filler").unlink()
    with mrlstore.open(disk / "s.mrl") as store:
        assert len(store) == 70_000 and store.verify(full=True) == []
        assert store.get(["n0", "n69999"]).num_rows == 2


def _as_nobody(run) -> str:
    """``run()`` in a forked child that became the user nobody (root reads every file whatever its mode);
    returns what it returned, or the error it raised as "TypeName: message"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: everything it needs is imported already (the venv may be closed to nobody)
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            said = str(run())
        except BaseException as e:
            said = f"{type(e).__name__}: {e}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    return said


@pytest.mark.parametrize("unreadable", ["vectors", "vectors/band_00016_00064/c/0/0", "published", ""])
def test_files_this_user_may_not_read_are_a_storage_error_naming_them(tmp_path, unreadable):
    """Bare PermissionErrors came out of open(), verify() and queries (no MRLStoreError handler caught them);
    an unreadable folder even made the error's own message fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    base = Path(tempfile.mkdtemp())
    try:
        os.chmod(base, 0o755)
        with mrlstore.open(base / "s", dim=DIM, bands=(16, DIM)) as store:
            store.add_vectors(_vectors(100))
        with mrlstore.open(base / "s", read_only=True):  # a reader's open makes published/
            pass
        subprocess.run(["chmod", "-R", "a+rwX", str(base)], check=True)
        os.chmod(base / "s" / unreadable, 0)
        said = _as_nobody(lambda: mrlstore.open(base / "s", read_only=unreadable != "published").close())
        assert said.startswith("StorageError: cannot ") and "permission denied" in said, said
        assert str(base / "s" / unreadable).rstrip("/") in said, said
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("read_only", [True, False])
def test_an_index_file_this_user_may_not_read_is_rebuilt_like_a_damaged_one(tmp_path, read_only):
    """The index files are a cache of the committed rows: the open failed with StorageError instead."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    base, x = Path(tempfile.mkdtemp()), _vectors(500)
    try:
        os.chmod(base, 0o755)
        with mrlstore.open(base / "s", dim=DIM, bands=(16, DIM), index_dims=(16,)) as store:
            store.add_vectors(x, ids=[str(i) for i in range(500)])
        subprocess.run(["chown", "-R", "nobody", str(base / "s")], check=True)
        os.chmod(base / "s" / "index" / "prefix_00016.hnsw", 0)

        def open_and_query() -> tuple:
            with mrlstore.open(base / "s", read_only=read_only) as store:
                return store.index_status, store.query(x[7], k=1, dims=[16, DIM], shortlist=50).ids

        assert _as_nobody(open_and_query) == str(({16: "rebuilt"}, ["7"]))
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_verify_reports_a_chunk_file_it_cannot_read_or_that_is_a_folder(tmp_path):
    """verify() raised a bare PermissionError for the first, and called the second 4096 bytes long."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    base = Path(tempfile.mkdtemp())
    chunk = base / "s" / "vectors" / "band_00016_00064" / "c" / "0" / "0"
    try:
        os.chmod(base, 0o755)
        with mrlstore.open(base / "s", dim=DIM, bands=(16, DIM)) as store:
            store.add_vectors(_vectors(100))
        subprocess.run(["chown", "-R", "nobody", str(base / "s")], check=True)

        def verify_after_chmod() -> list[str]:
            with mrlstore.open(base / "s", read_only=True) as reader:
                os.chmod(chunk, 0)
                return reader.verify()

        assert _as_nobody(verify_after_chmod) == str([f"chunk file {chunk} holding committed rows cannot be read "
                                                      "(permission denied)"])  # fmt: skip
        os.chmod(chunk, 0o644)
        with mrlstore.open(base / "s", read_only=True) as reader:
            chunk.unlink()
            chunk.mkdir()
            assert reader.verify() == [f"chunk file {chunk} holding committed rows is not a file"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
