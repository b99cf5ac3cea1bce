"""store.tune: picks the cheapest shortlist reaching a recall target, persists it, and query uses it."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import mrlstore
from mrlstore.query import plan as query_plan
from mrlstore.query import tuning
from mrlstore.testing import exact_search, mrl_like, mrl_like_split, recall_at_k


@pytest.fixture(scope="module")
def tuned_store(tmp_path_factory):
    x, _ = mrl_like(4000, 256, noise=1.0, seed=5)
    path = tmp_path_factory.mktemp("tune") / "s"
    with mrlstore.open(path, dim=256, bands=(16, 64, 256), index_dims=(16,)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))])
        choice = store.tune(recall=0.95, k=10, sample=150)
    return path, x, choice


def test_tune_reaches_the_target_with_the_cheapest_setting_of_the_fastest_shape(tuned_store):
    _, _, choice = tuned_store
    assert choice["recall_low"] >= 0.95 and choice["recall"] >= choice["recall_low"]
    assert choice["dims"] in ([16, 256], [16, 64, 256], [256])
    tried = [t for t in choice["tried"] if t["prefixes"] == choice["prefixes"]]  # the kept tune's points
    assert {tuple(t["dims"]) for t in tried} - {(256,)} == {(16, 256), (16, 64, 256)}  # both shapes compared
    # among the shapes' own choices (each its smallest reaching shortlist), the fastest; a larger coarse
    # shortlist of the same shape may have timed faster by noise, but it is not that shape's setting
    chosen = [p for p in choice["shapes"].values() if p["reached"]]
    fastest = min(chosen, key=lambda p: p["ms_per_query"])
    exact = [t for t in tried if t["dims"] == [256]]
    if choice["dims"] == [256]:  # a small store: exact search, timed the same way, was faster still
        assert exact and choice["ms_per_query"] == exact[0]["ms_per_query"] < fastest["ms_per_query"]
    else:
        assert choice["ms_per_query"] == fastest["ms_per_query"]
        assert not exact or exact[0]["ms_per_query"] >= fastest["ms_per_query"]
    dims = [t["dims"] for t in tried if t["shortlist"] == fastest["shortlist"] and t["recall"] == fastest["recall"]]
    same = [t for t in tried if t["dims"] == dims[0]]
    last = [t for t in same if t["taper"] == 1][-1]  # the search ends at its choice or a fine size that missed
    assert last["shortlist"] == fastest["shortlist"] or (
        last["shortlist"] < fastest["shortlist"] and last["recall_low"] < 0.95
    )
    assert all(t["recall_low"] < 0.95 for t in same if t["shortlist"] < fastest["shortlist"])  # cheaper ones missed
    # the coarse grid up to the first size that reaches, then the fine sizes below it
    coarse = [t["shortlist"] for t in same if t["shortlist"] in tuning.GRID]
    assert coarse == sorted(coarse) and coarse[-1] >= fastest["shortlist"]
    below = [f for f in tuning.FINE_GRID if (coarse[-2] if len(coarse) > 1 else 0) < f < fastest["shortlist"]]
    assert {t["shortlist"] for t in same} >= set(below)


def test_the_target_is_reached_by_a_lower_confidence_bound_and_holds_for_new_queries(tuned_store):
    assert tuning.recall_lower_bound(np.full(50, 0.9)) == pytest.approx(0.9)
    spread = np.array([1.0, 0.8] * 50)
    assert tuning.recall_lower_bound(spread) == pytest.approx(0.9 - 1.645 * spread.std(ddof=1) / 10)
    assert all(t["reached"] == (t["recall_low"] >= 0.95) for t in tuned_store[2]["tried"])
    path, x, _ = tuned_store
    queries, _ = mrl_like(400, 256, noise=1.0, seed=5, sample=1)  # new queries from the same clusters
    with mrlstore.open(path, read_only=True) as store:
        found = [h.ids for h in store.query(queries, k=10, metadata=False)]
    truth = exact_search(x.astype(np.float16).astype(np.float32), queries, 10)
    assert recall_at_k(found, [[str(r) for r in t] for t in truth]) >= 0.95


@pytest.mark.parametrize("k", [1, 3])
def test_a_smaller_k_than_tuned_keeps_the_tuned_shortlist_and_its_recall(tuned_store, k):
    """A shortlist tuned for the top 10 holds the top 1 at least as often; cut in proportion to k (to 2 of
    25 for k=1) it lost a quarter of them."""
    path, x, _ = tuned_store
    queries, _ = mrl_like(400, 256, noise=1.0, seed=5, sample=1)
    with mrlstore.open(path, read_only=True) as store:
        found = [h.ids for h in store.query(queries, k=k, metadata=False)]
    truth = exact_search(x.astype(np.float16).astype(np.float32), queries, k)
    assert recall_at_k(found, [[str(r) for r in t] for t in truth]) >= 0.95


def test_a_tiny_store_tunes_to_exact_search_when_that_is_faster(tmp_path, monkeypatch):
    x, _ = mrl_like(60, 64, seed=3)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), index_dims=(16,)) as store:
        store.add_vectors(x)
        choice = store.tune(recall=0.95, k=5, sample=40)
        exact = [t for t in choice["tried"] if t["dims"] == [64]]
        assert exact and exact[0]["recall"] >= 0.95  # measured like every funnel, one query at a time
        funnels = [p["ms_per_query"] for p in choice["shapes"].values() if p["reached"]]
        assert choice["ms_per_query"] == min([exact[0]["ms_per_query"], *funnels])
        monkeypatch.setattr(tuning, "EXACT_CANDIDATE_FACTOR", 0.0)  # a large store: never timed
        assert all(t["dims"] != [64] for t in store.tune(recall=0.95, k=5, sample=40)["tried"])


def test_tuned_setting_is_persisted_and_used_by_default(tuned_store):
    path, x, choice = tuned_store
    queries, _ = mrl_like(40, 256, noise=1.0, seed=5, sample=1)
    with mrlstore.open(path, read_only=True) as store:
        assert store.manifest["tuned"]["shortlist"] == choice["shortlist"]
        default = store.query(queries, k=10, metadata=False)
        sizes = query_plan.tapered_sizes(choice["shortlist"], 10, len(choice["dims"]), choice["taper"])
        explicit = store.query(queries, k=10, dims=choice["dims"], shortlist=sizes, ef=choice["ef"], metadata=False)
        assert [h.ids for h in default] == [h.ids for h in explicit]
        truth = exact_search(x.astype(np.float16).astype(np.float32), queries, 10)
        assert recall_at_k([h.ids for h in default], [[str(r) for r in t] for t in truth]) >= 0.9


def test_a_tapered_setting_gives_the_last_re_rank_half_as_many(tuned_store):
    _, _, choice = tuned_store
    three = [t for t in choice["tried"] if len(t["dims"]) == 3]
    assert {t["taper"] for t in three} == {1, 2}  # the three-stage shape was measured both ways
    tuned = {"dims": [16, 64, 256, 2048], "shortlist": 200, "ef": 200, "k": 10, "taper": 2}
    plan = query_plan.make_plan(tuned, None, 10, None, None, (16,), 2048)
    assert plan.sizes == (200, 100, 25) and plan.ef == 200
    assert query_plan.make_plan(tuned, None, 5, None, None, (16,), 2048).sizes == (200, 100, 25)  # kept for less
    assert query_plan.make_plan(tuned, None, 15, None, None, (16,), 2048).sizes == (300, 150, 37)  # grown for more
    halving = query_plan.make_plan({**tuned, "taper": 1}, None, 10, None, None, (16,), 2048)
    assert halving.sizes == (200, 100, 50)
    old = {key: v for key, v in tuned.items() if key != "taper"}  # tuned before tapering existed
    assert query_plan.make_plan(old, None, 10, None, None, (16,), 2048).sizes == (200, 100, 50)


def test_tune_rejects_bad_arguments(tuned_store, tmp_path):
    path, _, _ = tuned_store
    with mrlstore.open(path, read_only=True) as store, pytest.raises(mrlstore.ReadOnlyError):
        store.tune()
    with mrlstore.open(tmp_path / "t", dim=16, bands=(8, 16), index_dims=(8,)) as store:
        with pytest.raises(mrlstore.InvalidInputError, match="recall"):
            store.tune(recall=1.5)
        with pytest.raises(mrlstore.EmptyStoreError):
            store.tune()


def test_tune_compares_every_indexed_prefix_and_query_follows_the_choice(tmp_path):
    x, _ = mrl_like(3000, 256, noise=1.0, seed=6)
    with mrlstore.open(tmp_path / "s", dim=256, bands=(16, 64, 256), index_dims=(8, 32)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))])
        choice = store.tune(recall=0.9, k=10, sample=100)
        firsts = {t["dims"][0] for t in choice["tried"]}
        assert firsts - {256} == {8, 32}  # 256: exact search, a candidate on a store this small
        assert choice["dims"][0] in firsts and choice["recall"] >= 0.9
        assert store.query(x[5], k=10).dims == tuple(choice["dims"])


def test_a_long_shortlist_gets_a_measured_longer_prefix_which_then_tunes_shorter(tmp_path):
    x, _ = mrl_like(6000, 256, noise=1.0, seed=3, n_clusters=60)
    advice = r"shortlist of (\d+) from 8 numbers.*set_index_dims\(\((\d+),\)\).*need a shortlist of (\d+)"
    # Raw prefixes only, and the funnels' own settings checked rather than tune's choice: at 6,000 rows an
    # exact scan or fitted codes may be timed faster, most of all on a busy machine.
    raw = {"dim": 256, "bands": (16, 64, 256), "index_dims": (8,), "prefixes": "raw"}
    with mrlstore.open(tmp_path / "s", **raw) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))])
        with pytest.warns(UserWarning, match=advice) as caught:
            first = store.tune(recall=0.95, k=10, sample=100)
        said = next(m for w in caught if (m := re.search(advice, str(w.message))))
        long_shortlist, wider, estimate = (int(g) for g in said.groups())
        reached = {p["shortlist"] for shape, p in first["shapes"].items() if shape.startswith("8,") and p["reached"]}
        assert long_shortlist in reached and long_shortlist >= tuning.LONG_SHORTLIST
        assert wider in (16, 32) and estimate <= min(long_shortlist // 2, tuning.LONG_SHORTLIST - 1)
        store.set_index_dims((wider,))
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            again = store.tune(recall=0.95, k=10, sample=100)
        shapes = [p for shape, p in again["shapes"].items() if shape.startswith(f"{wider},") and p["reached"]]
        assert shapes and max(p["shortlist"] for p in shapes) <= long_shortlist // 2  # as measured
        assert not [w for w in later if "longer indexed prefix" in str(w.message)]


def test_a_small_filter_on_a_tuned_store_keeps_its_recall(tmp_path):
    """A where= filter's rows are scanned exactly on the first prefix, with at least the untuned shortlist:
    the tuned one, measured on the whole store, lost a tenth of a filter's top 10."""
    x, queries = mrl_like_split(8000, 300, 128, seed=11)
    group = np.random.default_rng(1).integers(0, 100, len(x))
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 64, 128)) as store:
        store.add_vectors(x, ids=[str(i) for i in range(len(x))], metadata=[{"g": int(g)} for g in group])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shapes that miss the target
            store.tune(recall=0.95)
        stored = x.astype(np.float16).astype(np.float32)
        for limit in (5, 10, 30):
            rows = np.flatnonzero(group < limit)
            truth = rows[exact_search(stored[rows], queries, 10)]
            found = store.query(queries, k=10, where=f"g < {limit}", metadata=False)
            assert recall_at_k([h.ids for h in found], [[str(r) for r in t] for t in truth]) >= 0.97


def test_the_filter_scan_shortlist_is_the_untuned_one_at_least():
    plan = query_plan.Plan((32, 64, 128), 10, (25, 12))
    assert query_plan.for_filter_scan(plan, 5000).sizes == (200, 100)
    assert query_plan.for_filter_scan(plan, 60).sizes == (60, 60)  # no more than the filter's rows
    wide = query_plan.Plan((32, 128), 10, (400,))
    assert query_plan.for_filter_scan(wide, 5000) is wide
    assert query_plan.for_filter_scan(query_plan.Plan((128,), 10, ()), 5000).sizes == ()


def test_seeds_are_checked_by_report_and_kept_as_numbers_by_tune(tmp_path):
    x, _ = mrl_like(500, 64, seed=2)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), index_dims=(16,)) as store:
        store.add_vectors(x)
        assert store.tune(seed=np.int64(3), sample=50).seed == 3  # a numpy seed failed to persist: TypeError
        for seed in (-1, 1.5):
            with pytest.raises(mrlstore.InvalidInputError, match="seed"):
                store.report(seed=seed, sample=20)  # numpy's own ValueError and TypeError
        assert store.report(seed=np.int64(3), sample=20).num_rows


def test_a_k_past_the_largest_shortlist_tunes(tmp_path):
    x, _ = mrl_like(3300, 32, seed=1, n_clusters=10)
    with mrlstore.open(tmp_path / "s", dim=32, bands=(8, 32), index_dims=(8,), prefixes="raw") as store:
        store.add_vectors(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert store.tune(k=3200, sample=5).shortlist >= 3201  # the shortlists tried were none: IndexError


def test_an_unreachable_target_says_what_exact_search_costs_on_a_small_store(tmp_path):
    """Random rows have no Matryoshka structure: no funnel reaches 0.99. The error names the best funnel (not
    exact search, whose 1.0 it once reported as the best found) and what exact search would cost."""
    x = np.random.default_rng(0).standard_normal((2000, 128)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 32, 128), prefixes="raw") as store:
        store.add_vectors(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = store.tune(recall=0.5)
        for dims in (None, [16, 128]):
            with pytest.raises(mrlstore.TuningError, match=r"best 0\.\d+ with dims=\[(16|32)[^\]]*\].*exact search "
                               r"reaches it at [\d.]+ ms per query: query\(v, dims=\[128\]\)"):  # fmt: skip
                store.tune(recall=0.99, dims=dims)
        assert store.info()["tuned"]["target"] == first.target  # the settings stay


def test_a_failed_tune_leaves_the_fit_in_use_as_a_reopen_has_it(tmp_path, monkeypatch):
    x, _ = mrl_like(4000, 128, seed=7, n_clusters=40)
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 32, 128), metric="ip") as store:
        store.add_vectors(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert store.tune(recall=0.95).prefixes == "fitted"
        status = store.info().index_status
        fitted_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "index").glob("fitted_*")}
        monkeypatch.setattr(tuning, "EXACT_CANDIDATE_FACTOR", 0)  # exact search would reach any target
        with pytest.raises(mrlstore.TuningError):
            store.tune(dims=[16], recall=0.999)
        assert store.info().index_status == status  # the raw indexes tune loaded stayed in use
        assert fitted_files and {p: p.stat().st_mtime_ns for p in fitted_files} == fitted_files  # not saved again
    with mrlstore.open(tmp_path / "s") as store:
        assert store.info().index_status == status


def test_tuned_shortlists_grow_with_the_store_by_the_measured_exponent():
    tuned = {"dims": [16, 64, 256, 2048], "shortlist": 200, "ef": 200, "k": 10, "taper": 2, "live": 1000,
             "growth": {"16": 0.5}}  # fmt: skip
    plan = query_plan.make_plan(tuned, None, 10, None, None, (16,), 2048)
    assert plan.sizes == (200, 100, 25) and query_plan.for_rows(plan, 1000) is plan
    assert query_plan.for_rows(plan, 600).sizes == (200, 100, 25)  # fewer rows than tuned: kept
    assert query_plan.for_rows(plan, 4000).sizes == (400, 200, 50)  # 4x the rows, exponent 0.5: twice, tapered
    unmeasured = query_plan.make_plan({**tuned, "growth": None}, None, 10, None, None, (16,), 2048)
    assert query_plan.for_rows(unmeasured, 4000).sizes == (800, 400, 100)  # in proportion
    before_live = query_plan.make_plan({**tuned, "live": None}, None, 10, None, None, (16,), 2048)
    assert query_plan.for_rows(before_live, 4000).sizes == (200, 100, 25)  # tuned before the rows were kept
    given = query_plan.make_plan(tuned, None, 10, 200, None, (16,), 2048)
    assert query_plan.for_rows(given, 4000).sizes == given.sizes  # a shortlist the caller gave is used as given
    shapes = {**tuned, "shapes": {"32,2048": {"shortlist": 50, "ef": 64, "taper": 1}}, "growth": {"32": 1.0}}
    assert query_plan.for_rows(
        query_plan.make_plan(shapes, [32, 2048], 10, None, None, (16, 32), 2048), 3000
    ).sizes == (150,)  # each shape by its own first prefix's exponent
    one = query_plan.make_plan({**tuned, "dims": [16], "shortlist": 64, "ef": 64}, None, 10, None, None, (16,), 2048)
    assert query_plan.for_rows(one, 4000) == one  # one stage (exact, or HNSW alone): no shortlist grows
    raw = {**tuned, "live": 1000, "growth": {"16": 1.0}}
    fitted = {**tuned, "prefixes": "fitted", "raw_settings": raw}
    raw_plan = query_plan.make_plan(fitted, None, 10, None, None, (16,), 2048, fitted=False)
    assert query_plan.for_rows(raw_plan, 2000).sizes == (400, 200, 50)  # the raw prefixes' own settings


def test_a_store_grown_after_tune_keeps_its_recall_and_says_to_tune_again(tmp_path):
    """A shortlist tuned at 4,000 rows of data with 250 clusters found 0.58-0.76 of the top 10 at 16,000."""
    x, _ = mrl_like(16400, 128, n_clusters=250, spectrum="gentle", seed=3)
    queries, held, x = x[:200], x[200:400], x[400:]
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 64, 128)) as store:
        store.add_vectors(x[:4000], ids=[str(i) for i in range(4000)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shapes that miss the target
            choice = store.tune(recall=0.95, queries=queries)
        assert set(choice.growth) == {"16", "32"} and all(0.5 <= g <= 1 for g in choice.growth.values())
        store.add_vectors(x[4000:], ids=[str(i) for i in range(4000, len(x))])
        with pytest.warns(UserWarning, match=r"4\.0x the 4,000 tune measured.*tune\(\) again"):
            found = store.query(held, k=10, metadata=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            store.query(held[0], k=10, metadata=False)  # once per tune
            store.delete(["0"])
            store.compact()  # reads the tuned entry anew: it warned again
            store.query(held[0], k=10, metadata=False)
        truth = exact_search(x.astype(np.float16).astype(np.float32), held, 10)
        assert recall_at_k([h.ids for h in found], [[str(r) for r in t] for t in truth]) >= 0.95


def test_a_store_tuned_to_exact_search_is_told_to_tune_again_as_it_grows(tmp_path):
    """Exact search keeps its recall: the warning said queries grew a shortlist (an exact scan has none)."""
    x, _ = mrl_like(1200, 64, seed=4)
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64)) as store:
        store.add_vectors(x[:500])
        store.tune(dims=[64], sample=50)
        store.add_vectors(x[500:])
        with pytest.warns(UserWarning) as told:
            store.query(x[0], k=10)
    (message,) = [str(w.message) for w in told]
    assert "2.4x the 500 tune measured: tune() again" in message and "grow" not in message
