"""Tests' way to make a writer publish its commits for readers now, not within the publish interval."""

from __future__ import annotations

import mrlstore


def publish_now(store: mrlstore.Store) -> None:
    """Publish now and stop publishing, as close() does, under the write lock: a publish the writer's timer
    starts meanwhile waits for it (without the lock the two raced on one temporary file, a flaky refresh)."""
    with store._state.write_lock:
        store._versions.close()


def publish_once(store: mrlstore.Store) -> None:
    """Publish the writer's committed state now, under the write lock, and go on publishing as before."""
    with store._state.writing():
        store._versions.publish_version(store._state)
