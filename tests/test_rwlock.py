"""The readers-writer lock every query takes twice (store visibility, HNSW index): readers share it, a writer
waits for them and goes before readers that come after it."""

from __future__ import annotations

import threading
import time

from mrlstore._rwlock import RWLock

WAIT = 5.0  # seconds: a generous bound for a thread to reach a point it should reach


def _reader(lock: RWLock, entered: threading.Event, leave: threading.Event) -> threading.Thread:
    def run() -> None:
        with lock.read():
            entered.set()
            leave.wait(WAIT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_readers_share_the_lock() -> None:
    lock = RWLock()
    leave = threading.Event()
    first, second = threading.Event(), threading.Event()
    threads = [_reader(lock, first, leave), _reader(lock, second, leave)]
    assert first.wait(WAIT) and second.wait(WAIT)  # both inside at once
    leave.set()
    for t in threads:
        t.join(WAIT)
    assert lock._readers == 0


def test_a_writer_waits_for_readers_and_goes_before_later_readers() -> None:
    lock = RWLock()
    order: list[str] = []
    leave_first = threading.Event()
    first_in = threading.Event()
    first = _reader(lock, first_in, leave_first)
    assert first_in.wait(WAIT)

    def write() -> None:
        with lock.write():
            order.append("writer")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + WAIT
    while not lock._writers_waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert lock._writers_waiting == 1 and order == []  # waiting for the reader inside

    later_in = threading.Event()

    def late_read() -> None:
        with lock.read():
            order.append("later reader")
            later_in.set()

    late = threading.Thread(target=late_read, daemon=True)
    late.start()
    assert not later_in.wait(0.2)  # queued behind the waiting writer, not let in beside the first reader
    leave_first.set()
    for t in (first, writer, late):
        t.join(WAIT)
    assert order == ["writer", "later reader"]
    assert (lock._readers, lock._writer, lock._writers_waiting) == (0, False, 0)


def test_a_reader_leaving_by_exception_releases_the_lock() -> None:
    lock = RWLock()
    try:
        with lock.read():
            raise KeyError("inside")
    except KeyError:
        pass
    done = threading.Event()

    def write() -> None:
        with lock.write():
            done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(WAIT)
