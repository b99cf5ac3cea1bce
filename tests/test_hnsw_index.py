"""The HNSW cache: round trips, refuses untrustworthy files, survives concurrent searches and adds."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mrlstore.tiers.hnsw import IndexUnusable, PrefixIndex


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
