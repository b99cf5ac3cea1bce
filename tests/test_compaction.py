"""Compaction: the same content on fewer rows and less disk; a SIGKILL at any moment leaves the old or the
new store (the random-kill loop of tests/test_crash.py also compacts)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from errors_support import ctrl_c_while_closing
from publishing import publish_once

import mrlstore
from mrlstore.testing import mrl_like

N = 12_000


def _disk_bytes(root: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _content(store):
    table = store.get(sorted(store.sql("SELECT id FROM items").column("id").to_pylist()), dims=store.dim)
    return table.column("id").to_pylist(), np.array(table.column("vector").to_pylist()), table.column("n").to_pylist()


@pytest.fixture(scope="module")
def half_deleted_original(tmp_path_factory):
    path = tmp_path_factory.mktemp("compaction") / "s"
    x, _ = mrl_like(N, 256, noise=1.0, seed=0)
    with mrlstore.open(path, dim=256, bands=(16, 64, 256), index_dims=(16,), chunk_rows=1024) as s:
        s.add_vectors(x, ids=[f"r{i}" for i in range(N)], metadata=[{"n": i} for i in range(N)])
        s.delete([f"r{i}" for i in range(0, N, 2)])
        s.tune(recall=0.9)
    return path, x


@pytest.fixture
def half_deleted(half_deleted_original, tmp_path):
    """A tuned store with every other row deleted: each test its own copy (built once: 10 s)."""
    original, x = half_deleted_original
    with mrlstore.open(original, read_only=True) as s:
        path = s.snapshot(tmp_path / "s")
    return path, x


def test_compaction_keeps_the_content_and_halves_the_disk(half_deleted):
    path, x = half_deleted
    before_disk = _disk_bytes(path / "vectors")
    with mrlstore.open(path) as s:
        before = _content(s)
        hits_before = [s.query(x[i], k=5, dims=[256]).ids for i in range(1, 40, 7)]
        tuned = s.info()["tuned"]
        assert s.compact() == {"rows_before": N, "rows_after": N // 2}
        assert s.info()["rows"] == N // 2 and len(s) == N // 2 and s.info()["tuned"] == tuned
        after = _content(s)
        assert after[0] == before[0] and after[2] == before[2]
        np.testing.assert_array_equal(after[1], before[1])
        assert [s.query(x[i], k=5, dims=[256]).ids for i in range(1, 40, 7)] == hits_before
        assert s.query(x[3], k=1, dims=[16, 256]).ids == ["r3"]  # the HNSW cache was rebuilt too
        s.add_vectors(x[:1] + 1, ids=["new"])  # and the store goes on
        assert s.verify() == []
    assert _disk_bytes(path / "vectors") <= 0.6 * before_disk
    assert not list(path.parent.glob(".s.compact-*"))
    with mrlstore.open(path, read_only=True) as s:
        assert len(s) == N // 2 + 1 and s.verify() == []


@pytest.mark.parametrize("value", [100.0, np.nan])
def test_a_compaction_refuses_rows_whose_values_disagree_with_their_norms(tmp_path, value):
    """Copied, a damaged row's norms were computed again from the damage: verify() then found nothing, for
    good (finite damage), or compact() said NonFiniteError about a batch the caller never gave (NaN)."""
    path = tmp_path / "s"
    x, _ = mrl_like(3000, 256, noise=1.0, seed=0)
    with mrlstore.open(path, dim=256, bands=(16, 64, 256), index_dims=(16,), chunk_rows=1024) as s:
        s.add_vectors(x, ids=[f"r{i}" for i in range(3000)])
        s.delete(["r2999"])
    chunk = path / "vectors" / "band_00064_00256" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    middle = len(raw) // 3  # inside the rows, clear of the shard index at the end
    raw[middle : middle + 64] = np.full(32, value, np.float16).tobytes()
    chunk.write_bytes(bytes(raw))
    with mrlstore.open(path) as s:
        with pytest.raises(mrlstore.CorruptStoreError, match="compact\\(\\) stopped, the store unchanged"):
            s.compact()
        assert s.info()["rows"] == 3000 and len(s) == 2999
        found = s.verify(full=True)  # every row: the sampled check may pass it by
        assert len(found) == 1 and "row_norms disagree" in found[0] and "of 1 row(s)" in found[0]
    assert not list(tmp_path.glob(".s.compact-*"))


def test_compacting_a_store_without_deletions_changes_nothing(tmp_path):
    with mrlstore.open(tmp_path / "s", dim=16, bands=(8, 16), index_dims=(8,)) as s:
        s.add_vectors(np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32))
        assert s.compact() == {"rows_before": 10, "rows_after": 10}
    with mrlstore.open(tmp_path / "s", read_only=True) as s, pytest.raises(mrlstore.ReadOnlyError):
        s.compact()


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
@pytest.mark.parametrize("kill_after", [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7])  # a compaction: ~0.5 s
def test_a_compaction_killed_at_any_moment_leaves_the_old_or_the_new_store(half_deleted, kill_after):
    path, _ = half_deleted
    with mrlstore.open(path, read_only=True) as s:
        expected = _content(s)
    code = f"import mrlstore\ns = mrlstore.open({str(path)!r})\nprint('go', flush=True)\ns.compact()\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    time.sleep(kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with mrlstore.open(path) as s:  # a writer: it also clears what the killed compaction left
        assert s.info()["rows"] in (N, N // 2)  # old or new, whole
        got = _content(s)
        assert got[0] == expected[0] and got[2] == expected[2]
        np.testing.assert_array_equal(got[1], expected[1])
        assert s.verify() == []
    assert not [p.name for p in path.parent.iterdir() if "compact" in p.name]  # nothing left beside it


def test_a_compaction_of_only_deleted_rows_keeps_every_column(tmp_path):
    """The new store gets the old one's columns first, with their types: a column no live row fills is not
    dropped, and later values still have to fit it."""
    with mrlstore.open(tmp_path / "s", dim=16, bands=(8, 16), index_dims=(8,)) as s:
        x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
        s.add_vectors(x[:2], ids=["a", "b"], metadata=[{"n": 1, "tag": "x"}, {"n": 2, "tag": "y"}])
        columns = s.sql("SELECT * FROM items").schema
        s.delete(["a", "b"])
        assert s.compact() == {"rows_before": 2, "rows_after": 0}
        assert s.sql("SELECT * FROM items").schema == columns
        with pytest.raises(mrlstore.MetadataError, match="BIGINT"):
            s.add_vectors(x[2:], ids=["c"], metadata=[{"n": "text"}])
        s.add_vectors(x[2:], ids=["c"], metadata=[{"n": 3}])
        assert s.get(["c"]).column("n").to_pylist() == [3]


def test_what_a_killed_compaction_leaves_goes_whatever_the_store_is_named(tmp_path):
    path = tmp_path / "photos[2024].mrl"  # glob characters in the name
    with mrlstore.open(path, dim=16, bands=(8, 16), index_dims=(8,)) as s:
        s.add_vectors(np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32))
    left = tmp_path / ".photos[2024].mrl.compact-12345"
    (left / "vectors").mkdir(parents=True)
    creating = tmp_path / "..photos[2024].mrl.compact-12345.creating-12345-678"
    creating.mkdir()
    neighbours = tmp_path / ".photos[2024].mrl.compact-7.compact-99"  # a store named "photos[2024].mrl.compact-7"
    neighbours.mkdir()
    hidden = tmp_path / "..photos[2024].mrl.compact-12345"  # the store ".photos[2024].mrl" compacting
    hidden.mkdir()
    with mrlstore.open(path) as s:
        assert len(s) == 4
    assert not left.exists() and not creating.exists()
    assert neighbours.exists() and hidden.exists(), "another store's compaction in progress"


def test_reads_in_other_threads_wait_for_a_compaction_and_never_mix_two_stores(tmp_path):
    """get and sql hold the store's visibility lock as queries do: during compactions they neither fail on
    closed files nor pair a row of the old numbering with the new files. A scan begun before a compaction
    reads its snapshot to the end (the old files, through its maps)."""
    path = tmp_path / "s"
    x = np.random.default_rng(4).standard_normal((3000, 32)).astype(np.float32)
    with mrlstore.open(path, dim=32, bands=(8, 32), index_dims=(8,), chunk_rows=512) as s:
        s.add_vectors(x, ids=[f"r{i}" for i in range(3000)])
        scan = s.scan(dims=32, batch_size=256)
        next(iter(scan))  # the first batch, read before the compaction
        stop, problems = threading.Event(), []

        def read() -> None:
            rng = np.random.default_rng(0)
            while not stop.is_set():
                i = int(rng.integers(2000, 3000))
                try:
                    got = np.asarray(s.get([f"r{i}"], dims=32).column("vector")[0].as_py(), np.float32)
                    if not np.allclose(got, x[i], atol=2e-2):
                        problems.append(f"r{i} came back with another row's vector")
                    s.sql("SELECT count(*) FROM items")
                except Exception as e:  # noqa: BLE001 - any failure is the finding
                    problems.append(repr(e))

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for round_ in range(3):
                s.delete([f"r{i}" for i in range(round_ * 500, round_ * 500 + 500)])
                s.compact()
        finally:
            stop.set()
            thread.join()
        assert problems == []
        rest = scan.read_all()  # the snapshot it began on, to the end
        assert rest.column("id").to_pylist() == [f"r{i}" for i in range(256, 3000)]
        assert np.allclose(
            np.asarray(rest.column("vector").combine_chunks().values).reshape(-1, 32), x[256:], atol=2e-2
        )


def test_a_store_opened_through_a_link_is_compacted_where_it_lies(tmp_path):
    """The compaction's exchange swapped the link for the compacted folder: the linked folder stayed, old,
    as a second store a writer could open beside the first (a write there was not seen through the link)."""
    x, _ = mrl_like(2000, 64, seed=1)
    real, link = tmp_path / "disk" / "store.mrl", tmp_path / "store.mrl"
    with mrlstore.open(real, dim=64, bands=(16, 64)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(2000)])
    link.symlink_to(real)
    with mrlstore.open(link) as store:
        store.delete([str(i) for i in range(1500)])
        assert store.compact().rows_after == 500
        with pytest.raises(mrlstore.StoreLockedError):
            mrlstore.open(real)  # one store, one writer
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["disk", "store.mrl"]
    with mrlstore.open(real, read_only=True) as store:
        assert len(store) == 500 and store.verify() == []


def test_scans_started_before_a_compaction_or_a_refresh_read_their_snapshot_to_the_end(tmp_path):
    """A scan reads lazily: the compaction (by the same handle) or the refresh of a reader to the compacted
    numbering closed the maps it read, and it raised StoreClosedError for a store that was open."""
    x = np.random.default_rng(5).standard_normal((3000, 64)).astype(np.float32)
    ids = [f"r{i}" for i in range(3000)]
    live = [i for i in range(3000) if i % 10]
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), chunk_rows=256, dtype="float32") as store:
        store.add_vectors(x[:1000], ids=ids[:1000])
        with mrlstore.open(tmp_path / "s", read_only=True) as reader:
            store.add_vectors(x[1000:], ids=ids[1000:])  # rows neither handle has read
            store.delete(ids[::10])
            publish_once(store)
            assert reader.refresh()
            scans = [handle.scan(dims=64, batch_size=250) for handle in (store, reader)]
            firsts = [scan.read_next_batch() for scan in scans]
            store.compact()
            store.add_vectors(x[:5] + 1, ids=["n0", "n1", "n2", "n3", "n4"])
            publish_once(store)
            assert reader.refresh() and len(reader) == len(live) + 5
            for first, scan in zip(firsts, scans):
                batches = [first, *scan]
                assert [i for b in batches for i in b.column("id").to_pylist()] == [ids[i] for i in live]
                got = np.concatenate([np.asarray(b.column("vector").values).reshape(-1, 64) for b in batches])
                assert np.array_equal(got, x[live])


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("ends", ["closed", "dropped"])
def test_a_scan_reads_on_after_its_handle_ends_and_another_compacts(tmp_path, read_only, ends):
    x = np.random.default_rng(1).standard_normal((3000, 64)).astype(np.float32)
    ids = [f"r{i}" for i in range(3000)]
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), chunk_rows=256, dtype="float32") as store:
        store.add_vectors(x, ids=ids)
        store.delete(ids[::3])
    live = [i for i in range(3000) if i % 3]
    store = mrlstore.open(tmp_path / "s", read_only=read_only)
    scan = store.scan(dims=64, batch_size=200)
    first = scan.read_next_batch()
    if ends == "closed":
        store.close()
    del store
    gc.collect()  # dropped: the garbage collector closes it
    with mrlstore.open(tmp_path / "s") as other:
        assert other.compact()["rows_after"] == len(live)  # the files the scan began on are deleted
    batches = [first, *scan]
    assert [i for b in batches for i in b.column("id").to_pylist()] == [ids[i] for i in live]
    got = np.concatenate([np.asarray(b.column("vector").values).reshape(-1, 64) for b in batches])
    assert np.array_equal(got, x[live])


def _deleted_bands_mapped() -> set[str]:
    """The band arrays of deleted chunk files this process still maps."""
    with open("/proc/self/maps") as maps:
        paths = {" ".join(line.split()[5:-1]) for line in maps if line.rstrip().endswith("(deleted)")}
    return {p.split("/vectors/")[-1].split("/c/")[0] for p in paths if "/vectors/" in p}


@pytest.mark.parametrize("dims, held", [(None, set()), (16, {"band_00000_00016"})])
def test_a_scan_across_a_compaction_keeps_only_the_files_it_reads(tmp_path, dims, held):
    """A scan held every band's old files (their disk space) until dropped, those it never read too."""
    x = np.random.default_rng(0).standard_normal((4000, 256)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=256, bands=(16, 64, 256), chunk_rows=512) as store:
        store.add_vectors(x, ids=[f"r{i}" for i in range(4000)], metadata=[{"n": i} for i in range(4000)])
        store.delete([f"r{i}" for i in range(0, 4000, 2)])
        scan = store.scan(dims=dims, columns=["n"], batch_size=100)
        scan.read_next_batch()
        store.compact()
        assert _deleted_bands_mapped() == held
        assert sum(b.num_rows for b in scan) == 1900
        del scan
        assert _deleted_bands_mapped() == set()


@pytest.mark.parametrize("where", ["_exchange", "fsync_dir"])
def test_a_compaction_interrupted_after_its_swap_moves_the_handle_to_the_new_files(tmp_path, monkeypatch, where):
    """Ctrl-C just after the folder swap committed: the handle wrote on to the swapped-out files, unlocked
    (a second writer could open the store), and lost every later add."""
    from mrlstore.upkeep import compaction

    x = np.random.default_rng(6).standard_normal((2000, 64)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64)) as store:
        store.add_vectors(x, ids=[f"r{i}" for i in range(2000)])
        store.delete([f"r{i}" for i in range(0, 2000, 2)])
        real = getattr(compaction, where)

        def then_interrupt(*args):
            real(*args)
            raise KeyboardInterrupt

        monkeypatch.setattr(compaction, where, then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            store.compact()
        monkeypatch.setattr(compaction, where, real)
        assert store.info()["rows"] == 1000 and store.verify() == []
        store.add_vectors(x[:10] + 1, ids=[f"later{i}" for i in range(10)])
        with pytest.raises(mrlstore.StoreLockedError):
            mrlstore.open(tmp_path / "s")
    with mrlstore.open(tmp_path / "s") as store:
        assert len(store) == 1010 and store.verify() == []
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_a_compaction_interrupted_while_the_handle_closes_its_old_files_says_so_and_unlocks(tmp_path):
    """Ctrl-C after the old catalog closed left a handle neither open nor marked closed (adds said
    'Connection already closed!' as corruption, verify() listed rows missing) that kept the new files'
    writer lock until the process ended: no process could open the store for writing."""
    x = np.random.default_rng(7).standard_normal((2000, 64)).astype(np.float32)
    store = mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64))
    store.add_vectors(x, ids=[f"r{i}" for i in range(2000)])
    store.delete([f"r{i}" for i in range(100)])
    with ctrl_c_while_closing(store), pytest.raises(KeyboardInterrupt):
        store.compact()
    for call in (lambda: store.add_vectors(x[:1]), store.verify, lambda: len(store)):
        with pytest.raises(mrlstore.StoreClosedError, match=r"interrupt \(Ctrl-C\)"):
            call()
    with mrlstore.open(tmp_path / "s") as again:  # the handle holds no lock
        assert len(again) == 1900 and again.verify() == []
    store.close()
