"""One writer at a time, in this process and in others; readers beside a writer.
Fixtures: conftest.py; helpers: errors_support.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from errors_support import (
    N,
    raises,
    vecs,
)

import mrlstore


# -- one writer at a time ---------------------------------------------------------------------------------
def test_second_writer_in_the_same_process(store: mrlstore.Store) -> None:
    held = "already open for writing by this process.*read_only=True, which works at any time"
    with raises(mrlstore.StoreLockedError, BlockingIOError, match=held):
        mrlstore.open(store.path)
    # the failed attempt did not take the lock away from the first writer
    with raises(mrlstore.StoreLockedError, BlockingIOError):
        mrlstore.open(store.path)
    store.add_vectors(vecs(1, seed=4), ids=["still-writable"])
    store.close()
    with mrlstore.open(store.path) as s:
        assert len(s) == N + 1


def test_reader_while_a_writer_is_open_in_the_same_process(store: mrlstore.Store) -> None:
    with mrlstore.open(store.path, read_only=True) as reader:  # the writer's published version
        assert len(reader) == len(store)


def test_writer_while_a_reader_is_open_in_the_same_process(closed_path: Path) -> None:
    with mrlstore.open(closed_path, read_only=True), mrlstore.open(closed_path) as writer:  # readers never block
        assert len(writer) == N


CHILD_OPEN = textwrap.dedent(
    """
    import sys
    import mrlstore
    try:
        s = mrlstore.open(sys.argv[1], read_only=sys.argv[2] == "1")
    except Exception as e:
        print(type(e).__name__, isinstance(e, mrlstore.MRLStoreError), isinstance(e, BlockingIOError))
    else:
        s.close()
        print("opened")
    """
)

CHILD_HOLD = textwrap.dedent(
    """
    import sys
    import mrlstore
    s = mrlstore.open(sys.argv[1], read_only=sys.argv[2] == "1")
    print("ready", flush=True)
    sys.stdin.read()
    s.close()
    """
)


def _run_child_open(path: Path, read_only: bool) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHILD_OPEN, str(path), "1" if read_only else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("child_read_only", [False, True], ids=["child-writer", "child-reader"])
def test_second_opener_in_another_process_while_we_write(store: mrlstore.Store, child_read_only: bool) -> None:
    expected = "opened" if child_read_only else "StoreLockedError True True"  # one writer; readers welcome
    assert _run_child_open(store.path, child_read_only) == expected
    store.add_vectors(vecs(1, seed=4), ids=["still-writable"])


@contextmanager
def _holder(path: Path, read_only: bool) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLD, str(path), "1" if read_only else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("read_only", [True, False], ids=["reader", "writer"])
def test_open_while_a_writer_in_another_process_holds_the_store(closed_path: Path, read_only: bool) -> None:
    with _holder(closed_path, read_only=False):
        if read_only:
            with mrlstore.open(closed_path, read_only=True) as s:  # the writer's published version
                assert len(s) == N
        else:
            with raises(mrlstore.StoreLockedError, BlockingIOError, match="already open"):
                mrlstore.open(closed_path)
    with mrlstore.open(closed_path, read_only=read_only) as s:  # free again once the other process is gone
        assert len(s) == N


def test_writer_while_a_reader_in_another_process_holds_the_store(closed_path: Path) -> None:
    with _holder(closed_path, read_only=True), mrlstore.open(closed_path) as writer:  # readers never block it
        writer.add_vectors(vecs(1, seed=5), ids=["while-read"])


def test_readers_in_two_processes_are_fine(closed_path: Path) -> None:
    with mrlstore.open(closed_path, read_only=True):
        assert _run_child_open(closed_path, read_only=True) == "opened"


# a daemon thread adding ``x`` to ``store`` again and again until the store closes, for a second
ADDING_IN_A_DAEMON_THREAD = """
def keep_adding():
    for i in range(10**6):
        try:
            store.add_vectors(x, ids=[f"{i}-{j}" for j in range(len(x))])
        except mrlstore.StoreClosedError:
            return

threading.Thread(target=keep_adding, daemon=True).start()
time.sleep(1.0)
"""

LEFT_OPEN_AT_EXIT = textwrap.dedent(
    """
    import sys, threading, time
    import numpy as np
    import mrlstore

    store = mrlstore.open(sys.argv[1], dim=64)
    reader = mrlstore.open(sys.argv[1], read_only=True)  # so the writer's timer publishes for it
    x = np.random.default_rng(0).standard_normal((2000, 64), dtype=np.float32)

    ADDING_IN_A_DAEMON_THREAD
    print(len(store), flush=True)  # and exit with both handles open, an add under way
    """
).replace("ADDING_IN_A_DAEMON_THREAD", ADDING_IN_A_DAEMON_THREAD)


def test_stores_left_open_at_exit_close_while_a_daemon_thread_adds(tmp_path: Path) -> None:
    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN_AT_EXIT)
    path = tmp_path / "s"
    for _ in range(2):
        # before: the garbage collector closed the store after the exit froze the adding thread, lock held:
        # a hang, or hnswlib's threads aborting the process
        done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        with mrlstore.open(path) as store:
            assert store.verify() == [] and len(store) % 2000 == 0 and len(store) >= int(done.stdout)


FORKED_WHILE_ADDING = textwrap.dedent(
    """
    import os, subprocess, sys, threading, time
    import numpy as np
    import mrlstore

    store = mrlstore.open(sys.argv[1], dim=32, index_dims=(8,))
    x = np.random.default_rng(0).standard_normal((20000, 32)).astype(np.float32)

    ADDING_IN_A_DAEMON_THREAD
    pid = os.fork()  # most likely while the thread holds the store's write lock
    if pid == 0:
        sys.exit(0)  # the parent's store is not the child's to close
    deadline = time.monotonic() + 60
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            sys.exit("the child hung at exit")
        time.sleep(0.1)
    other = [sys.executable, "-c", f"import mrlstore; mrlstore.open({sys.argv[1]!r})"]
    print(subprocess.run(other, capture_output=True, text=True).stderr.strip().splitlines()[-1], flush=True)
    """
).replace("ADDING_IN_A_DAEMON_THREAD", ADDING_IN_A_DAEMON_THREAD)


def test_a_forked_child_leaves_its_parents_store_alone_at_exit(tmp_path: Path) -> None:
    """Closing the parent's store at the child's exit waited for a lock a parent thread held at the fork
    (the child hung), crashed in DuckDB, or would have released the parent's writer lock."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED_WHILE_ADDING)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "StoreLockedError" in done.stdout  # the parent still held its lock after the child's exit
    with mrlstore.open(tmp_path / "s") as store:
        assert store.verify() == [] and len(store) % 20000 == 0
