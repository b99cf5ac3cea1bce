"""The dims report (Store.report, mrlstore report): prefixes alone and funnels, measured on the store's rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cli_support import run_cli

import mrlstore
from mrlstore.query import report as report_module
from mrlstore.testing import mrl_like


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    x, _ = mrl_like(3000, 128, noise=1.0, seed=2)
    path = tmp_path_factory.mktemp("report") / "s"
    with mrlstore.open(path, dim=128, bands=(16, 64, 128), index_dims=(16,)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))])
    return path


def test_a_report_has_every_prefix_alone_and_every_funnel_shape(store_path):
    with mrlstore.open(store_path, read_only=True) as store:  # readers can ask too: nothing is saved
        table = store.report(k=10, sample=60)
    rows = table.to_pylist()
    prefixes = [r for r in rows if r["kind"] == "prefix alone"]
    assert [r["dims"] for r in prefixes] == [[8], [16], [32], [64], [128]]
    assert prefixes[-1]["recall"] == 1.0 and prefixes[-1]["bytes_per_query"] == 3000 * 128 * 2
    assert prefixes[0]["recall"] < prefixes[2]["recall"] < 1.0  # more dims, better neighbours
    funnels = [r for r in rows if r["kind"] == "funnel"]
    assert {tuple(r["dims"]) for r in funnels} == {(16, 128), (16, 64, 128)}
    assert not any(r["tuned"] for r in rows)  # an untuned store has no default setting yet
    for r in funnels:
        assert 0 <= r["recall_low"] <= r["recall"] <= 1 and r["p50_ms"] > 0
    wide = [r for r in funnels if r["dims"] == [16, 128]]
    assert wide[-1]["recall"] > wide[0]["recall"]  # a longer shortlist finds more
    # bytes: the 16-d HNSW stage reads no band and keeps no sums: the re-rank reads all 128 numbers of each
    assert wide[0]["bytes_per_query"] == wide[0]["shortlist"] * 128 * 2


def test_bytes_of_a_funnel():
    assert report_module.funnel_bytes([16, 64, 2048], [200, 100], (16,), 10**6, 2) == (200 * 64 + 100 * 1984) * 2
    assert report_module.funnel_bytes([24, 2048], [100], (16,), 1000, 4) == (1000 * 24 + 100 * 2024) * 4  # exact


def test_a_fresh_tune_is_reused_and_its_setting_marked(store_path):
    with mrlstore.open(store_path) as store:
        tuned = store.tune(recall=0.9, k=10, sample=60)
        table = store.report(k=10, sample=60)
        funnels = [r for r in table.to_pylist() if r["kind"] == "funnel"]
        kept = (False, True) if tuned.prefixes == "fitted" else (False,)  # a fit tune dropped is not reported
        measured = {
            (tuple(t["dims"]), t["shortlist"], t["taper"], t["fitted"]): t["recall"]
            for t in tuned.tried
            if t["fitted"] in kept
        }
        reported = {
            (tuple(r["dims"]), r["shortlist"], r["taper"], r["codes"] == "fitted"): r["recall"] for r in funnels
        }
        assert all(reported[key] == value for key, value in measured.items() if key[0] != (128,))  # reused
        assert {11, 20, 30, 50, 75, 100} <= {r["shortlist"] for r in funnels if r["dims"] == [16, 128]}  # and the rest
        marked = [r for r in funnels if r["tuned"]]
        if tuned.dims != [128]:
            assert [(r["dims"], r["shortlist"], r["codes"]) for r in marked] == [
                (tuned.dims, tuned.shortlist, tuned.prefixes)
            ]
        store.add_vectors(np.asarray(mrl_like(10, 128, seed=9)[0]), ids=[f"new{i}" for i in range(10)])
        again = store.report(k=10, sample=60).to_pylist()  # the store changed: measured anew, over the grid
        sizes = {r["shortlist"] for r in again if r["dims"] == [16, 128]}
        assert {11, 20, 30, 50, 75, 100} <= sizes


def test_the_command_prints_and_plots(store_path, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "dims.png"
    out = run_cli("report", str(store_path), "--sample", "40", "--plot", str(png))  # the command, in this process
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[:3] == ["dims", "kind", "codes"] and "prefix alone" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_store_indexed_at_full_dim_reports_its_index_and_numpy_targets_persist(tmp_path):
    x, _ = mrl_like(1500, 64, noise=1.0, seed=3)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), index_dims=(64,)) as store:
        store.add_vectors(x)
        assert store.tune(recall=np.float64(0.9), sample=50).target == 0.9  # a numpy target is stored as JSON
        rows = store.report(sample=40).to_pylist()
    assert not [r for r in rows if r["kind"] == "funnel"]  # dims=[dim] is exact search, indexed or not
    assert [r["dims"] for r in rows if r["tuned"]] == [[64]]  # the default setting is marked


def _what_query_runs(store: mrlstore.Store, k: int) -> tuple[list[int], int | None, str]:
    plan = store._search.plan(None, k, None, None)
    if not plan.sizes:  # exact search (a small store): the prefix row
        return list(plan.dims), None, "raw"
    return list(plan.dims), plan.sizes[0], "fitted" if store._search.funnel.uses_fit(plan) else "raw"


@pytest.mark.parametrize("case", ["k past tune's", "a fit's choice starting at a raw prefix"])
def test_the_row_marked_tuned_is_what_query_runs(tmp_path, case):
    """report(k=20) on a store tuned at k=10 marked the k=10 shortlist (query runs one grown for k); a fit's
    choice whose first prefix has no codes marked no row at all (its point was measured on raw prefixes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "k past tune's":
            x, _ = mrl_like(4000, 128, seed=7, n_clusters=40)
            store = mrlstore.open(tmp_path / "s", dim=128, bands=(16, 32, 128), metric="l2", prefixes="raw")
            store.add_vectors(x)
            store.tune(recall=0.95, k=10)
            k, seed = 20, 0
        else:
            x, _ = mrl_like(2000, 100, seed=5, n_clusters=30)
            store = mrlstore.open(tmp_path / "s", dim=100, bands=(10, 100), metric="cosine", dtype="float32",
                                  index_dims=(16, 32))  # fmt: skip
            store.add_vectors(x)
            store.tune(recall=0.9, seed=1)
            k, seed = 10, 1
        rows = store.report(k=k, seed=seed).to_pylist()
    marked = [(r["dims"], r["shortlist"], r["codes"]) for r in rows if r["tuned"]]
    assert marked == [_what_query_runs(store, k)]
    store.close()


def test_a_full_dimension_index_is_reported_as_the_exact_search_it_runs(tmp_path):
    """dims=[dim] is an exact scan, indexed or not: report listed it as HNSW funnels reading 0 bytes."""
    x, _ = mrl_like(2000, 100, seed=5, n_clusters=30)
    with mrlstore.open(tmp_path / "s", dim=100, bands=(10, 100), index_dims=(100,)) as store:
        store.add_vectors(x)
        rows = store.report(sample=50).to_pylist()
    full = [r for r in rows if r["dims"] == [100]]
    assert [r["kind"] for r in full] == ["prefix alone"] and full[0]["bytes_per_query"] == 2000 * 100 * 2


def test_the_tuned_mark_follows_the_codes_and_the_k_a_query_runs_with():
    from mrlstore.query.funnel import Funnel

    def funnel(coded: set[int]) -> Funnel:  # of 100-d rows indexing 16 and 32, a fit replacing the ``coded`` ones
        return Funnel(None, {d: None for d in (16, 32) if d not in coded}, "l2", 10, None, 100)  # type: ignore[arg-type]

    tuned = {"dims": [32, 100], "shortlist": 15, "prefixes": "fitted", "k": 10, "taper": 1}
    raw, codes = {"dims": [32, 100], "shortlist": 15}, {"dims": [32, 100], "shortlist": 15, "fitted": True}

    def marked(point: dict, k: int, coded: set[int], live: int = 1000) -> bool:
        return report_module._key(point) == report_module._tuned_key(funnel(coded), tuned, k, coded, live)

    assert marked(raw, 10, coded={16})  # 32 has no codes: the raw prefix runs
    assert not marked(codes, 10, coded={16})
    assert marked(codes, 10, coded={16, 32})
    assert not marked(raw, 20, coded={16})  # k=20 runs a shortlist of 30
    assert marked({**raw, "shortlist": 30}, 20, coded={16})
    tuned |= {"live": 1000, "growth": {"32": 0.5}}
    assert marked({**raw, "shortlist": 30}, 10, coded={16}, live=4000)  # the store grew 4x since: twice
    single = {"dims": [16], "shortlist": 11, "prefixes": "raw", "k": 10, "taper": 1}  # HNSW on 16 alone
    assert report_module._tuned_key(funnel(set()), single, 10, set(), 1000) == ((16,), 11, 1, False)
    assert report_module._tuned_key(funnel(set()), {**single, "dims": [100]}, 10, set(), 1000) is None  # exact
    assert report_module._tuned_key(funnel({16}), single, 10, {16}, 1000) is None  # raw 16 unindexed: a scan


def test_a_single_indexed_prefix_tuned_is_marked(tmp_path, monkeypatch):
    """tune(dims=[16]) runs HNSW on 16 alone: its row is the tuned one (no row was marked)."""
    from mrlstore.query import tuning

    monkeypatch.setattr(tuning, "EXACT_CANDIDATE_FACTOR", 0)  # on a busy machine exact search was timed faster
    x, _ = mrl_like(3000, 128, seed=3, n_clusters=30)
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 32, 128), index_dims=(16, 32)) as store:
        store.add_vectors(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.tune(recall=0.3, dims=[16], sample=50)
            rows = store.report(sample=50).to_pylist()
    assert [(r["dims"], r["kind"]) for r in rows if r["tuned"]] == [([16], "funnel")]


def test_a_single_prefix_without_an_index_tuned_is_its_exact_scan_row(tmp_path, monkeypatch):
    """tune(dims=[48]) where no index holds 48: query() scans that prefix exactly, and its row was neither
    listed (48 is no band edge nor power of two) nor marked."""
    from mrlstore.query import tuning

    monkeypatch.setattr(tuning, "EXACT_CANDIDATE_FACTOR", 0)  # the shape asked for, not a full exact search
    x, _ = mrl_like(4000, 128, seed=7, n_clusters=40)
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 32, 128), index_dims=(16, 32), prefixes="raw") as store:
        store.add_vectors(x)
        assert store.tune(recall=0.5, sample=50, dims=[48]).dims == [48]
        rows = store.report(sample=50).to_pylist()
    assert [(r["dims"], r["kind"]) for r in rows if r["tuned"]] == [([48], "prefix alone")]
