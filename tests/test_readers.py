"""Readers beside a live writer, with real processes: a writer adds and deletes in a loop while reader
processes open the store, query it and refresh; every result they see must be one committed version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from publishing import publish_now, publish_once

import mrlstore
from mrlstore._fsutil import HeldFolder

DIM, BATCH = 32, 50

COMMON = textwrap.dedent(
    f"""
    import json, sys, time
    import numpy as np
    import mrlstore
    DIM, BATCH = {DIM}, {BATCH}
    def batch_vectors(b):
        return np.random.default_rng(1000 + b).standard_normal((BATCH, DIM)).astype(np.float32)
    """
)

WRITER = COMMON + textwrap.dedent(
    """
    path, seconds = sys.argv[1], float(sys.argv[2])
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as store:
        b, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            ids = [f"b{b}-{j}" for j in range(BATCH)]
            store.add_vectors(batch_vectors(b), ids=ids, metadata=[{"batch": b}] * BATCH)
            if b % 5 == 4:
                store.delete([f"b{b - 3}-{j}" for j in range(BATCH)])  # one commit: the whole batch goes
            if b == 0:
                print("ready", flush=True)
            b += 1
            time.sleep(0.01)
        print("batches", b, flush=True)
    """
)

READER = COMMON + textwrap.dedent(
    """
    path, seconds = sys.argv[1], float(sys.argv[2])
    problems, versions, checks = [], [], 0
    with mrlstore.open(path, read_only=True) as store:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            store.refresh()
            version = store.info()["version"]
            rows = store.sql("SELECT id, batch FROM items").to_pylist()
            batches = {}
            for r in rows:
                b, j = r["id"][1:].split("-")
                if int(b) != r["batch"]:
                    problems.append(f"{r['id']} has batch {r['batch']}")
                batches.setdefault(int(b), set()).add(int(j))
            partial = [b for b, js in batches.items() if len(js) != BATCH]
            if partial:
                problems.append(f"version {version}: partial batches {partial[:3]}")
            if len(store) != len(rows):
                problems.append(f"version {version}: len {len(store)} but {len(rows)} rows in its catalog")
            for b in list(batches)[-3:]:
                hits = store.query(batch_vectors(b)[7], k=3, dims=[8, DIM])
                if hits.ids[0] != f"b{b}-7" or any(int(i[1:].split("-")[0]) not in batches for i in hits.ids):
                    problems.append(f"version {version}: query for b{b}-7 gave {hits.ids}")
            versions.append(version)
            checks += 1
    print(json.dumps({"problems": problems[:10], "versions": versions, "checks": checks}), flush=True)
    """
)


def _start(tmp_path: Path, name: str, code: str, *args: str) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_readers_in_other_processes_see_whole_versions_while_the_writer_adds(tmp_path):
    path = tmp_path / "live.mrl"
    writer = _start(tmp_path, "writer", WRITER, str(path), "9")
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    readers = [_start(tmp_path, f"reader{i}", READER, str(path), "6") for i in range(3)]
    results = []
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err  # never blocked or refused by the readers
    batches = int(out.split()[-1])
    for result in results:
        assert result["problems"] == []
        assert result["checks"] > 3
        assert result["versions"] == sorted(result["versions"]), "versions only move forward"
        assert len(set(result["versions"])) > 1, "refresh() moved the reader to newer versions"
    with mrlstore.open(path, read_only=True) as store:  # after the writer closed: its last commit
        assert len(store) == batches * BATCH - (batches // 5) * BATCH


def test_refresh_brings_adds_deletes_and_tuning(tmp_path):
    path = tmp_path / "s.mrl"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, DIM)).astype(np.float32)
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(vectors[:300], ids=[str(i) for i in range(300)])
        with mrlstore.open(path, read_only=True) as reader:
            assert len(reader) == 300 and reader.refresh() is False
            writer.add_vectors(vectors[300:], ids=[str(i) for i in range(300, 400)])
            writer.delete(["5"])
            writer.tune(recall=0.5, sample=50)
            publish_now(writer)
            assert len(reader) == 300, "a reader stays on its version until it refreshes"
            assert reader.refresh() is True
            assert len(reader) == 399
            assert reader.query(vectors[350], k=1).ids == ["350"]
            assert "5" not in reader.query(vectors[5], k=5).ids
            assert reader.info()["tuned"] == writer.info()["tuned"]


@pytest.mark.parametrize("damage", ["emptied", "garbled"])
def test_a_damaged_published_copy_is_published_again(tmp_path, damage):
    """Readers were refused (CorruptStoreError) until a write published a new version: neither a writer's
    open nor a reader without a writer replaced the copy, whose HEAD still matched the catalog."""
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(np.random.default_rng(0).standard_normal((300, DIM)).astype(np.float32))
    mrlstore.open(path, read_only=True).close()  # a reader came: a published copy exists
    copy = next((path / "published").glob("catalog-*.duckdb"))
    size = copy.stat().st_size
    copy.write_bytes(b"" if damage == "emptied" else np.random.default_rng(1).bytes(size))
    with mrlstore.open(path, read_only=True) as reader:  # no writer: this reader publishes again
        assert len(reader) == 300
    if damage == "emptied":  # a writer's open sees a copy of another size and publishes again too
        copy = next((path / "published").glob("catalog-*.duckdb"))
        copy.write_bytes(b"")
        with mrlstore.open(path), mrlstore.open(path, read_only=True) as reader:
            assert len(reader) == 300


def test_a_garbled_head_beside_a_live_writer_is_named_and_the_next_commit_publishes(tmp_path):
    """Readers were told StoreLockedError ("readers must wait for it"), which no wait mends."""
    path = tmp_path / "s.mrl"
    rng = np.random.default_rng(0)
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(rng.standard_normal((30, DIM)).astype(np.float32))
        with mrlstore.open(path, read_only=True) as first:  # registered: the writer publishes for it
            (path / "published" / "HEAD").write_bytes(b"\x00garbage")
            with pytest.raises(mrlstore.CorruptStoreError, match="HEAD is unreadable"):
                mrlstore.open(path, read_only=True)
            writer.add_vectors(rng.standard_normal((5, DIM)).astype(np.float32))
            publish_now(writer)
            with mrlstore.open(path, read_only=True) as reader:
                assert len(reader) == 35 and len(first) == 30


@pytest.mark.parametrize("head", [b"1", b"[]", b'"x"', b'{"catalog": 5}'])
def test_a_head_of_another_json_shape_is_no_version(tmp_path, head):
    """JSON that is no HEAD object raised TypeError at every open, the writer's included (so no commit could
    publish a new one)."""
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32))
    mrlstore.open(path, read_only=True).close()
    (path / "published" / "HEAD").write_bytes(head)
    with mrlstore.open(path, read_only=True) as reader:  # no writer: this reader publishes again
        assert len(reader) == 30
    (path / "published" / "HEAD").write_bytes(head)
    with mrlstore.open(path) as writer, mrlstore.open(path, read_only=True) as reader:
        assert len(writer) == len(reader) == 30


def test_a_file_where_the_published_folder_belongs_is_replaced(tmp_path):
    """Every writer's open raised FileExistsError: published versions are copies, made again."""
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32))
    shutil.rmtree(path / "published")
    (path / "published").write_bytes(b"x")
    with mrlstore.open(path) as writer, mrlstore.open(path, read_only=True) as reader:
        assert len(writer) == len(reader) == 30


def test_a_reader_after_a_killed_writer_sees_its_last_commit(tmp_path):
    path = tmp_path / "s.mrl"
    code = COMMON + textwrap.dedent(
        """
        store = mrlstore.open(sys.argv[1], dim=DIM, index_dims=[8])
        for b in range(3):  # quicker than the publish interval: the last commits are not published yet
            store.add_vectors(batch_vectors(b), ids=[f"b{b}-{j}" for j in range(BATCH)])
        print("added", flush=True)
        time.sleep(60)
        """
    )
    writer = _start(tmp_path, "writer", code, str(path))
    assert writer.stdout.readline().strip() == "added", writer.stderr.read()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with mrlstore.open(path, read_only=True) as reader:  # no writer alive: the reader publishes the catalog
        assert len(reader) == 3 * BATCH
    with mrlstore.open(path) as store:  # and a writer opens as usual afterwards
        assert len(store) == 3 * BATCH and store.verify() == []


def test_a_writer_without_readers_copies_nothing_and_publishes_when_one_arrives(tmp_path):
    path = tmp_path / "s.mrl"
    vectors = np.random.default_rng(1).standard_normal((200, DIM)).astype(np.float32)
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        for lo in range(0, 200, 50):
            writer.add_vectors(vectors[lo : lo + 50], ids=[str(i) for i in range(lo, lo + 50)])
        assert not list((path / "published").glob("catalog-*.duckdb")), "no reader, no copy"
        assert (path / "published" / "PENDING").exists()
        with mrlstore.open(path, read_only=True) as reader:  # waits for the writer's publish (about a second)
            assert len(reader) == 200 and not (path / "published" / "PENDING").exists()


def test_a_reader_waits_for_a_writer_still_opening_a_store_nothing_was_published_for(tmp_path):
    """A reader that came while the writer of a new store was still opening it (nothing published, no
    PENDING yet) was refused at once ("open for writing; readers must wait for it"); it waits for the
    writer's first version now."""
    path = tmp_path / "s.mrl"
    mrlstore.open(path, dim=DIM, index_dims=[8]).close()
    shutil.rmtree(path / "published", ignore_errors=True)
    opening = _start(tmp_path, "opening", textwrap.dedent("""
        import sys, time
        import mrlstore
        from mrlstore.tiers.locking import StoreLock
        lock = StoreLock(sys.argv[1], exclusive=True)  # as a writer holds it while its open runs
        print("holding", flush=True)
        time.sleep(1.0)
        lock.release()
        with mrlstore.open(sys.argv[1]):  # its open publishes for the reader waiting
            time.sleep(1.0)
    """), str(path))  # fmt: skip
    assert opening.stdout.readline().strip() == "holding", opening.stderr.read()
    with mrlstore.open(path, read_only=True) as reader:
        assert len(reader) == 0 and reader.info()["version"] is not None
    _, err = opening.communicate(timeout=60)
    assert opening.returncode == 0, err


def test_a_reader_whose_writer_left_without_publishing_publishes_itself(tmp_path):
    """A writer that quits before it publishes (a failed open): the reader waited out its wait and named a
    process that was gone; it publishes the catalog itself once the lock is free. A staged writer (a Ray
    write's driver, which never publishes) publishes a first version of a new store when it opens."""
    from mrlstore.upkeep.staged import StagedWriter

    path = tmp_path / "s.mrl"
    mrlstore.open(path, dim=DIM, index_dims=[8]).close()
    shutil.rmtree(path / "published", ignore_errors=True)
    quitting = _start(tmp_path, "quitting", textwrap.dedent("""
        import sys, time
        from mrlstore.tiers.locking import StoreLock
        lock = StoreLock(sys.argv[1], exclusive=True)
        print("holding", flush=True)
        time.sleep(0.5)
    """), str(path))  # fmt: skip
    assert quitting.stdout.readline().strip() == "holding", quitting.stderr.read()
    with mrlstore.open(path, read_only=True) as reader:
        assert len(reader) == 0
    quitting.communicate(timeout=60)
    staged = StagedWriter(tmp_path / "new.mrl", mrlstore.StoreConfig(dim=DIM, index_dims=(8,)))
    try:
        with mrlstore.open(tmp_path / "new.mrl", read_only=True) as reader:
            assert len(reader) == 0
    finally:
        staged.close()


def test_readers_open_across_a_compaction_refresh_to_the_new_generation(tmp_path):
    """A compaction swaps in a new folder: the readers open before it stay registered (the writer publishes
    the new generation for them), and a reader opened later in the same process, while an older one still
    has a catalog of the old generation open, gets the new generation's catalog with the new bands."""
    path = tmp_path / "s.mrl"
    vectors = np.random.default_rng(0).standard_normal((150, DIM)).astype(np.float32)
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(vectors[:100], ids=[f"x{i}" for i in range(100)])
    old_reader = mrlstore.open(path, read_only=True)
    stale_reader = mrlstore.open(path, read_only=True)  # never refreshes: keeps generation 0's catalog open
    with stale_reader, old_reader, mrlstore.open(path) as writer:
        writer.delete([f"x{i}" for i in range(10)])
        writer.compact()
        writer.add_vectors(vectors[100:], ids=[f"y{i}" for i in range(50)])
        deadline = time.monotonic() + 10  # the writer publishes within its interval (a second)
        while len(old_reader) != 140 and time.monotonic() < deadline:
            old_reader.refresh()
            time.sleep(0.05)
        assert len(old_reader) == 140
        assert old_reader.query(vectors[120], k=1).ids == ["y20"] and "x0" not in old_reader.query(vectors[0], k=3).ids
        writer.add_vectors(vectors[:1] + 1, ids=["z"])
        writer.close()
        with mrlstore.open(path, read_only=True) as reader:
            assert len(reader) == 141 and len(stale_reader) == 100
            got = np.asarray(reader.get(["x50"], dims=DIM).column("vector")[0].as_py(), dtype=np.float32)
            np.testing.assert_allclose(got, vectors[50], atol=1e-2)
            assert reader.query(vectors[50], k=1, dims=[DIM]).ids == ["x50"]


def test_published_catalogs_deleted_by_hand_are_published_again(tmp_path):
    """A reader met `NotAStoreError: ... (no catalog.duckdb)` when the published copies were gone, though the
    live catalog was whole; a reader without a live writer, or the writer's next open, now publishes again."""
    path = tmp_path / "s.mrl"
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(np.ones((3, DIM), np.float32) + np.arange(3)[:, None], ids=["a", "b", "c"])
    with mrlstore.open(path, read_only=True) as reader:
        assert len(reader) == 3
    for copy in (path / "published").glob("catalog-*.duckdb"):
        copy.unlink()
    with mrlstore.open(path, read_only=True) as reader:
        assert len(reader) == 3 and reader.get(["b"]).num_rows == 1
    for copy in (path / "published").glob("catalog-*.duckdb"):
        copy.unlink()
    with mrlstore.open(path) as writer, mrlstore.open(path, read_only=True) as reader:
        assert len(reader) == 3 and len(writer) == 3


def test_a_refresh_that_finds_a_compaction_under_way_opens_the_new_numbering_whole(tmp_path, monkeypatch):
    """A reader read HEAD (a new version of its numbering), then a compaction swapped the folder before it
    opened that version's catalog, which was gone: it fell forward to the new numbering's catalog and kept
    the old bands and indexes (get returned other rows' vectors, queries other rows)."""
    from mrlstore.upkeep import versions

    path = tmp_path / "s.mrl"
    vectors = np.random.default_rng(2).standard_normal((410, DIM)).astype(np.float32)
    ids = [f"r{i}" for i in range(410)]
    with mrlstore.open(path, dim=DIM, index_dims=[8]) as writer:
        writer.add_vectors(vectors[:400], ids=ids[:400])
        with mrlstore.open(path, read_only=True) as reader:
            writer.add_vectors(vectors[400:], ids=ids[400:])
            with writer._state.writing():
                writer._versions.publish_version(writer._state)  # the new version, same numbering
            real = versions._open_published

            def compacted_meanwhile(store, head):  # the reader's thread descheduled after reading HEAD
                monkeypatch.setattr(versions, "_open_published", real)
                writer.delete(ids[0:400:2])
                writer.compact()
                with writer._state.writing():
                    writer._versions.publish_version(writer._state)
                return real(store, head)

            monkeypatch.setattr(versions, "_open_published", compacted_meanwhile)
            assert reader.refresh() is True
            assert len(reader) == 210 and reader.verify() == []
            got = reader.get(ids[1:410:2]).column("vector").to_pylist()
            assert np.allclose(np.array(got, np.float32), vectors[1:410:2], atol=1e-2)
            assert reader.query(vectors[1], k=1).ids == ["r1"]


def test_a_readers_snapshot_after_a_compaction_is_refused_until_it_refreshes(tmp_path):
    """The copy paired the reader's catalog with the compacted folder's bands: ids held other rows'
    vectors (i10 held i510's), or the copy did not open."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, DIM)).astype(np.float32)
    ids = [f"i{i}" for i in range(1000)]
    with mrlstore.open(tmp_path / "s", dim=DIM, bands=(16, DIM), dtype="float32") as writer:
        writer.add_vectors(x, ids=ids)
        with mrlstore.open(tmp_path / "s", read_only=True) as reader:
            reader.snapshot(tmp_path / "before")  # its own numbering: fine
            writer.delete(ids[:500])
            writer.compact()
            writer.add_vectors(rng.standard_normal((600, DIM)).astype(np.float32), ids=[f"n{i}" for i in range(600)])
            with pytest.raises(mrlstore.StoreChangedError, match="refresh"):
                reader.snapshot(tmp_path / "after")
            assert not (tmp_path / "after").exists()
            reader.refresh()
            reader.snapshot(tmp_path / "after")
    with mrlstore.open(tmp_path / "before", read_only=True) as copy:
        assert len(copy) == 1000 and copy.verify() == []
        assert np.array_equal(np.asarray(copy.get(["i10"]).column("vector")[0].values), x[10])
    with mrlstore.open(tmp_path / "after", read_only=True) as copy:
        assert len(copy) == 1100 and copy.verify() == []
        assert np.array_equal(np.asarray(copy.get(["i510"]).column("vector")[0].values), x[510])


@contextmanager
def _reader_then_more_rows(path: Path, x: np.ndarray, ids: list[str]) -> Iterator[tuple[mrlstore.Store, ...]]:
    """A writer of ``x[:1000]``, a reader opened then, and the rest of ``x`` committed and published."""
    with mrlstore.open(path, dim=DIM, bands=(8, 16, DIM), index_dims=[8], dtype="float32") as writer:
        writer.add_vectors(x[:1000], ids=ids[:1000])
        with mrlstore.open(path, read_only=True) as reader:
            writer.add_vectors(x[1000:], ids=ids[1000:])
            publish_once(writer)
            yield writer, reader


@pytest.mark.parametrize("deleted", [10, 3000])
def test_a_reader_refreshed_then_compacted_under_keeps_reading_its_own_version(tmp_path, deleted):
    """A refresh in the same numbering brought new rows the reader had not mapped; after a compaction it
    mapped them from the new folder's renumbered files: get() gave other rows' vectors, an exact query
    other rows (or, files now shorter, CorruptStoreError), and its verify() reported a healthy store as damaged."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6000, DIM)).astype(np.float32)
    ids = [f"i{i}" for i in range(6000)]
    with _reader_then_more_rows(tmp_path / "s", x, ids) as (writer, reader):
        assert reader.refresh() and len(reader) == 6000
        writer.delete(ids[:deleted])
        writer.compact()
        got = reader.get(["i1500", "i3000", "i5500"]).column("vector").to_pylist()
        assert np.array_equal(np.array(got, np.float32), x[[1500, 3000, 5500]])
        assert reader.query(x[5500], k=1, dims=[DIM]).ids == ["i5500"]
        with pytest.raises(mrlstore.StoreChangedError, match="refresh"):
            reader.verify()  # the folder's files are the compacted numbering's
        assert reader.refresh() and len(reader) == 6000 - deleted and reader.verify() == []
        assert reader.get(["i5500"]).column("vector").to_pylist() == [x[5500].tolist()]


@pytest.mark.parametrize("compactions", [1, 2])
def test_a_compaction_while_a_refresh_maps_new_rows_makes_it_open_the_new_numbering(tmp_path, monkeypatch, compactions):
    """The refresh checked the numbering, then a compaction swapped the folder before it mapped the new rows:
    it must not pair its version with the swapped-in files (it opens the new numbering whole instead). Two
    compactions: the second folder took the inode the first freed (ext4 reuses it), and looked like the
    folder the reader opened."""
    from mrlstore.tiers.indexes import IndexSet

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, DIM)).astype(np.float32)
    ids = [f"i{i}" for i in range(3000)]
    with _reader_then_more_rows(tmp_path / "s", x, ids) as (writer, reader):
        real = IndexSet.extend_all

        def compacted_meanwhile(self, snap, vectors):  # the reader's thread descheduled meanwhile
            monkeypatch.setattr(IndexSet, "extend_all", real)
            for n in range(compactions):
                writer.delete(ids[n * 10 : n * 10 + 10])
                writer.compact()
            publish_once(writer)
            return real(self, snap, vectors)

        monkeypatch.setattr(IndexSet, "extend_all", compacted_meanwhile)
        assert reader.refresh() and len(reader) == 3000 - 10 * compactions and reader.verify() == []
        got = reader.get(["i1500", "i2999"]).column("vector").to_pylist()
        assert np.array_equal(np.array(got, np.float32), x[[1500, 2999]])
        assert reader.query(x[2500], k=1, dims=[DIM]).ids == ["i2500"]


def test_a_readers_folder_is_told_apart_from_the_next_folder_made_at_its_path(tmp_path):
    """A compaction deletes the folder it swapped out, and ext4 gives the freed inode to the next folder made
    (50 of 50 tries here): a reader that knew its folder by (device, inode) alone could take a later
    compaction's folder for its own. Held open, the folder keeps its inode."""
    path = tmp_path / "store"
    path.mkdir()
    held = HeldFolder(path)
    for _ in range(20):
        shutil.rmtree(path)
        path.mkdir()
        assert not held.is_at(path)
    held.release()
    assert HeldFolder(path).is_at(path)


def test_readers_let_go_of_their_folder_when_closed(tmp_path):
    with mrlstore.open(tmp_path / "s", dim=DIM) as writer:
        writer.add_vectors(np.ones((10, DIM), np.float32))
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with mrlstore.open(tmp_path / "s", read_only=True) as reader:
                reader.refresh()
        assert len(os.listdir("/proc/self/fd")) == before
