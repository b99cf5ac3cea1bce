"""The HNSW cache: round trips, refuses untrustworthy files, survives concurrent searches and adds."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from mrlstore.tiers import hnsw_file
from mrlstore.tiers.hnsw import IndexUnusable, PrefixIndex
from mrlstore.tiers.hnsw_file import HnswFileError, read_state


def _filled(rng, n=500, dim=8, metric="cosine"):
    index = PrefixIndex(dim, metric, M=8, ef_construction=50, capacity=16)  # forces resizes
    x = rng.standard_normal((n, 32)).astype(np.float32)
    index.add(x, np.arange(n), covered_rows=n)
    return index, x


def test_save_load_round_trip(tmp_path, rng):
    index, x = _filled(rng)
    index.mark_deleted(np.array([3, 4]))
    index.save(tmp_path / "p")
    loaded = PrefixIndex.load(tmp_path / "p", 8, "cosine", 8, 50)
    assert loaded.covered_rows == 500 and loaded.live_count == 498
    assert loaded.holds(5) and not loaded.holds(3) and not loaded.holds(10_000)
    found = loaded.search(x[:20], k=1, ef=64)[:, 0]
    assert (found[5:] == np.arange(5, 20)).mean() > 0.9
    assert 3 not in loaded.search(x[3], k=5, ef=64)[0]


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete_data", "delete_sidecar", "params"])
def test_untrustworthy_files_are_refused(tmp_path, rng, damage):
    index, _ = _filled(rng)
    index.save(tmp_path / "p")
    data, side = PrefixIndex.paths(tmp_path / "p")
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "garble":
        raw = bytearray(data.read_bytes())
        raw[100:200] = b"\xff" * 100
        data.write_bytes(bytes(raw))
    elif damage == "delete_data":
        data.unlink()
    elif damage == "delete_sidecar":
        side.unlink()
    with pytest.raises(IndexUnusable):
        PrefixIndex.load(tmp_path / "p", 8, "cosine", 8 if damage != "params" else 16, 50)


def _ip_filled(rng) -> PrefixIndex:
    x = rng.standard_normal((500, 8)).astype(np.float32)
    index = PrefixIndex(8, "ip", M=8, ef_construction=50, capacity=16)
    index.add(x, np.arange(500), covered_rows=500)
    index.add((1000 * x[7:8]).astype(np.float32), np.array([500]), covered_rows=501)  # kept beside the graph
    return index


EDITS = {  # a sidecar field as damage or a hand left it: rows hidden from searches, or every query failing
    "covered_rows": 3000, "element_count": None, "deleted_count": "abc", "ip_radius": 1e300,
    "ip_limit": "abc", "ip_unlinked": [5, "x"], "ip_long": [[500, [1.0, 2.0, 3.0]]],
}  # fmt: skip


@pytest.mark.parametrize("field", list(EDITS))
@pytest.mark.parametrize("checksummed", [True, False])
def test_an_edited_sidecar_is_refused_so_the_cache_is_rebuilt(tmp_path, rng, field, checksummed):
    import json

    metric = "ip" if field.startswith("ip_") else "cosine"
    index = _ip_filled(rng) if metric == "ip" else _filled(rng)[0]
    index.save(tmp_path / "p")
    _, side_path = PrefixIndex.paths(tmp_path / "p")
    side = json.loads(side_path.read_text())
    if not checksummed:  # a sidecar saved before the checksum of its own fields: its values are checked
        del side["side_blake2b"]
        PrefixIndex.load(tmp_path / "p", 8, metric, 8, 50)  # untouched, it loads
        if field == "covered_rows":
            return  # a plausible number: only the checksum tells it was changed
    side[field] = EDITS[field]
    side_path.write_text(json.dumps(side))
    for deferred in (None, lambda: index):
        with pytest.raises(IndexUnusable, match="checksum|count of rows|ip"):
            PrefixIndex.load(tmp_path / "p", 8, metric, 8, 50, rebuild=deferred)


def test_search_pads_when_fewer_rows_than_k(rng):
    index, _ = _filled(rng, n=5)
    out = index.search(rng.standard_normal(8).astype(np.float32), k=10, ef=10)
    assert out.shape == (1, 10) and (out[0, :5] >= 0).all() and (out[0, 5:] == -1).all()


def test_concurrent_search_and_add(rng):
    index, x = _filled(rng, n=200)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                index.search(r.standard_normal((4, 8)).astype(np.float32), k=5, ef=int(r.integers(10, 80)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    more = rng.standard_normal((3000, 8)).astype(np.float32)
    for lo in range(0, 3000, 100):
        index.add(more[lo : lo + 100], np.arange(200 + lo, 300 + lo), covered_rows=300 + lo)
        index.mark_deleted(np.array([lo // 100]))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert index.live_count == 3200 - 30


def _hnswlib_state(path, dim, capacity, ours: bool):
    """hnswlib's state dict of the index at ``path``, loaded by hnswlib's own loader or from read_state."""
    import hnswlib

    if ours:
        index = hnswlib.Index.__new__(hnswlib.Index)
        index.__setstate__((read_state(path, "cosine", dim, capacity),))
    else:
        index = hnswlib.Index(space="cosine", dim=dim)
        index.load_index(str(path), max_elements=capacity)
    state = index.__getstate__()[0]
    order = np.argsort(state["label_lookup_internal"])  # hnswlib lists its hash map's order
    for key in ("label_lookup_internal", "label_lookup_external"):
        state[key] = state[key][order]
    return state


@pytest.mark.parametrize("n", [0, 1, 3000])
def test_the_file_reader_gives_the_index_hnswlib_s_own_loader_builds(tmp_path, rng, n):
    index = PrefixIndex(8, "cosine", M=4, ef_construction=20, capacity=16)  # M=4: many upper levels
    x = rng.standard_normal((n, 8)).astype(np.float32)
    index.add(x, np.arange(n) * 7 + 3, covered_rows=n)
    index.mark_deleted(np.arange(min(n, 5)) * 7 + 3)
    index.save(tmp_path / "p")
    data, _ = PrefixIndex.paths(tmp_path / "p")
    ours, theirs = _hnswlib_state(data, 8, 5000, True), _hnswlib_state(data, 8, 5000, False)
    assert n < 3000 or (theirs["max_level"] >= 3 and theirs["has_deletions"])
    if n == 0:  # hnswlib's loader leaves it set on an empty index; ours adds a first element alone, as new
        assert theirs.pop("ep_added") and not ours["ep_added"]
    for key, value in theirs.items():
        if key in ("seed", "num_threads"):  # not saved in the file
            continue
        if isinstance(value, np.ndarray):
            assert np.array_equal(ours[key], value), key
        else:
            assert ours[key] == value, key
    loaded = PrefixIndex.load(tmp_path / "p", 8, "cosine", 4, 20)
    assert loaded.live_count == max(n - 5, 0)
    if n:
        assert np.array_equal(loaded.search(x[10:20], 1, 40), index.search(x[10:20], 1, 40))


@pytest.mark.parametrize("damage", ["short_header", "count", "link_size", "tail_length"])
def test_the_file_reader_refuses_a_file_whose_sizes_do_not_add_up(tmp_path, rng, damage):
    """The checksum stops damaged files before they are read; the reader checks the sizes on its own too."""
    index, _ = _filled(rng, n=300)
    index.save(tmp_path / "p")
    data, _ = PrefixIndex.paths(tmp_path / "p")
    raw = bytearray(data.read_bytes())
    count = int(np.frombuffer(raw[16:24], "<u8")[0])
    tail = 96 + count * int(np.frombuffer(raw[24:32], "<u8")[0])
    if damage == "short_header":
        raw = raw[:50]
    elif damage == "count":
        raw[16:24] = np.array([count * 1000], "<u8").tobytes()
    elif damage == "link_size":
        first = tail + 4 * int(np.flatnonzero(np.frombuffer(raw[tail:], "<u4"))[0])
        raw[first : first + 4] = np.array([5], "<u4").tobytes()
    else:
        raw += b"\0\0\0\0"
    data.write_bytes(bytes(raw))
    with pytest.raises(HnswFileError):
        read_state(data, "cosine", 8, 5000)


@pytest.mark.skipif(hnsw_file._native is None, reason="built without the native walk (_hnsw_walk.c)")
@pytest.mark.parametrize("damage", [None, "link_size", "past_max_level", "longer", "shorter", "empty"])
def test_the_native_walk_and_its_python_twin_agree(tmp_path, rng, damage):
    index = PrefixIndex(8, "cosine", M=4, ef_construction=20, capacity=16)  # M=4: many upper levels
    index.add(rng.standard_normal((3000, 8)).astype(np.float32), np.arange(3000), covered_rows=3000)
    index.save(tmp_path / "p")
    raw = PrefixIndex.paths(tmp_path / "p")[0].read_bytes()
    head = np.frombuffer(raw[:96], hnsw_file.HEADER)[0]
    count, link_bytes = int(head["cur_element_count"]), (int(head["max_M"]) + 1) * 4
    upper = np.frombuffer(raw, "<u4", offset=96 + count * int(head["size_data_per_element"])).copy()
    first = int(np.flatnonzero(upper)[0])
    if damage == "link_size":
        upper[first] = 5
    elif damage == "past_max_level":
        upper[first] = link_bytes * (int(head["max_level"]) + 1)
    elif damage in ("longer", "shorter", "empty"):
        upper = {"longer": np.append(upper, 0), "shorter": upper[:-3], "empty": upper[:0]}[damage].astype("<u4")
    outcomes = []
    for walk in (hnsw_file._native.upper_levels, hnsw_file.walk_upper_levels):
        levels = np.zeros(count, np.int32)
        outcomes.append((walk(upper, levels, count, link_bytes, int(head["max_level"])), levels))
    (native, native_levels), (twin, twin_levels) = outcomes
    assert native == twin and np.array_equal(native_levels, twin_levels)
    whole = native[2] < 0 and native[1] == len(upper)
    assert whole == (damage is None)
    if damage is None:
        assert native_levels.max() >= 3 and np.count_nonzero(native_levels) > count // 8


FULL_DISK = r"""
import resource, signal, sys
from pathlib import Path
import numpy as np
from mrlstore.tiers.hnsw import IndexNotSaved, PrefixIndex
base = Path(sys.argv[1])
x = np.random.default_rng(0).standard_normal((20000, 8)).astype(np.float32)
index = PrefixIndex(8, "cosine", M=8, ef_construction=20, capacity=16)
index.add(x[:2000], np.arange(2000), covered_rows=2000)
index.save(base)  # about 0.2 MB: whole
index.add(x[2000:], np.arange(2000, 20000), covered_rows=20000)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    index.save(base)  # about 2 MB: hnswlib stops at 1 MB and says nothing
except IndexNotSaved as e:
    print("refused:", e)
"""


def test_a_file_hnswlib_could_not_write_whole_is_refused_and_the_saved_copy_kept(tmp_path):
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "p")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "refused: hnswlib wrote an incomplete index (is the disk full?)" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.hnsw", "p.json"]  # no temporary file left
    kept = PrefixIndex.load(tmp_path / "p", 8, "cosine", 8, 20)
    assert kept.covered_rows == 2000 and kept.live_count == 2000


def _top(queries, x, k):
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


def test_inner_product_is_searched_as_l2_over_lifted_rows(tmp_path):
    """hnswlib's ip space is no metric, and its graph found 0.65 of a 16-d prefix's top 200 with ef=400; over
    rows lifted to one norm, l2 orders as the inner product does and the graph finds them."""
    from mrlstore.testing import mrl_like_split

    x, queries = mrl_like_split(8000, 100, 128, seed=11)
    x, queries = x[:, :16].copy(), queries[:, :16].copy()
    index = PrefixIndex(16, "ip", M=8, ef_construction=40, capacity=16)
    index.add(x, np.arange(len(x)), covered_rows=len(x))
    truth = _top(queries, x, 200)
    found = index.search(queries, k=200, ef=400)
    assert np.mean([len(set(f) & set(t)) / 200 for f, t in zip(found, truth)]) >= 0.95
    index.save(tmp_path / "p")
    loaded = PrefixIndex.load(tmp_path / "p", 16, "ip", 8, 40)
    assert np.array_equal(loaded.search(queries, k=10, ef=400), index.search(queries, k=10, ef=400))


def test_longer_rows_than_the_lift_rebuild_it_and_deleted_rows_stay_hidden(tmp_path, rng):
    x = rng.standard_normal((400, 8)).astype(np.float32)
    index = PrefixIndex(8, "ip", M=8, ef_construction=50, capacity=16)
    index.add(x, np.arange(400), covered_rows=400)
    index.mark_deleted(np.array([0, 1]))
    long_rows = 10 * x[2:4]  # far past the first rows' norms: the radius grows, the graph is rebuilt
    index.add(long_rows, np.array([400, 401]), covered_rows=402)
    assert index.live_count == 400 and not index.holds(0) and index.holds(5)
    assert index.search(x[2], k=1, ef=64)[0, 0] == 400  # the longest row along the query wins inner product
    found = index.search(x[10:40], k=10, ef=200)
    scores = x[10:40] @ np.vstack([x, long_rows]).T
    scores[:, :2] = -np.inf  # deleted
    truth = np.argsort(-scores, axis=1)[:, :10]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.9
    assert 0 not in found and 1 not in found


def test_an_ip_index_saved_before_the_lift_is_rebuilt(tmp_path, rng):
    import json

    index = PrefixIndex(8, "ip", M=8, ef_construction=50, capacity=16)
    index.add(rng.standard_normal((100, 8)).astype(np.float32), np.arange(100), covered_rows=100)
    index.save(tmp_path / "p")
    side = PrefixIndex.paths(tmp_path / "p")[1]
    old = json.loads(side.read_text())
    del old["ip_radius"], old["side_blake2b"]  # what releases before the lift wrote
    side.write_text(json.dumps(old))
    with pytest.raises(IndexUnusable, match="ip graph"):
        PrefixIndex.load(tmp_path / "p", 8, "ip", 8, 50)


def test_a_row_far_longer_than_the_rest_is_kept_beside_the_graph(tmp_path, monkeypatch):
    """Lifted to its norm, one row 10,000 times longer than the rest sat every other row at about that
    norm from every query, and float32 l2 lost their order (recall@10 fell from 0.94 to 0.07)."""
    from mrlstore.tiers import ip_lift

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((100, 16)).astype(np.float32)
    index = PrefixIndex(16, "ip", M=16, ef_construction=100, capacity=16)
    index.add(x, np.arange(3000), covered_rows=3000)
    long_row = (x[5] / np.linalg.norm(x[5]) * 10_000).astype(np.float32)[None, :]
    index.add(long_row, np.array([3000]), covered_rows=3001)
    every = np.vstack([x, long_row])
    truth = _top(queries, every, 10)
    found = index.search(queries, k=10, ef=200)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.9
    assert index.live_count == 3001 and index.holds(3000)
    index.save(tmp_path / "p")
    loaded = PrefixIndex.load(tmp_path / "p", 16, "ip", 16, 100)
    assert np.array_equal(loaded.search(queries, k=10, ef=200), found)
    loaded.mark_deleted(np.array([3000]))
    assert loaded.live_count == 3000 and not loaded.holds(3000) and 3000 not in loaded.search(queries, k=10, ef=200)
    monkeypatch.setattr(ip_lift, "LONG_MAX", 2)  # many beside the graph (norms grew): a rebuild takes them in
    more = (x[6:9] / np.linalg.norm(x[6:9], axis=1, keepdims=True) * 100).astype(np.float32)
    loaded.add(more, np.array([3001, 3002, 3003]), covered_rows=3004)
    assert not loaded._lift.long and loaded.live_count == 3003
    assert loaded.search(more[:1], k=1, ef=200)[0, 0] == 3001


@pytest.mark.parametrize("long_first", [True, False])
def test_a_row_number_written_again_on_the_other_side_of_the_lift_keeps_one_copy(tmp_path, rng, long_first):
    """Rows of a failed commit are written again with new vectors: a row that was kept beside the graph and
    comes back ordinary (or the reverse) must not leave its old copy searchable, nor after a reload."""
    x = rng.standard_normal((500, 8)).astype(np.float32)
    index = PrefixIndex(8, "ip", M=8, ef_construction=50, capacity=16)
    index.add(x, np.arange(500), covered_rows=500)
    ordinary, long = x[7:8].copy(), (1000 * x[7:8]).astype(np.float32)
    first, second = (long, ordinary) if long_first else (ordinary, long)
    index.add(first, np.array([500]))  # the failed commit's row: never covered
    index.add(second, np.array([500]), covered_rows=501)
    assert index.live_count == 501 and index.holds(500)
    every = np.vstack([x, second])
    for probe in (index, _reloaded(index, tmp_path)):
        found = probe.search(x[:50], k=5, ef=100)
        assert all(len(set(f)) == 5 for f in found)  # row 500 once at most
        truth = _top(x[:50], every, 5)
        assert np.mean([len(set(f) & set(t)) / 5 for f, t in zip(found, truth)]) >= 0.9
        probe.mark_deleted(np.array([500]))
        assert probe.live_count == 500 and not probe.holds(500)
        assert 500 not in probe.search(x[:50], k=5, ef=100)


def _reloaded(index: PrefixIndex, tmp_path) -> PrefixIndex:
    index.save(tmp_path / "p")
    return PrefixIndex.load(tmp_path / "p", 8, "ip", 8, 50)


def test_rows_kept_beside_the_graph_change_by_replacement_so_searches_see_one_whole_set():
    """A search reads the rows beside the graph without the write lock's help in numpy: an add changes them
    by replacing the dict, never in place (a search that saw it change part way raised IndexError)."""
    rng = np.random.default_rng(0)
    index = PrefixIndex(8, "ip", M=8, ef_construction=40, capacity=16)
    index.add(rng.standard_normal((2000, 8)).astype(np.float32), np.arange(2000), covered_rows=2000)
    index.add(np.full((1, 8), 1000, np.float32), np.array([2000]), covered_rows=2001)
    seen = index._lift.long
    before = dict(seen)
    index.add(np.full((1, 8), 2000, np.float32), np.array([2001]), covered_rows=2002)
    index.mark_deleted(np.array([2000]))
    assert seen.keys() == before.keys() and list(index._lift.long) == [2001]
    assert index.search(np.ones((1, 8), np.float32), k=1, ef=20)[0, 0] == 2001


def test_a_group_of_rows_far_longer_than_the_rest_is_kept_beside_the_graph_and_found():
    """Sixty rows ten times longer than the other 5,940 set the lift's radius in the graph, where searches
    seldom reached them: a shortlist of 200 held 0.68 of the 64-d top 10 (exact 8-d search: 0.97). Rows past
    three times the first rows' median are kept beside the graph."""
    from mrlstore.testing import mrl_like_split

    x, queries = mrl_like_split(6000, 60, 64, seed=3)
    rng = np.random.default_rng(0)
    x = (x * rng.uniform(0.5, 2, (len(x), 1))).astype(np.float32)
    x[rng.choice(len(x), 60, replace=False)] *= 10
    index = PrefixIndex(8, "ip", M=8, ef_construction=40, capacity=16)
    index.add(x, np.arange(len(x)), covered_rows=len(x))
    assert 50 <= len(index._lift.long) <= 60  # (a few of their 8-d prefixes are short)
    found = index.search(queries, k=200, ef=200)
    truth = _top(queries, x, 10)
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]) >= 0.95


def test_the_lift_never_shrinks_below_rows_in_the_graph(tmp_path, monkeypatch):
    """First rows mostly all-zero set no limit of 0, and a rebuild for many rows beside the graph keeps the
    radius: rebuilt smaller, rows already in the graph got a lift of 0 and were never found again."""
    from mrlstore.tiers import ip_lift

    monkeypatch.setattr(ip_lift, "LONG_MAX", 20)
    rng = np.random.default_rng(0)
    first = np.zeros((10, 8), np.float32)
    first[6:] = rng.standard_normal((4, 8))
    first[6:] *= 10 / np.linalg.norm(first[6:], axis=1, keepdims=True)
    index = PrefixIndex(8, "ip", M=8, ef_construction=50, capacity=16)
    index.add(first, np.arange(10), covered_rows=10)
    assert index._lift.limit == pytest.approx(30)  # 3 times the median of the rows that are not zeros
    second = rng.standard_normal((300, 8)).astype(np.float32)
    second /= np.linalg.norm(second, axis=1, keepdims=True)
    second[:30] *= 40  # past the limit: beside the graph, more than LONG_MAX, so the graph is rebuilt
    index.add(second, np.arange(10, 310), covered_rows=310)
    radius = index._lift.radius
    rows = [r for r in range(310) if r not in index._lift.long]
    lifted = index._index.get_items(rows)
    assert np.allclose(np.linalg.norm(lifted, axis=1), radius, rtol=1e-3)  # every row in the graph on the sphere
    for probe in (index, _reloaded(index, tmp_path)):
        assert probe._lift.limit == index._lift.limit and probe._lift.radius == radius
    # many rows beside, all shorter than the graph's radius: a rebuild takes them in at the same radius
    lift = ip_lift.Lift(8, radius=12.5, limit=3.0, long={r: np.full(8, 5 / np.sqrt(8), np.float32) for r in range(25)})
    split = lift.split(np.ones((1, 8), np.float32) / np.sqrt(8), np.array([100]))
    assert split.radius == 12.5
