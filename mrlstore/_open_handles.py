"""The stores this process opened: those still open are closed at interpreter exit, while threads still run
(no engine imports)."""

from __future__ import annotations

import atexit
import os
import threading
import warnings
import weakref
from typing import Any

_lock = threading.Lock()
_handles: weakref.WeakSet[Any] = weakref.WeakSet()


def register(handle: Any) -> None:
    """``handle`` (with ``close()``) is closed at exit if it is still open then."""
    with _lock:
        _handles.add(handle)


def _after_fork_in_child() -> None:
    global _lock, _handles
    _lock, _handles = threading.Lock(), weakref.WeakSet()  # the parent's lock may have been held at the fork


@atexit.register
def _close_all() -> None:
    """Close what is open at exit: after this, daemon threads (a writer's publishing timer, a user's thread
    adding rows) freeze where they stand, locks held, and a store the garbage collector closed then waited
    for such a lock forever, or hnswlib's threads aborted the process."""
    with _lock:
        handles = list(_handles)
    for handle in handles:
        try:
            handle.close()
        except Exception as e:  # the store reopens as after a crash: consistent
            warnings.warn(f"mrlstore: closing {handle!r} at exit failed: {e}", RuntimeWarning, stacklevel=1)


os.register_at_fork(after_in_child=_after_fork_in_child)
