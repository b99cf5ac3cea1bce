"""Locks name their real holder and outlive no process; URLs are refused before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mrlstore


@pytest.mark.parametrize("url", ["s3://bucket/x.mrl", "gs://b/x.mrl", "memory://x", "https://example.com/x.mrl"])
def test_a_url_is_a_clear_error_and_leaves_nothing_behind(tmp_path, url, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mrlstore.UnsupportedStorageError, match="URL") as info:
        mrlstore.open(url, dim=64)
    assert isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []


def _hold(path, read_only: bool) -> subprocess.Popen:
    code = (
        "import sys, time, mrlstore\n"
        f"s = mrlstore.open({str(path)!r}, read_only={read_only})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _store(path):
    with mrlstore.open(path, dim=16, bands=(8, 16), index_dims=(8,)) as s:
        s.add_vectors(np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32))


def test_the_error_names_a_live_writer_not_a_stale_pid(tmp_path):
    path = tmp_path / "s"
    _store(path)
    writer = _hold(path, read_only=False)
    try:
        with pytest.raises(mrlstore.StoreLockedError, match=f"by process {writer.pid}"):
            mrlstore.open(path)
    finally:
        writer.kill()
        writer.wait()
    reader = _hold(path, read_only=True)
    try:  # readers of published versions never block a writer (and no dead writer is blamed for anything)
        with mrlstore.open(path) as store:
            assert len(store) == 20
    finally:
        reader.kill()
        reader.wait()


def test_a_sigkilled_writer_leaves_no_lock_behind(tmp_path):
    path = tmp_path / "s"
    _store(path)
    writer = _hold(path, read_only=False)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops the dead process's flock: the next writer takes over
        try:
            with mrlstore.open(path) as s:
                assert len(s) == 20
                s.add_vectors(np.ones((1, 16), np.float32), ids=["after"])
            break
        except mrlstore.StoreLockedError:
            assert time.time() < deadline
            time.sleep(0.1)
    with mrlstore.open(path, read_only=True) as s:
        assert len(s) == 21
