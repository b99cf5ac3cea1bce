"""Writer process for tests/test_crash.py: mutates a store until it is killed, announcing every operation.

Usage: ``python crash_writer.py STORE_PATH FIRST_OP SEED``

Protocol on stdout, one flushed line each:

* ``READY`` -- the store is open (recovery done);
* ``BEGIN <json>`` -- operation ``{"op": n, "kind": ..., "ids": [...]}`` is about to start (kind is add,
  upsert, delete, checkpoint or compact);
* ``ACK <n>`` -- operation ``n`` returned: it is acknowledged, hence durable.

Operation numbers are unique across all writer runs on a store (the parent passes FIRST_OP), so the id
``b<n>-<j>`` is only ever created by add (or upsert) operation ``n``. Every add or upsert by operation ``n``
stores, for an id ``b<B>-<J>``, the vector :func:`vector` ``(B, J, n)`` and the metadata
``{"batch": B, "j": J, "version": n}``; so the parent can derive the exact expected content of the store from
the operations it saw acknowledged.
"""

from __future__ import annotations

import json
import sys

import numpy as np

DIM = 64


def vector(batch: int, j: int, version: int) -> np.ndarray:
    """The float32 vector written for id ``b<batch>-<j>`` by operation ``version`` (before float16 rounding)."""
    return np.random.default_rng([batch, j, version]).standard_normal(DIM).astype(np.float32)


def parse_id(item_id: str) -> tuple[int, int]:
    batch, j = item_id[1:].split("-")
    return int(batch), int(j)


def rows_for(ids: list[str], version: int) -> tuple[np.ndarray, list[dict[str, int]]]:
    vectors = np.empty((len(ids), DIM), dtype=np.float32)
    metadata = []
    for i, item_id in enumerate(ids):
        batch, j = parse_id(item_id)
        vectors[i] = vector(batch, j, version)
        metadata.append({"batch": batch, "j": j, "version": version})
    return vectors, metadata


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def plan(rng: np.random.Generator, op: int, live: dict[str, None], graveyard: list[str]) -> tuple[str, list[str]]:
    """The next operation: its kind and the ids it touches."""
    r = rng.random()
    kind = (
        "add"
        if r < 0.55
        else "upsert"
        if r < 0.72
        else "delete"
        if r < 0.88
        else "checkpoint"
        if r < 0.95
        else "compact"
    )
    if kind in ("upsert", "delete") and not live:
        kind = "add"
    if kind == "add":
        n = int(rng.integers(64, 200)) if rng.random() < 0.05 else int(rng.integers(1, 41))
        return kind, [f"b{op}-{j}" for j in range(n)]
    if kind in ("checkpoint", "compact"):
        return kind, []
    pool = list(live)
    picked = rng.choice(len(pool), size=min(len(pool), int(rng.integers(1, 21))), replace=False)
    ids = [pool[i] for i in sorted(picked)]
    if kind == "upsert":
        if graveyard and rng.random() < 0.5:  # re-add ids deleted earlier in this run
            ids += sorted({graveyard[i] for i in rng.integers(0, len(graveyard), size=3)} - set(ids))
        if rng.random() < 0.3:  # and brand-new ids in the same batch
            ids += [f"b{op}-{j}" for j in range(int(rng.integers(1, 5)))]
    elif rng.random() < 0.3:
        ids.append(f"never-{op}")  # unknown id, tolerated by missing_ok=True
    return kind, ids


def main() -> None:
    import mrlstore  # imported here so the parent can import this module cheaply for vector()

    path, op, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = mrlstore.open(path)
    live = dict.fromkeys(store.sql("SELECT id FROM items ORDER BY id").column("id").to_pylist())
    if len(store) != len(live):
        raise AssertionError(f"len(store)={len(store)} but items holds {len(live)} ids")
    graveyard: list[str] = []
    emit("READY")
    while True:
        rng = np.random.default_rng([seed, op])
        kind, ids = plan(rng, op, live, graveyard)
        emit("BEGIN " + json.dumps({"op": op, "kind": kind, "ids": ids}))
        if kind == "add":
            vectors, metadata = rows_for(ids, op)
            store.add_vectors(vectors, ids=ids, metadata=metadata)
        elif kind == "upsert":
            vectors, metadata = rows_for(ids, op)
            store.upsert_vectors(vectors, ids=ids, metadata=metadata)
        elif kind == "delete":
            expected = sum(i in live for i in ids)
            deleted = store.delete(ids, missing_ok=True)
            if deleted != expected:
                raise AssertionError(f"delete returned {deleted}, expected {expected}")
        elif kind == "compact":
            before = len(store)
            store.compact()  # changes no content: the parent checks the same state either way
            if len(store) != before or store.info()["rows"] != before:
                raise AssertionError(f"compaction left {len(store)} live of {store.info()['rows']} rows, not {before}")
        else:
            store.checkpoint()
        emit(f"ACK {op}")
        if kind in ("add", "upsert"):
            live.update(dict.fromkeys(ids))
        elif kind == "delete":
            for i in ids:
                if i in live:
                    del live[i]
                    graveyard.append(i)
        op += 1


if __name__ == "__main__":
    main()
