"""Calls racing one another across threads and processes (helper-found defects, each reproduced first):
report() beside close() and compact() (it read freed maps: a segfault), calls beside close() (told of a
corrupt store or bad SQL), readers opening while the writer compacts, and refreshes in several threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import mrlstore

DIM = 64


def _store(path: Path, n: int = 3000) -> mrlstore.Store:
    store = mrlstore.open(path, dim=DIM, bands=(16, DIM), index_dims=(16,))
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    store.add_vectors(vectors, ids=[f"r{i}" for i in range(n)], metadata=[{"n": i} for i in range(n)])
    return store


REPORT_RACE = textwrap.dedent(
    """
    import shutil, sys, threading, time, numpy as np, mrlstore
    sys.path.insert(0, sys.argv[2])
    from test_races import _store
    _store(f"{sys.argv[1]}/base", n=20000).close()
    for trial in range(10):
        shutil.copytree(f"{sys.argv[1]}/base", f"{sys.argv[1]}/s{trial}")
        store = mrlstore.open(f"{sys.argv[1]}/s{trial}")
        outcome = []
        def run():
            try:
                outcome.append(store.report(sample=200).num_rows)
            except mrlstore.StoreClosedError as e:
                outcome.append("closed")
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.02 + 0.15 * (trial % 5))
        if trial % 2:
            store.delete([f"r{i}" for i in range(0, 20000, 3)])
            store.compact()
        store.close()
        thread.join()
        print(trial, outcome, flush=True)
    """
)


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
def test_report_beside_close_and_compact_finishes_or_says_closed(tmp_path):
    """report() took no lock: close() and compaction unmapped the bands its native scans were reading."""
    script = tmp_path / "race.py"
    script.write_text(REPORT_RACE)
    out = subprocess.run([sys.executable, "-X", "faulthandler", str(script), str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.splitlines()) == 10


def test_calls_racing_close_get_store_closed_error(tmp_path):
    """Checked before the lock and not again under it, get, sql, delete and verify reached the closed catalog:
    CorruptStoreError and InvalidFilterError for a store that was only closed."""
    store = _store(tmp_path / "s", n=1000)
    calls = {
        "get": lambda: store.get(["r1", "r2"]),
        "sql": lambda: store.sql("SELECT count(*) FROM items"),
        "delete": lambda: store.delete(["nope"], missing_ok=True),
        "verify": lambda: store.verify(),
        "query": lambda: store.query(np.ones(DIM, np.float32), k=3),
    }
    after_close: dict[str, BaseException] = {}
    closed = threading.Event()

    def loop(name: str) -> None:
        while True:
            try:
                calls[name]()
            except BaseException as e:  # noqa: BLE001 - every kind is recorded and judged below
                if closed.is_set() or isinstance(e, mrlstore.StoreClosedError):
                    after_close[name] = e
                    return
                raise

    threads = [threading.Thread(target=loop, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    store.close()
    closed.set()
    for thread in threads:
        thread.join(timeout=30)
    assert {name: type(e).__name__ for name, e in after_close.items()} == dict.fromkeys(calls, "StoreClosedError")


WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np, mrlstore
    path, seconds = sys.argv[1], float(sys.argv[2])
    def batch(b):
        return np.random.default_rng(1000 + b).standard_normal((50, 32)).astype(np.float32)
    with mrlstore.open(path, dim=32, index_dims=[8]) as store:
        b, end, last = 0, time.monotonic() + seconds, time.monotonic()
        while time.monotonic() < end:
            store.add_vectors(batch(b), ids=[f"b{b}-{j}" for j in range(50)])
            if b % 5 == 4:
                store.delete([f"b{b - 3}-{j}" for j in range(50)])
            if b == 10:
                print("ready", flush=True)
            if time.monotonic() - last > 0.7:
                store.compact()
                last = time.monotonic()
            b += 1
            time.sleep(0.005)
    """
)


def _batch(b: int) -> np.ndarray:
    return np.random.default_rng(1000 + b).standard_normal((50, 32)).astype(np.float32)


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
@pytest.mark.parametrize("threads", [1, 4])
def test_readers_open_and_refresh_while_the_writer_compacts(tmp_path, threads):
    """A reader opening during a compaction met a folder with no version yet (StoreLockedError), or paired
    the old generation's catalog with the new bands (CorruptStoreError); refreshes in several threads read
    HEAD outside the lock and one moved back to an older version (a raw ValueError)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "s.mrl"
    writer = subprocess.Popen([sys.executable, str(script), str(path), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        end, opens = time.monotonic() + 6, 0
        while time.monotonic() < end:
            with mrlstore.open(path, read_only=True) as reader:
                opens += 1
                errors: list[BaseException] = []
                _refresh_in_threads(reader, threads, errors)
                assert not errors, errors[:3]
                ids = reader.sql("SELECT id FROM items ORDER BY random() LIMIT 20").column("id").to_pylist()
                for row in reader.get(ids).to_pylist():
                    b, j = map(int, row["id"][1:].split("-"))
                    np.testing.assert_allclose(row["vector"], _batch(b)[j], atol=2e-2, rtol=2e-3)
                assert len(reader) == reader.sql("SELECT count(*) AS n FROM items").column("n")[0].as_py()
        assert opens >= 5
    finally:
        writer.kill()
        writer.wait()


def _refresh_in_threads(reader: mrlstore.Store, threads: int, errors: list[BaseException]) -> None:
    def loop() -> None:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            try:
                reader.refresh()
                reader.query(np.ones(32, np.float32), k=3)
            except BaseException as e:  # noqa: BLE001 - the test fails on any
                errors.append(e)
                return

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_a_tune_waiting_for_set_index_dims_measures_the_prefixes_it_leaves(tmp_path, monkeypatch):
    """tune read the indexed prefixes before it took the lock: after a set_index_dims it waited for, it
    measured and saved settings for prefixes no longer indexed (the default query then scanned 16 exactly)."""
    from mrlstore.query import tuning
    from mrlstore.testing import mrl_like

    monkeypatch.setattr(tuning, "EXACT_CANDIDATE_FACTOR", 0)  # on a busy machine exact search was timed faster

    x, _ = mrl_like(8000, 128, noise=1.0, seed=3)
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 64, 128)) as store:
        store.add_vectors(x)
        reindex = threading.Thread(target=store.set_index_dims, args=((64,),))
        reindex.start()
        time.sleep(0.2)  # it holds the writer lock while it builds the 64-d index (seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            choice = store.tune(recall=0.9, sample=100)
        reindex.join()
        assert store.index_dims == (64,)
        assert all(shape.startswith("64,") for shape in choice.shapes) and choice.dims[0] == 64
