"""Staged writes without Ray: fragments checked when written, committed as one, refused whole when any is bad."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import mrlstore
from mrlstore.errors import StorageError
from mrlstore.inputs.staging import write_fragment
from mrlstore.options import StoreConfig
from mrlstore.tiers.layout import LEASE_FILE, STAGING_DIR
from mrlstore.tiers.locking import WriteLease
from mrlstore.upkeep.staged import RangeWriter, StagedWriter

DIM = 32


def rows(lo: int, n: int, **extra: list) -> pa.Table:
    vectors = np.random.default_rng(lo).standard_normal((n, DIM)).astype(np.float32)
    columns = {"id": [f"r{i}" for i in range(lo, lo + n)], "embedding": list(vectors), **extra}
    return pa.table(columns)


@pytest.fixture
def store(tmp_path):
    with mrlstore.open(tmp_path / "s.mrl", dim=DIM, index_dims=[8]) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        yield s


def stage(store, *tables: pa.Table, where: Path | None = None) -> list[str]:
    where = where or store.path / STAGING_DIR / "w"
    return [write_fragment(where, t, "embedding", "id", store.staging_shape())["path"] for t in tables]


def test_fragments_commit_as_one_with_their_metadata(store):
    paths = stage(store, rows(0, 40, color=["red"] * 40), rows(40, 25, size=list(range(25))))
    assert store.commit_staged(paths) == 65
    assert len(store) == 66
    got = store.get(["r3", "r50"]).to_pylist()
    assert (got[0]["color"], got[0]["size"]) == ("red", None)
    assert (got[1]["color"], got[1]["size"]) == (None, 10)


def test_a_bad_vector_is_refused_where_the_worker_writes_it(store):
    bad = rows(0, 5).to_pydict()
    bad["embedding"][2] = [0.0] * DIM
    with pytest.raises(mrlstore.ZeroVectorError):
        stage(store, pa.table(bad))
    with pytest.raises(mrlstore.ShapeError):
        stage(store, pa.table({"id": ["a"], "embedding": [[1.0] * (DIM - 1)]}))


@pytest.mark.parametrize("damage", ["truncated", "other store", "metadata types"])
def test_any_bad_fragment_refuses_the_whole_commit(store, tmp_path, damage):
    paths = stage(store, rows(0, 30), rows(30, 30, num=list(range(30))))
    if damage == "truncated":
        data = open(paths[1], "rb").read()
        open(paths[1], "wb").write(data[: len(data) // 2])
        error = mrlstore.InvalidInputError
    elif damage == "other store":
        with mrlstore.open(tmp_path / "other.mrl", dim=DIM + 8) as other:
            paths += stage(other, pa.table({"id": ["x"], "embedding": [[1.0] * (DIM + 8)]}))
        error = mrlstore.InvalidInputError
    else:
        paths += stage(store, rows(60, 3, num=["a", "b", "c"]))
        error = mrlstore.MetadataError
    with pytest.raises(error):
        store.commit_staged(paths)
    assert len(store) == 1 and store.verify() == []
    assert store.commit_staged(paths[:1]) == 30  # the store takes writes again


def test_a_writer_that_opens_the_store_clears_fragments_never_committed(tmp_path):
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as s:
        stage(s, rows(0, 10))
    assert any((path / STAGING_DIR).rglob("*.arrow"))
    with mrlstore.open(path, read_only=True) as reader:  # a reader leaves them: a writer may be using them
        assert len(reader) == 0
    assert any((path / STAGING_DIR).rglob("*.arrow"))
    with mrlstore.open(path) as s:
        assert len(s) == 0
    assert not (path / STAGING_DIR).exists()


# -- the staged writer: a Ray driver's commit, without the store's ids or indexes in memory ---------------
def staged_store(tmp_path) -> tuple[Path, list[str]]:
    """A store with one row, and fragments of 65 new rows staged beside it."""
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        frags = tmp_path / "fragments"  # beside the store: a writer's open clears the store's own staging
        paths = stage(s, rows(0, 40, color=["red"] * 40), rows(40, 25, size=list(range(25))), where=frags)
    return path, paths


def test_the_staged_writer_commits_as_one_and_the_next_open_extends_the_indexes(tmp_path):
    path, paths = staged_store(tmp_path)
    writer = StagedWriter(path, StoreConfig())
    try:
        with pytest.raises(mrlstore.StoreLockedError):
            mrlstore.open(path)  # it is the store's writer
        assert writer.commit_staged(paths) == 65
        with pytest.raises(mrlstore.StoreLockedError):
            StagedWriter(path, StoreConfig())
    finally:
        writer.close()
    with mrlstore.open(path) as s:
        assert len(s) == 66 and s.verify() == []
        got = s.get(["r3", "r50"]).to_pylist()
        assert (got[0]["color"], got[0]["size"], got[1]["color"], got[1]["size"]) == ("red", None, None, 10)
        hits = s.query(np.asarray(got[1]["vector"], np.float32), k=1, dims=[8, DIM])  # via the 8-d HNSW
        assert hits.ids == ["r50"]


@pytest.mark.parametrize("problem", ["repeated across fragments", "already in the store", "metadata types"])
def test_a_staged_commit_that_fails_changes_nothing(tmp_path, problem):
    path, paths = staged_store(tmp_path)
    with mrlstore.open(path) as s:
        extra = {
            "repeated across fragments": rows(30, 3),
            "already in the store": pa.table({"id": ["old"], "embedding": [[2.0] * DIM]}),
            "metadata types": rows(70, 3, size=["a", "b", "c"]),
        }[problem]
        paths += stage(s, extra, where=tmp_path / "fragments")
    error = mrlstore.MetadataError if problem == "metadata types" else mrlstore.DuplicateIdError
    writer = StagedWriter(path, StoreConfig())
    try:
        with pytest.raises(error):
            writer.commit_staged(paths)
        assert writer.commit_staged(paths[:1]) == 40  # it takes writes again
    finally:
        writer.close()
    with mrlstore.open(path) as s:
        assert len(s) == 41 and s.verify() == [] and "size" not in s.sql("SELECT * FROM items").column_names


KILLED_COMMITS = """
import sys
from mrlstore.options import StoreConfig
from mrlstore.upkeep.staged import StagedWriter
writer = StagedWriter(sys.argv[1], StoreConfig())
for path in sys.argv[2:]:
    writer.commit_staged([path])
    print("committed", flush=True)
"""


@pytest.mark.parametrize("delay", [0.4, 0.9, 1.6])
def test_a_staged_writer_killed_mid_commit_leaves_whole_commits_only(tmp_path, delay):
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8], chunk_rows=1000) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
        paths = stage(s, *(rows(i * 3000, 3000) for i in range(40)), where=tmp_path / "fragments")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COMMITS, str(path), *paths], stdout=subprocess.PIPE)
    time.sleep(delay)
    proc.kill()
    done = proc.communicate()[0].count(b"committed")
    with mrlstore.open(path) as s:
        assert len(s) - 1 in (3000 * done, 3000 * (done + 1)) and s.verify() == []
        if len(s) > 1:
            assert s.get(["r0"]).num_rows == 1


# -- in place: workers write vectors straight into the bands at reserved rows; the commit copies none ------
class Reservations:
    """What the Ray sink's reservation actor does, in one process."""

    def __init__(self, first: int):
        self.next = first

    def __call__(self, rows: int) -> int:
        start, self.next = self.next, self.next + rows
        return start


def in_place(path: Path) -> tuple[StagedWriter, RangeWriter, Reservations, WriteLease]:
    writer = StagedWriter(path, StoreConfig())
    staging = path / STAGING_DIR / "w"
    lease = WriteLease(staging / LEASE_FILE)
    lease.grant()
    worker = RangeWriter(path, writer.shape(), tuple(writer.params.bands), staging, lease)
    return writer, worker, Reservations(writer.committed_rows()), lease


def vectors_of(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


@pytest.mark.parametrize("layout", ["sharded", "plain"])
def test_rows_written_in_place_commit_as_one_and_a_failed_tasks_rows_are_filled(tmp_path, monkeypatch, layout):
    from mrlstore.tiers import params as config

    path = tmp_path / "s.mrl"
    if layout == "plain":
        monkeypatch.setattr(config, "FORMAT_VERSION", 2)  # full-size chunk files, no shard index
    with mrlstore.open(path, dim=DIM, bands=(8, DIM), index_dims=[8], chunk_rows=64) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
    blocks = [rows(0, 100, color=["red"] * 100), rows(100, 70), rows(170, 90, size=list(range(90))), rows(260, 50)]
    writer, worker, reserve, _ = in_place(path)
    try:
        written = [worker.write(t, "embedding", "id", reserve) for t in blocks]
        assert [w["start"] for w in written] == [1, 101, 171, 261]
        del written[1]  # its task failed after writing: rows 101..170 are a hole the commit must fill
        assert writer.commit_in_place(written, worker.lease) == (240, 70)
    finally:
        worker.close()
        writer.close()
    kept = pa.concat_tables([blocks[0], blocks[2], blocks[3]], promote_options="default")
    with mrlstore.open(path) as s:
        assert len(s) == 241 and s.verify() == []
        got = s.get(kept.column("id").to_pylist(), dims=DIM)
        stored = np.stack(got.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(stored, vectors_of(kept).astype(np.float16).astype(np.float32))
        assert s.get(["r5", "r200"]).select(["color", "size"]).to_pylist() == [
            {"color": "red", "size": None},
            {"color": None, "size": 30},
        ]
        assert s.query(vectors_of(blocks[3])[7], k=1).ids == ["r267"]  # moved into the hole
        with pytest.raises(mrlstore.UnknownIdError):
            s.get(["r120"])
    if layout == "sharded":  # any Zarr v3 reader sees the committed rows
        import zarr

        band = zarr.open_array(str(path / "vectors" / "band_00008_00032"), mode="r")
        assert band.shape == (241, DIM - 8)
        b0, b2, b3 = (vectors_of(blocks[i]) for i in (0, 2, 3))
        # the hole took the rows past the end in order: block 2's last 20, then block 3's 50
        expect = np.vstack([np.ones((1, DIM)), b0, b2[70:], b3, b2[:70]]).astype(np.float16)
        np.testing.assert_array_equal(band[:], expect[:, 8:])


def test_place_rows_keeps_rows_inside_and_fills_holes_from_the_end():
    from mrlstore.upkeep.staged import place_rows

    assert place_rows(10, [(10, 5), (15, 3)]) == ([], [(10, 0, 0, 5), (15, 1, 0, 3)])
    # a failed task reserved 15..19: the commit ends at 21; the last block's first row stays at 20 and its
    # other five (21..25, past the end) fill the hole
    moves, pieces = place_rows(10, [(10, 5), (20, 6)])
    assert moves == [(21, 15, 5)] and pieces == [(10, 0, 0, 5), (15, 1, 1, 5), (20, 1, 0, 1)]
    # two holes, filled in order from two blocks past the end
    moves, pieces = place_rows(0, [(2, 2), (6, 1), (9, 2)])
    assert moves == [(6, 0, 1), (9, 1, 1), (10, 4, 1)]
    assert [(dst, rows) for dst, _, _, rows in pieces] == [(0, 1), (1, 1), (2, 2), (4, 1)]
    assert place_rows(7, []) == ([], [])
    assert place_rows(5, [(5, 0), (5, 3)]) == ([], [(5, 1, 0, 3)])  # a block of no rows takes no place
    assert place_rows(5, [(5, 3), (5, 0)]) == ([], [(5, 0, 0, 3)])
    with pytest.raises(mrlstore.CorruptStoreError):
        place_rows(0, [(0, 5), (3, 5)])  # overlapping reservations


def written_past(path: Path, first: int, n: int) -> np.ndarray:
    """Rows ``first..first+n`` as the band files hold them now, committed or not (zeros where erased)."""
    from mrlstore.tiers.bands import BandedVectors
    from mrlstore.tiers.params import default_bands

    vectors = BandedVectors(path, DIM, default_bands(DIM), "float16")
    try:
        return vectors.read_written(first, n)
    finally:
        vectors.close()


def test_a_worker_of_a_write_that_ended_writes_nothing(tmp_path):
    path, _ = staged_store(tmp_path)
    writer, worker, reserve, _ = in_place(path)
    worker.write(rows(0, 30), "embedding", "id", reserve)  # rows 1..30, inside the last committed chunk
    writer.close()  # its driver died without committing
    assert written_past(path, 1, 30).any()
    try:
        with mrlstore.open(path) as s:  # the next writer ends the lease, then erases the rows
            assert len(s) == 1 and s.verify() == []
        assert not written_past(path, 1, 30).any()
        with pytest.raises(mrlstore.WriteEndedError):
            worker.write(rows(30, 30), "embedding", "id", reserve)
    finally:
        worker.close()
    with mrlstore.open(path) as s:
        assert len(s) == 1 and s.verify() == [] and not (path / STAGING_DIR).exists()
        s.add_vectors(np.ones((2, DIM), np.float32), ids=["a", "b"])
        assert s.verify() == []


def test_a_commit_that_fails_before_writing_erases_the_workers_rows(tmp_path):
    path, _ = staged_store(tmp_path)
    writer, worker, reserve, lease = in_place(path)
    try:
        written = [worker.write(rows(0, 30), "embedding", "id", reserve)]
        written[0]["rows"] = 29  # what a worker said disagrees with its fragment
        with pytest.raises(mrlstore.CorruptStoreError, match="row counts"):
            writer.commit_in_place(written, lease)
        assert writer.committed_rows() == 1
    finally:
        worker.close()
        writer.close()
    assert not written_past(path, 1, 30).any()
    with mrlstore.open(path) as s:
        assert len(s) == 1 and s.verify() == []


def test_a_lease_held_by_a_hung_worker_refuses_the_next_writer(tmp_path):
    path, _ = staged_store(tmp_path)
    writer, worker, reserve, lease = in_place(path)
    writer.close()  # its driver died; one of its workers hangs inside its write
    held, release = threading.Event(), threading.Event()

    def hung_worker() -> None:
        with lease.held():
            held.set()
            release.wait()

    t = threading.Thread(target=hung_worker)
    t.start()
    held.wait()
    try:
        with pytest.raises(mrlstore.StoreLockedError, match="still holds"):
            lease.revoke(timeout=0.2)
    finally:
        release.set()
        t.join()
        worker.close()
    with mrlstore.open(path) as s:  # the worker is gone: the next writer's open goes through
        assert len(s) == 1 and s.verify() == []


def test_revoking_a_lease_waits_for_the_writes_in_flight(tmp_path):
    lease = WriteLease(tmp_path / LEASE_FILE)
    lease.grant()
    events: list[str] = []
    inside = threading.Event()

    def worker() -> None:
        with lease.held():
            inside.set()
            time.sleep(0.3)
            events.append("worker wrote")

    t = threading.Thread(target=worker)
    t.start()
    inside.wait()
    lease.revoke()
    events.append("revoked")
    t.join()
    assert events == ["worker wrote", "revoked"]
    with pytest.raises(mrlstore.WriteEndedError), lease.held():
        pass


KILLED_IN_PLACE = """
import os, signal, sys
import numpy as np, pyarrow as pa
from pathlib import Path
from mrlstore.options import StoreConfig
from mrlstore.tiers.bands import BandedVectors
from mrlstore.tiers.catalog import Catalog
from mrlstore.tiers.layout import LEASE_FILE, STAGING_DIR
from mrlstore.tiers.locking import WriteLease
from mrlstore.upkeep.staged import RangeWriter, StagedWriter

path, dim, kill_at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def dies_at(cls, name, after=False):
    original = getattr(cls, name)
    def call(*args, **kwargs):
        if not after:
            os.kill(os.getpid(), signal.SIGKILL)
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(cls, name, call)

if kill_at == "settle":  # after the hole was filled
    dies_at(BandedVectors, "settle")
elif kill_at == "mid-settle":  # some chunk files sized and indexed, others not
    from mrlstore.tiers import bands
    settled = []
    original = bands._Band.settle
    def settle_then_die(self, chunk, rows):
        touched = original(self, chunk, rows)
        settled.append(chunk)
        if len(settled) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return touched
    bands._Band.settle = settle_then_die
elif kill_at == "catalog":  # after the files were sized and indexed, before the commit point
    dies_at(Catalog, "append_tables")
elif kill_at == "committed":  # right after the commit point
    dies_at(Catalog, "append_tables", after=True)
writer = StagedWriter(path, StoreConfig())
lease = WriteLease(path / STAGING_DIR / "w" / LEASE_FILE)
lease.grant()
worker = RangeWriter(path, writer.shape(), tuple(writer.params.bands), path / STAGING_DIR / "w", lease)
next_row = [writer.committed_rows()]
def reserve(n):
    start = next_row[0]
    next_row[0] += n
    return start
written = []
for i in range(6):
    v = np.random.default_rng(i).standard_normal((700, dim)).astype(np.float32)
    t = pa.table({"id": [f"k{i}_{j}" for j in range(700)], "embedding": list(v)})
    w = worker.write(t, "embedding", "id", reserve)
    if kill_at == "writing" and i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if i != 1:  # block 1's task "failed": a hole the commit fills from the end
        written.append(w)
writer.commit_in_place(written, lease)
"""


@pytest.mark.parametrize("kill_at", ["writing", "settle", "mid-settle", "catalog", "committed"])
def test_a_writer_killed_during_a_write_in_place_leaves_the_store_whole(tmp_path, kill_at):
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, bands=(8, DIM), index_dims=[8], chunk_rows=512) as s:
        s.add_vectors(np.ones((1, DIM), np.float32), ids=["old"])
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_PLACE, str(path), str(DIM), kill_at], check=False)
    assert proc.returncode == -signal.SIGKILL
    with mrlstore.open(path) as s:  # the writer's open erases what never committed
        assert s.verify() == [] and not (path / STAGING_DIR).exists()
        if kill_at == "committed":
            assert len(s) == 1 + 5 * 700
            v = np.random.default_rng(5).standard_normal((700, DIM)).astype(np.float32)  # moved into the hole
            stored = np.stack(s.get(["k5_0", "k5_699"], dims=DIM).column("vector").to_numpy(zero_copy_only=False))
            np.testing.assert_array_equal(stored, v[[0, 699]].astype(np.float16).astype(np.float32))
        else:
            assert len(s) == 1
        after = np.arange(1, DIM + 1, dtype=np.float32)
        s.add_vectors(after[None], ids=["after"])
        assert s.verify() == [] and s.query(after, k=1).ids == ["after"]


# -- a large commit goes into the catalog in steps (bounded memory), still all or nothing -----------------
@pytest.fixture
def small_steps(monkeypatch):
    from mrlstore.tiers import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "APPEND_STEP_ROWS", 30)


def test_a_commit_in_steps_that_fails_late_leaves_nothing_behind(tmp_path, small_steps):
    from mrlstore.tiers.catalog import STAGED_KEY

    path, paths = staged_store(tmp_path)  # fragments of 40 rows (column color) and 25 (column size)
    with mrlstore.open(path) as s:
        paths += stage(s, rows(30, 3), where=tmp_path / "fragments")  # ids of the first fragment again
    writer = StagedWriter(path, StoreConfig())
    try:
        with pytest.raises(mrlstore.DuplicateIdError):
            writer.commit_staged(paths)  # the first 40 rows went in their own transaction before the repeat
        assert writer.commit_staged(paths[:2]) == 65  # the same ids again: the failed write left none
    finally:
        writer.close()
    with mrlstore.open(path) as s:
        assert len(s) == 66 and s.verify() == [] and STAGED_KEY not in s.manifest
        assert s.get(["r3", "r50"]).select(["color", "size"]).to_pylist() == [
            {"color": "red", "size": None},
            {"color": None, "size": 10},
        ]


def test_each_step_of_a_commit_is_checkpointed_before_the_next(tmp_path, small_steps, monkeypatch):
    # DuckDB keeps committed rows and index entries in memory until a checkpoint: without one per step,
    # the driver's memory grows with the write (the write-ahead log shows what is still held)
    from mrlstore.tiers import catalog as catalog_module

    path, paths = staged_store(tmp_path)  # 40 + 25 rows: steps of 40 and 25
    wal = path / (catalog_module.DB_FILE + ".wal")
    original, held = catalog_module.Catalog._insert_step, []

    def insert_step(self, *args):
        held.append(wal.stat().st_size if wal.exists() else 0)
        return original(self, *args)

    monkeypatch.setattr(catalog_module.Catalog, "_insert_step", insert_step)
    writer = StagedWriter(path, StoreConfig())
    try:
        assert writer.commit_staged(paths) == 65
    finally:
        writer.close()
    assert len(held) == 2 and held[1] == 0
    with mrlstore.open(path) as s:
        assert len(s) == 66 and s.verify() == []


def test_a_failed_checkpoint_between_steps_is_the_error_reported_and_the_store_reopens_whole(
    tmp_path, small_steps, monkeypatch
):
    # a checkpoint that fails (a full disk) shuts DuckDB down: the cleanup after it must not replace the
    # error with one about a "corrupt" catalog, and the next writer's open removes what the steps left
    from mrlstore.tiers import catalog as catalog_module

    def failing_checkpoint(self):
        self._con.close()  # as DuckDB does after a fatal error: every later statement fails
        raise StorageError("cannot checkpoint the catalog: No space left on device")

    path, paths = staged_store(tmp_path)
    monkeypatch.setattr(catalog_module.Catalog, "_checkpoint", failing_checkpoint)
    writer = StagedWriter(path, StoreConfig())
    try:
        with pytest.raises(StorageError, match="No space left"):
            writer.commit_staged(paths)
    finally:
        writer.close()
    monkeypatch.undo()
    with mrlstore.open(path, read_only=True) as reader:
        assert len(reader) == 1 and reader.sql("SELECT * FROM items").column_names == ["id"]
    with mrlstore.open(path) as s:
        assert len(s) == 1 and s.verify() == [] and s.commit_staged(paths) == 65


KILLED_BETWEEN_STEPS = """
import os, signal, sys
from mrlstore.options import StoreConfig
from mrlstore.tiers import catalog
from mrlstore.upkeep.staged import StagedWriter

catalog.APPEND_STEP_ROWS = 30
original, steps = catalog.Catalog._insert_step, []
def insert_step(self, *args):
    steps.append(1)
    if len(steps) == 2:  # the first step's transaction (40 rows, the column color, the mark) committed
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args)
catalog.Catalog._insert_step = insert_step
StagedWriter(sys.argv[1], StoreConfig()).commit_staged(sys.argv[2:])
"""


def test_a_writer_killed_between_steps_of_a_commit_leaves_the_store_as_it_was(tmp_path):
    path, paths = staged_store(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_STEPS, str(path), *paths], check=False)
    assert proc.returncode == -signal.SIGKILL
    with mrlstore.open(path, read_only=True) as reader:  # before any writer: the committed state only
        assert len(reader) == 1 and reader.verify() == []
        assert reader.sql("SELECT id FROM items").column("id").to_pylist() == ["old"]
        with pytest.raises(mrlstore.UnknownIdError):
            reader.get(["r0"])
        assert reader.sql("SELECT * FROM items").column_names == ["id"]  # not the dead write's column color
        with pytest.raises(mrlstore.InvalidFilterError):
            reader.query(np.ones(DIM, np.float32), where="color = 'red'")
    with mrlstore.open(path) as s:  # the writer's open removes the dead write's rows and columns
        assert len(s) == 1 and s.verify() == [] and "color" not in s.sql("SELECT * FROM items").column_names
        assert s.commit_staged(paths) == 65
        assert len(s) == 66 and s.verify() == []


@pytest.mark.parametrize("order", ["int first", "float first"])
def test_metadata_types_do_not_depend_on_which_fragment_comes_first(store, order, tmp_path):
    """Ray hands the fragments over in the order its tasks finish: an int column in the first and a float
    in the second made a BIGINT column that refused 0.5 (the whole write failed), the other order a DOUBLE.
    The columns are now typed for every fragment first; an all-null column takes the others' type."""
    ints = rows(0, 20, x=list(range(20)), note=[None] * 20)
    floats = rows(20, 20, x=[0.5] * 20, note=[3] * 20)
    tables = (ints, floats) if order == "int first" else (floats, ints)
    paths = stage(store, *tables, where=tmp_path / "fragments")  # the writer's open clears the store's own
    store.close()
    writer = StagedWriter(store.path, StoreConfig())  # a Ray write's commit, a fragment at a time
    try:
        assert writer.commit_staged(paths) == 40
    finally:
        writer.close()
    store = mrlstore.open(store.path, read_only=True)
    described = store.sql("DESCRIBE SELECT x, note FROM items").to_pylist()
    described = {r["column_name"]: r["column_type"] for r in described}
    assert described == {"x": "DOUBLE", "note": "BIGINT"}, described
    assert store.get(["r3", "r25"]).column("x").to_pylist() == [3.0, 0.5]
    store.close()


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize(
    "a, b, outcome",
    [
        ([1] * 20, ["a"] * 20, "refused"),  # int first made BIGINT and refused "a"; text first took both
        ([1] * 20, [True] * 20, "refused"),
        ([{"a": 1}] * 20, [{"b": "x"}] * 20, "STRUCT(a BIGINT, b VARCHAR)"),  # not in the order tasks ended
        (["a"] * 20, pa.array(["b"] * 20).dictionary_encode(), "VARCHAR"),
    ],
)
def test_metadata_types_that_do_not_unify_fail_in_either_order(store, tmp_path, first, a, b, outcome):
    """Columns whose types do not unify across fragments failed or not depending on which fragment the commit
    took first; now a MetadataError before any row is written, and what unifies comes out the same."""
    tables = [rows(0, 20, m=a), rows(20, 20, m=b)]
    paths = stage(store, *(tables if first == 0 else tables[::-1]), where=tmp_path / "fragments")
    store.close()
    writer = StagedWriter(store.path, StoreConfig())
    try:
        if outcome == "refused":
            with pytest.raises(mrlstore.MetadataError, match="'m' has types that do not unify"):
                writer.commit_staged(paths)
        else:
            assert writer.commit_staged(paths) == 40
    finally:
        writer.close()
    with mrlstore.open(store.path, read_only=True) as reader:
        columns = reader.sql("DESCRIBE SELECT * FROM items").to_pylist()
        columns = {r["column_name"]: r["column_type"] for r in columns}
        assert columns.get("m") == (None if outcome == "refused" else outcome)
        assert len(reader) == (1 if outcome == "refused" else 41)


def test_fragments_that_disagree_on_an_existing_column_take_its_type(store, tmp_path):
    store.add_vectors(np.ones((1, DIM), np.float32), ids=["text"], metadata=[{"m": "t"}])
    paths = stage(store, rows(0, 20, m=[1] * 20), rows(20, 20, m=["a"] * 20), where=tmp_path / "fragments")
    store.close()
    writer = StagedWriter(store.path, StoreConfig())
    try:
        assert writer.commit_staged(paths) == 40
    finally:
        writer.close()
    with mrlstore.open(store.path, read_only=True) as reader:
        assert reader.get(["r0", "r20"]).column("m").to_pylist() == ["1", "a"]
