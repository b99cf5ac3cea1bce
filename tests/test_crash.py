"""Crash safety: SIGKILL a writer process at random moments, many times, and check the store after each reopen.

The writer (tests/crash_writer.py) adds batches, upserts (replacing, re-adding deleted and creating new ids in
one batch), deletes, checkpoints the HNSW cache and compacts in a loop, announcing each operation before it starts
(``BEGIN``) and after it returns (``ACK``). After every kill the parent reopens the store, read-only and then
(usually) for writing, and checks that:

* the catalog holds exactly the acknowledged state, or that state plus the one operation in flight: every
  acknowledged batch is present, every operation is all-or-nothing, acknowledged deletes stay deleted;
* every present row's vector is bit-exact (the float16 rounding of what was written) and its metadata right;
* every checked row finds itself as its own nearest neighbour, through the HNSW funnel ``dims=[8, 64]`` and
  through the exact scan ``dims=[64]``; vectors that were deleted, replaced or never committed are not found;
* the recovery keeps to storage/FORMAT.md: a read-only open writes nothing, and after a writer reopened the
  store every band's Zarr ``shape[0]`` equals the committed rows and no chunk file lies wholly past them
  (these breaches leave the data intact, so they are collected and asserted after the loop).

A second test damages the HNSW cache between kills (truncated, garbled, deleted, bad sidecar, stale copy);
a third pins the deterministic case of a small store with more deleted rows in the HNSW graph than live ones.

``MRLSTORE_CRASH_ITERATIONS`` (default 25) sets the number of kills, for long soak runs; run pytest with ``-s``
to see the one-line summaries.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import mrlstore

ITERATIONS = int(os.environ.get("MRLSTORE_CRASH_ITERATIONS", "25"))
CONTENT_NEUTRAL = ("checkpoint", "compact")  # a kill in these leaves the acknowledged state only
WRITER = Path(__file__).with_name("crash_writer.py")
DIM = 64
INDEX_DIM = 8
STORE_PARAMS = {"dim": DIM, "bands": (8, 16, 64), "index_dims": (INDEX_DIM,), "chunk_rows": 64}
KILL_DELAY = (0.02, 1.2)  # seconds after READY
EARLY_KILL_SHARE = 0.15  # share of kills aimed at the writer's start-up (import, open, recovery)
# Per check (read-only open, writer open): self-query at most this many rows touched by the last writer, plus
# this many other live rows, and query this many vectors that must not be found (deleted, replaced or never
# committed). Every present row is checked bit-exact regardless.
NN_BUDGET = {"read-only": (40, 15, 15), "writer": (100, 30, 30)}
READY_TIMEOUT = 60.0


def _load_writer_module():
    spec = importlib.util.spec_from_file_location("crash_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cw = _load_writer_module()


@dataclass
class Op:
    op: int
    kind: str
    ids: list[str]
    acked: bool = False


@dataclass
class WriterRun:
    ops: list[Op]
    ready: bool
    startup_s: float | None
    stderr: str


@dataclass
class Stats:
    iterations: int = 0
    early_kills: int = 0
    acked: collections.Counter = field(default_factory=collections.Counter)
    inflight: collections.Counter = field(default_factory=collections.Counter)  # (kind, "committed"|"absent")
    index_status: collections.Counter = field(default_factory=collections.Counter)
    recovered_by_writer: int = 0
    rows_checked: int = 0
    nn_queries: int = 0
    hnsw_misses: int = 0  # live rows HNSW did not reach (present and unmarked in the cache; exact search finds them)
    ghost_queries: int = 0
    max_live: int = 0
    elapsed: float = 0.0
    leftovers: dict[str, int] = field(default_factory=dict)  # temporary files left behind by killed writers
    # Breaches of the documented recovery (storage/FORMAT.md) that leave the data intact: collected, so the
    # crash loop runs to the end, and asserted after it.
    recovery_violations: list[str] = field(default_factory=list)


def _expected_vector(item_id: str, version: int) -> np.ndarray:
    batch, j = cw.parse_id(item_id)
    return cw.vector(batch, j, version).astype(np.float16).astype(np.float32)


def _apply(state: dict[str, int], op: Op) -> dict[str, int]:
    new = dict(state)
    if op.kind in ("add", "upsert"):
        new.update(dict.fromkeys(op.ids, op.op))
    elif op.kind == "delete":
        for i in op.ids:
            new.pop(i, None)
    return new


def _run_writer(path: Path, first_op: int, seed: int, delay: float, early: bool, err_path: Path) -> WriterRun:
    """Start a writer, SIGKILL it ``delay`` seconds after READY (after its start when ``early``)."""
    lines: list[str] = []
    ready = threading.Event()
    with open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), str(first_op), str(seed)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    ready_at: list[float] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line == "READY\n":
                ready_at.append(time.monotonic())
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if early:
            time.sleep(delay)
        else:
            deadline = time.monotonic() + READY_TIMEOUT
            while not ready.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
                pass
            if ready.is_set():
                time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)  # not reaped yet, so the pid is still ours even if it exited
    finally:
        rc = proc.wait(timeout=60)
        reader.join(timeout=60)
    stderr = err_path.read_text(errors="replace")
    assert rc == -signal.SIGKILL, f"writer exited by itself with {rc} (not our SIGKILL):\n{stderr[-4000:]}"
    assert early or ready.is_set(), f"writer never became READY:\n{stderr[-4000:]}"

    ops: list[Op] = []
    for n, line in enumerate(lines):
        if not line.endswith("\n"):  # torn last line: its flush never returned, so that op never started
            assert n == len(lines) - 1
            break
        word, _, rest = line.rstrip("\n").partition(" ")
        if word == "BEGIN":
            assert not ops or ops[-1].acked, f"BEGIN before the previous op was acknowledged: {line!r}"
            spec = json.loads(rest)
            ops.append(Op(spec["op"], spec["kind"], spec["ids"]))
        elif word == "ACK":
            assert ops and not ops[-1].acked and ops[-1].op == int(rest), f"unexpected {line!r}"
            ops[-1].acked = True
        else:
            assert word == "READY", f"unexpected writer output {line!r}"
    startup = ready_at[0] - started if ready_at else None
    return WriterRun(ops, bool(ready_at), startup, stderr)


def _vectors_of(table) -> np.ndarray:
    column = table.column("vector")
    return column.combine_chunks().flatten().to_numpy().reshape(-1, column.type.list_size)


class Checker:
    """The parent's model of the store: live id -> version, every (id, version) ever written."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.live: dict[str, int] = {}
        self.written: list[tuple[str, int]] = []
        self.ever_ids: set[str] = set()
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self.stats = Stats()

    def vector(self, item_id: str, version: int) -> np.ndarray:
        key = (item_id, version)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = _expected_vector(item_id, version)
        return v

    def absorb(self, run: WriterRun) -> tuple[list[dict[str, int]], Op | None]:
        """Candidate states after a writer run: acknowledged only, and with the op in flight applied."""
        state = self.live
        for op in run.ops:
            if op.kind in ("add", "upsert"):
                self.written += [(i, op.op) for i in op.ids]
                self.ever_ids.update(op.ids)
        for op in run.ops:
            if op.acked:
                state = _apply(state, op)
                self.stats.acked[op.kind] += 1
        inflight = run.ops[-1] if run.ops and not run.ops[-1].acked else None
        candidates = [state]
        if inflight is not None and inflight.kind not in CONTENT_NEUTRAL:
            candidates.append(_apply(state, inflight))
        return candidates, inflight

    # -- checks -------------------------------------------------------------------------------------
    def check(
        self,
        store: mrlstore.Store,
        candidates: list[dict[str, int]],
        inflight: Op | None,
        touched: set[str],
        label: str,
        mode: str,
    ) -> int:
        """Check the open store against the candidate states; returns the index of the one it matches."""
        n_touched, n_others, n_ghosts = NN_BUDGET[mode]
        label = f"{label} [{mode} open]"
        table = store.sql("SELECT id, batch, j, version FROM items")
        ids = table.column("id").to_pylist()
        versions = table.column("version").to_pylist()
        observed = dict(zip(ids, versions))
        assert len(observed) == len(ids), f"{label}: duplicate ids in the catalog"
        for i, b, j in zip(ids, table.column("batch").to_pylist(), table.column("j").to_pylist()):
            assert cw.parse_id(i) == (b, j), f"{label}: {i} has metadata batch={b} j={j}"
        matched = next((n for n, c in enumerate(candidates) if observed == c), None)
        assert matched is not None, _describe_mismatch(label, observed, candidates, inflight)
        assert len(store) == len(observed) == store.info()["live"], f"{label}: len(store) disagrees with the catalog"

        # every present row: metadata and bit-exact vector, through get()
        order = sorted(observed)
        if order:
            got = store.get(order, dims=DIM)
            assert got.column("id").to_pylist() == order, f"{label}: get() returned other ids"
            assert got.column("version").to_pylist() == [observed[i] for i in order], f"{label}: metadata differs"
            expected = np.stack([self.vector(i, observed[i]) for i in order])
            actual = _vectors_of(got)
            bad = np.flatnonzero((actual.view(np.uint32) != expected.view(np.uint32)).any(axis=1))
            assert not len(bad), (
                f"{label}: {len(bad)} of {len(order)} vectors are not bit-exact, e.g. "
                f"{[(order[k], observed[order[k]]) for k in bad[:5]]}"
            )
            sample = self.rng.sample(order, min(50, len(order)))
            short = _vectors_of(store.get(sample, dims=16))
            assert np.array_equal(short, np.stack([self.vector(i, observed[i])[:16] for i in sample])), label
        self.stats.rows_checked += len(order)

        # acknowledged deletes (ids written once, absent now) stay absent
        gone = sorted(self.ever_ids - observed.keys())
        for i in self.rng.sample(gone, min(10, len(gone))):
            with pytest.raises(mrlstore.UnknownIdError):
                store.get([i])

        # self-retrieval of a sample: rows touched by the last writer, plus others
        recent = sorted(touched & observed.keys())
        recent = self.rng.sample(recent, min(n_touched, len(recent)))
        others = self.rng.sample(order, min(n_others, len(order)))
        probe = sorted(set(recent) | set(others))
        if probe:
            queries = np.stack([self.vector(i, observed[i]) for i in probe])
            # Exact search: every row finds itself. Through the HNSW stage, HNSW may (rarely) fail to reach a
            # node whose in-edges were pruned by later insertions; such a miss is accepted only if the cache
            # still holds the row as live (the cache is consistent) and misses stay rare.
            exact = store.query(queries, k=1, dims=[DIM], metadata=False)
            for i, q, h in zip(probe, queries, exact):
                if h.ids[0] != i:
                    self._tie_or_fail(store, i, q, h, [DIM], label)
                assert abs(float(h.scores[0]) - 1.0) < 1e-4, f"{label}: {i} scores {h.scores[0]} against itself"
            approx = store.query(queries, k=1, dims=[INDEX_DIM, DIM], metadata=False)
            misses = 0
            for i, h in zip(probe, approx):
                if h.ids[0] == i or abs(float(h.scores[0]) - 1.0) < 1e-4:
                    continue
                row = store._state.catalog.rows_of([i])[i]
                assert store._state.indexes[INDEX_DIM].holds(row), (
                    f"{label}: live row {i} is missing from the HNSW cache"
                )
                misses += 1
            assert misses <= max(1, len(probe) // 200), f"{label}: {misses} HNSW misses among {len(probe)} rows"
            self.stats.hnsw_misses += misses
            self.stats.nn_queries += 2 * len(probe)

        # vectors no longer (or never) committed must not be found
        ghosts = [p for p in self.written if observed.get(p[0]) != p[1]]
        ghosts = self.rng.sample(ghosts, min(n_ghosts, len(ghosts)))
        if ghosts and observed:
            queries = np.stack([_expected_vector(i, v) for i, v in ghosts])
            for dims in ([INDEX_DIM, DIM], [DIM]):
                hits = store.query(queries, k=1, dims=dims, metadata=False)
                for (i, v), h in zip(ghosts, hits):
                    assert float(h.scores[0]) < 0.999, (
                        f"{label}: query with the vector of {i} version {v} (deleted, replaced or never committed) "
                        f"found {h.ids[0]} with score {h.scores[0]}; the live version is {observed.get(i)}"
                    )
            self.stats.ghost_queries += 2 * len(ghosts)
        return matched

    def _tie_or_fail(self, store, item_id, q, hit, dims, label) -> None:
        """A top hit other than the row itself is only acceptable as an exact tie."""
        wide = store.query(q, k=10, dims=dims, metadata=False)
        own = [s for i, s in zip(wide.ids, wide.scores) if i == item_id]
        assert own and abs(own[0] - hit.scores[0]) < 1e-6, (
            f"{label}: row {item_id} does not find itself with dims={dims}: top hit {hit.ids[0]} "
            f"(score {hit.scores[0]}); among the top 10: {list(zip(wide.ids, np.round(wide.scores, 6)))}"
        )

    def finish_iteration(self, state: dict[str, int]) -> None:
        self.live = state
        self._cache = {k: v for k, v in self._cache.items() if state.get(k[0]) == k[1]}
        self.stats.max_live = max(self.stats.max_live, len(state))


def _describe_mismatch(label: str, observed: dict[str, int], candidates: list[dict[str, int]], inflight) -> str:
    acked = candidates[0]
    missing = sorted(acked.keys() - observed.keys())
    extra = sorted(observed.keys() - acked.keys())
    changed = sorted(i for i in acked.keys() & observed.keys() if acked[i] != observed[i])
    lines = [
        f"{label}: the store matches neither the acknowledged state nor that state plus the op in flight",
        f"  vs acknowledged: {len(missing)} missing (e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]}), "
        f"{len(changed)} with another version (e.g. {[(i, acked[i], observed[i]) for i in changed[:5]]})",
    ]
    if inflight is not None:
        after = candidates[-1]
        applied = sum(observed.get(i) == after.get(i) for i in inflight.ids)
        lines.append(
            f"  in flight: op {inflight.op} {inflight.kind} of {len(inflight.ids)} ids; {applied} look applied "
            f"(all-or-nothing violated if 0 < {applied} < {len(inflight.ids)})"
        )
    return "\n".join(lines)


def _zarr_tier_violations(path: Path, rows: int) -> list[str]:
    """After a writer reopened (recovered) the store, every band's ``shape[0]`` must equal the committed rows and
    no chunk file may lie wholly past them (storage/FORMAT.md, "Recovery on open")."""
    problems = []
    for meta_path in sorted((path / "vectors").glob("band_*/zarr.json")):
        meta = json.loads(meta_path.read_text())
        band = meta_path.parent.name
        if meta["shape"][0] != rows:
            problems.append(f"{band}/zarr.json has shape[0]={meta['shape'][0]}, committed rows={rows}")
        chunk_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        cdir = meta_path.parent / "c"
        stale = sorted(int(c.name) for c in cdir.iterdir() if int(c.name) * chunk_rows >= rows) if cdir.exists() else []
        if stale:
            problems.append(f"{band} keeps chunk(s) {stale} wholly past committed row {rows}")
    return problems


def _file_states(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def _temp_leftovers(path: Path) -> dict[str, int]:
    """Temporary files (``.<name>.tmp-<pid>``) that killed writers left in the store, counted by name."""
    return dict(collections.Counter(p.name.rsplit("-", 1)[0] + "-<pid>" for p in path.rglob(".*.tmp-*")))


def _crash_loop(tmp_path: Path, iterations: int, seed: int, corrupt=None, on_closed=None) -> Stats:
    """The kill / reopen / check loop.

    ``corrupt(path, iteration)`` may damage the index cache after the kill and returns the index statuses the
    reopened store may report; ``on_closed(path, iteration)`` runs after the parent closed its writer.
    """
    path = tmp_path / "store"
    mrlstore.open(path, **STORE_PARAMS).close()
    kill_rng = random.Random(seed)
    checker = Checker(seed + 1)
    stats = checker.stats
    next_op, startup = 0, 1.0
    seen: set[str] = set()
    started = time.monotonic()
    for it in range(iterations):
        early = kill_rng.random() < EARLY_KILL_SHARE
        delay = kill_rng.uniform(0.0, startup) if early else kill_rng.uniform(*KILL_DELAY)
        run = _run_writer(path, next_op, seed * 100_000 + it, delay, early, tmp_path / f"writer-{it}.err")
        if run.startup_s is not None:
            startup = run.startup_s
        stats.early_kills += not run.ready
        label = f"iteration {it} (seed {seed}, kill {'early ' if early else ''}{delay:.3f}s, {len(run.ops)} ops)"
        candidates, inflight = checker.absorb(run)
        if run.ops:
            next_op = run.ops[-1].op + 1
        touched = {i for op in run.ops for i in op.ids}
        want_status = corrupt(path, it) if corrupt is not None else None

        # read-only first: it must see the same state without repairing (writing) anything; it may publish
        # the live catalog as a new version (published/), which is how readers see a killed writer's commits
        before = _file_states(path)
        with mrlstore.open(path, read_only=True) as store:
            if want_status is not None:
                assert store.info()["index_status"][INDEX_DIM] in want_status, f"{label}: {store.info()}"
            matched = checker.check(store, candidates, inflight, touched, label, "read-only")
        after = _file_states(path)
        if after != before:
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            changed = [k for k in changed if not k.startswith("published/")]
        if after != before and changed:
            stats.recovery_violations.append(f"{label}: a read-only open changed files {changed[:5]}")
        # then (usually) as a writer, which repairs; otherwise the next writer recovers the crash itself
        if corrupt is not None or kill_rng.random() < 0.7:
            with mrlstore.open(path) as store:
                status = store.info()["index_status"][INDEX_DIM]
                stats.index_status[status] += 1
                if want_status is not None:
                    assert status in want_status, f"{label}: index status {status}, expected {want_status}"
                again = checker.check(store, candidates, inflight, touched, label, "writer")
                assert again == matched, f"{label}: read-only and writer opens see different states"
                rows = store.info()["rows"]
            for problem in _zarr_tier_violations(path, rows):
                if problem not in seen:  # a leftover is reported once, by the reopen that first left it
                    seen.add(problem)
                    stats.recovery_violations.append(f"{label}: {problem}")
            if on_closed is not None:
                on_closed(path, it)
        else:
            stats.recovered_by_writer += 1
        if inflight is not None:
            outcome = "killed" if inflight.kind in CONTENT_NEUTRAL else ("committed" if matched == 1 else "absent")
            stats.inflight[(inflight.kind, outcome)] += 1
        checker.finish_iteration(candidates[matched])
        stats.iterations += 1
    stats.elapsed = time.monotonic() - started
    stats.leftovers = _temp_leftovers(path)
    return stats


def _summary(name: str, s: Stats) -> str:
    inflight = ", ".join(
        f"{k}:{s.inflight[(k, 'committed')]}/{s.inflight[(k, 'absent')]}" for k in ("add", "upsert", "delete")
    )
    return (
        f"[{name}] {s.iterations} kills in {s.elapsed:.1f}s ({s.early_kills} before READY, "
        f"{s.recovered_by_writer} recoveries left to the next writer); acknowledged ops {dict(s.acked)}; "
        f"in-flight committed/absent {inflight} (+{s.inflight[('checkpoint', 'killed')]} checkpoints, "
        f"{s.inflight[('compact', 'killed')]} compactions killed); "
        f"index status on reopen {dict(s.index_status)}; "
        f"rows checked {s.rows_checked} (max live {s.max_live}); "
        f"self-queries {s.nn_queries} (HNSW misses {s.hnsw_misses}); "
        f"ghost queries {s.ghost_queries}; leftover temp files {s.leftovers}; "
        f"recovery violations {len(s.recovery_violations)}"
    )


def _assert_no_recovery_violations(stats: Stats) -> None:
    assert not stats.recovery_violations, (
        f"{len(stats.recovery_violations)} reopen(s) left the store unlike storage/FORMAT.md's recovery:\n"
        + "\n".join(stats.recovery_violations[:20])
    )


@pytest.mark.slow
def test_sigkill_writer_many_times(tmp_path):
    stats = _crash_loop(tmp_path, ITERATIONS, seed=1234)
    print("\n" + _summary("sigkill", stats))
    assert stats.iterations == ITERATIONS
    assert sum(stats.acked.values()) > 0
    _assert_no_recovery_violations(stats)


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
def test_sigkill_with_damaged_index_cache(tmp_path):
    """Between kills, damage the HNSW cache; the reopened store must rebuild it and stay fully correct."""
    stale = tmp_path / "stale-index"
    modes = ["truncate", "garble", "delete", "sidecar", "stale"]

    def cache_files(path: Path) -> tuple[Path, Path]:
        base = path / "index" / f"prefix_{INDEX_DIM:05d}"
        return base.with_suffix(".hnsw"), base.with_suffix(".json")

    def keep_stale(path: Path, it: int) -> None:
        if it == 0:  # the pair the parent's close left: older than later ones, but consistent
            stale.mkdir()
            for p in cache_files(path):
                (stale / p.name).write_bytes(p.read_bytes())

    def corrupt(path: Path, it: int):
        data, side = cache_files(path)
        mode = modes[it % len(modes)]
        if mode == "truncate":
            with open(data, "r+b") as f:
                f.truncate(data.stat().st_size // 2)
        elif mode == "garble":
            blob = bytearray(data.read_bytes())
            rng = random.Random(it)
            for _ in range(16):
                k = rng.randrange(len(blob))
                blob[k] ^= 0xA5
            data.write_bytes(bytes(blob))
        elif mode == "delete":
            data.unlink()
        elif mode == "sidecar":
            side.write_text("{not json")
        else:  # an older, internally consistent cache: must be extended, with later deletes re-applied
            generation = json.loads(side.read_text()).get("generation", 0)
            for p in (data, side):
                p.write_bytes((stale / p.name).read_bytes())
            if json.loads(side.read_text()).get("generation", 0) != generation:
                return ("rebuilt",)  # a compaction renumbered the rows since: the old cache must not be used
            return ("extended", "loaded")
        return ("rebuilt",)

    iterations = max(len(modes), ITERATIONS // 5)
    stats = _crash_loop(tmp_path, iterations, seed=4321, corrupt=corrupt, on_closed=keep_stale)
    print("\n" + _summary("damaged index", stats))
    assert stats.iterations == iterations
    _assert_no_recovery_violations(stats)


def test_small_store_with_deletions_after_kill(tmp_path):
    """Deterministic case: fewer live rows (150) than the funnel's first-stage shortlist (200), while the HNSW
    graph holds more (the deleted rows stay in it, marked). After a writer is killed and the store reopened,
    every row must still find itself as its own nearest neighbour."""
    path = tmp_path / "store"
    ids = [f"b0-{j}" for j in range(300)]
    with mrlstore.open(path, **STORE_PARAMS) as store:
        vectors, metadata = cw.rows_for(ids, 0)
        store.add_vectors(vectors, ids=ids, metadata=metadata)
        assert store.delete(ids[::2]) == 150
    prologue = [Op(0, "add", ids, acked=True), Op(1, "delete", ids[::2], acked=True)]
    run = _run_writer(path, 2, seed=7, delay=0.2, early=True, err_path=tmp_path / "writer.err")
    checker = Checker(seed=7)
    candidates, inflight = checker.absorb(WriterRun(prologue + run.ops, run.ready, run.startup_s, run.stderr))
    touched = set(ids)
    with mrlstore.open(path, read_only=True) as store:
        matched = checker.check(store, candidates, inflight, touched, "small store", "read-only")
    with mrlstore.open(path) as store:
        assert checker.check(store, candidates, inflight, touched, "small store", "writer") == matched
