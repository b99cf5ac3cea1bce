"""The query path: metadata from the in-memory copy, filter results per version, tuning per funnel shape."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pyarrow as pa
import pytest

import mrlstore
from mrlstore.query import filters
from mrlstore.query import plan as query_plan
from mrlstore.testing import mrl_like
from mrlstore.tiers.rows import RowTable


def _meta_of_hits(hits):
    return {i: m for i, m in zip(hits.ids, hits.metadata)}


def test_hit_metadata_matches_the_catalog_across_commits_deletes_upserts_and_reopen(tmp_path, rng):
    x = rng.standard_normal((300, 64)).astype(np.float32)
    path = tmp_path / "s"
    with mrlstore.open(path, dim=64, bands=(16, 64), index_dims=(16,), chunk_rows=64) as store:
        store.add_vectors(x[:100], ids=[f"a{i}" for i in range(100)])  # no metadata at all
        store.add_vectors(x[100:200], ids=[f"b{i}" for i in range(100)], metadata=[{"n": i} for i in range(100)])
        # a new column, an int given as text into the BIGINT column (DuckDB casts it), and nulls
        meta = pa.table({"n": pa.array([str(i) for i in range(50)]), "tag": pa.array(["t"] * 50)})
        store.add_vectors(x[200:250], ids=[f"c{i}" for i in range(50)], metadata=meta)
        store.upsert_vectors(x[250:252], ids=["b3", "new"], metadata=[{"tag": "up"}, {"n": 7}])
        store.delete(["b4", "c5"])

        def check(s):
            expected = {
                r["id"]: {k: v for k, v in r.items() if k != "id"} for r in s.sql("SELECT * FROM items").to_pylist()
            }
            for q in list(x[:252:7]) + [x[250], x[251]]:
                hits = s.query(q, k=20, dims=[16, 64])
                assert len(hits.ids) == 20
                for i, m in _meta_of_hits(hits).items():
                    assert m == expected[i], i
                table = hits.to_arrow()
                assert table.column("id").to_pylist() == hits.ids
                assert table.column_names == ["id", "score", "n", "tag"]
            # the upsert gave "tag" only: the entry keeps its old "n" (keep_metadata defaults to True)
            assert s.query(x[250], k=1, dims=[64]).metadata == [{"n": 3, "tag": "up"}]
            assert s.query(x[251], k=1, dims=[64]).metadata == [{"n": 7, "tag": None}]  # keys of later rows kept
            assert s.query(x[201], k=1, dims=[64]).metadata == [{"n": 1, "tag": "t"}]  # "1" stored as BIGINT 1
            assert "b4" not in s.query(x[104], k=5, dims=[64]).ids

        check(store)
    with mrlstore.open(path, read_only=True) as store:
        check(store)


def test_upsert_keeps_old_values_given_in_another_type_or_as_none(small_store, rng):
    """keep_metadata fills what an upsert leaves null from the old entry, also when the given column came in
    another Arrow type (an int for a float column, a key given only as None)."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    small_store.add_vectors(
        x[:2], ids=["b", "c"], metadata=[{"price": 2.5, "label": "y"}, {"price": 1.0, "label": "z"}]
    )
    given = [{"price": None}, {"price": 9, "label": None}]  # price: an int and None; label: only None
    small_store.upsert_vectors(x[1:3], ids=["b", "c"], metadata=given)
    got = small_store.sql("SELECT id, price, label FROM items ORDER BY id").to_pylist()
    assert got == [{"id": "b", "price": 2.5, "label": "y"}, {"id": "c", "price": 9.0, "label": "z"}]


def test_upsert_keeps_old_values_beside_text_the_catalog_casts(small_store, rng):
    """Text DuckDB casts to the column's type (' 7', '2021-1-5', 'yes') but Arrow does not: the other rows'
    old values, kept where they were given as None, were lost (stored as null)."""
    import datetime

    x = rng.standard_normal((4, 64)).astype(np.float32)
    old = [{"count": i, "day": datetime.date(2020, 1, 1 + i), "ok": True} for i in range(4)]
    small_store.add_vectors(x, ids=list("abcd"), metadata=old)
    given = [{"count": " 7", "day": "2021-1-5", "ok": "yes"}, {"count": None, "day": None, "ok": None}]
    small_store.upsert_vectors(x[:2], ids=["a", "b"], metadata=given)
    got = small_store.sql("SELECT id, count, day, ok FROM items WHERE id IN ('a', 'b') ORDER BY id").to_pylist()
    assert got == [
        {"id": "a", "count": 7, "day": datetime.date(2021, 1, 5), "ok": True},
        {"id": "b", "count": 1, "day": datetime.date(2020, 1, 2), "ok": True},
    ]
    with pytest.raises(mrlstore.MetadataError, match="'tags'"):  # no one type holds both: refused, nothing changes
        small_store.add_vectors(x[2:3], ids=["e"], metadata=[{"tags": [1, 2]}])
        small_store.upsert_vectors(x[2:4], ids=["e", "f"], metadata=[{"tags": {"a": 1}}, {"tags": None}])
    assert len(small_store) == 5


@pytest.mark.parametrize(
    "stored, given",
    [({"x": 1}, {"z": "w"}), ({"x": 1}, {"x": 2, "z": "w"}), (True, 5)],
    ids=["struct of other fields", "struct of more fields", "int into a boolean"],
)
def test_upsert_keeping_old_values_refuses_what_an_add_refuses(small_store, rng, stored, given):
    """Arrow's cast matches struct fields by name and makes any nonzero int True: the given value was stored
    changed ({'z': 'w'} as {'x': None}, 5 as True) where add_vectors refuses it."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    small_store.add_vectors(x[:1], ids=["a"], metadata=[{"col": stored}])
    with pytest.raises(mrlstore.MetadataError):
        small_store.add_vectors(x[1:2], ids=["b"], metadata=[{"col": given}])
    for call in (
        lambda: small_store.upsert_vectors(x[:2], ids=["a", "c"], metadata=[{}, {"col": given}]),
        lambda: small_store.add_vectors(x[:2], ids=["a", "c"], metadata=[{}, {"col": given}], on_conflict="replace"),
    ):
        with pytest.raises(mrlstore.MetadataError):
            call()
    assert len(small_store) == 1 and small_store.get(["a"]).column("col").to_pylist() == [stored]


def test_metadata_false_and_stores_without_columns(small_store, rng):
    x = rng.standard_normal((40, 64)).astype(np.float32)
    small_store.add_vectors(x)
    assert small_store.query(x[0], k=3).metadata == [{}, {}, {}]
    assert small_store.query(x[0], k=3, metadata=False).metadata == []
    assert small_store.query(x[0], k=3).to_arrow().column_names == ["id", "score"]


def test_filters_see_every_commit_and_delete(small_store, rng):
    x = rng.standard_normal((60, 64)).astype(np.float32)
    small_store.add_vectors(x[:30], ids=[str(i) for i in range(30)], metadata=[{"g": i % 3} for i in range(30)])
    where = "g = 1"
    first = small_store.query(x[31], k=30, dims=[64], where=where).ids
    assert sorted(first, key=int) == [str(i) for i in range(1, 30, 3)]
    small_store.add_vectors(x[30:], ids=[str(i) for i in range(30, 60)], metadata=[{"g": 1}] * 30)
    assert len(small_store.query(x[31], k=100, dims=[64], where=where).ids) == 10 + 30
    small_store.delete(["31", "1"])
    after = small_store.query(x[31], k=100, dims=[64], where=where).ids
    assert len(after) == 38 and "31" not in after and "1" not in after
    small_store.upsert_vectors(x[:1], ids=["4"], metadata=[{"g": 2}])  # row 4 (g=1) replaced with g=2
    assert "4" not in small_store.query(x[0], k=100, dims=[64], where=where).ids


def test_the_filter_cache_is_bounded_in_bytes_and_keeps_the_filters_in_use(small_store, rng, monkeypatch):
    """It kept the first 256 filters whatever their size (781 MiB of matching rows on a 400k-row store) and
    never cached another."""
    x = rng.standard_normal((1000, 64)).astype(np.float32)
    small_store.add_vectors(x, ids=[str(i) for i in range(1000)], metadata=[{"n": i} for i in range(1000)])
    monkeypatch.setattr(filters, "FILTER_CACHE_BYTES", 3 * 8 * 1000)  # three filters matching every row
    cache, state = filters.FilterCache(), small_store._state
    for i in range(10):
        assert len(cache.allowed(state.catalog, f"n >= {i}", state.snap)) == 1000 - i
        cache.allowed(state.catalog, "n >= 0", state.snap)  # in use: kept
    assert list(cache._cache) == ["n >= 8", "n >= 9", "n >= 0"] and cache._bytes <= 3 * 8 * 1000
    assert small_store.query(x[7], k=1, dims=[64], where="n >= 7").ids == ["7"]


def test_queries_with_metadata_from_threads_during_writes(tmp_path, rng):
    """Every hit's metadata belongs to its id while writers add, upsert and delete concurrently."""
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    errors: list[BaseException] = []
    with mrlstore.open(tmp_path / "s", dim=64, bands=(8, 16, 64), index_dims=(8, 16), chunk_rows=64) as store:
        store.add_vectors(x[:300], ids=[str(i) for i in range(300)], metadata=[{"n": i} for i in range(300)])
        stop = threading.Event()

        def reader(seed: int) -> None:
            r = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    batch = x[r.integers(0, 300, 4)]
                    for hits in store.query(batch, k=5, dims=[16, 64], where="n % 2 = 0" if r.random() < 0.3 else None):
                        for i, m in zip(hits.ids, hits.metadata):
                            assert m["n"] in (int(i), -int(i)), (i, m)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for lo in range(300, 3000, 300):
            store.add_vectors(x[lo : lo + 300], ids=[str(i) for i in range(lo, lo + 300)],
                              metadata=[{"n": i} for i in range(lo, lo + 300)])  # fmt: skip
            store.upsert_vectors(x[lo - 5 : lo], ids=[str(i) for i in range(lo - 5, lo)],
                                 metadata=[{"n": -i} for i in range(lo - 5, lo)])  # fmt: skip
            store.delete([str(lo + 1)])
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]


@pytest.fixture(scope="module")
def mrl_store(tmp_path_factory):
    x, _ = mrl_like(4000, 256, noise=1.0, seed=7)
    path = tmp_path_factory.mktemp("shapes") / "s"
    store = mrlstore.open(path, dim=256, bands=(16, 64, 256))
    store.add_vectors(x, ids=[str(i) for i in range(len(x))])
    yield store, x
    store.close()


def test_tune_covers_every_shape_and_query_with_dims_uses_its_setting(mrl_store):
    store, x = mrl_store
    assert store.index_dims == (16, 32)  # the default
    choice = store.tune(recall=0.9, k=10, sample=100)
    assert set(choice["shapes"]) == {"16,256", "16,64,256", "32,256", "32,64,256"}
    assert store.info()["tuned"]["shapes"] == choice["shapes"]
    assert "tried" not in store.info()["tuned"]
    for key, setting in choice["shapes"].items():
        dims = [int(d) for d in key.split(",")]
        tuned, fitted = store.manifest["tuned"], choice.prefixes == "fitted"
        plan = query_plan.make_plan(tuned, dims, 10, None, None, store.index_dims, store.dim, fitted)
        assert plan.dims == tuple(dims) and plan.sizes[0] == setting["shortlist"]
        if setting["reached"]:
            assert setting["recall"] >= 0.9
        got = store.query(x[:20], k=10, dims=dims, metadata=False)
        sizes = query_plan.tapered_sizes(setting["shortlist"], 10, len(dims), setting["taper"])
        explicit = store.query(x[:20], k=10, dims=dims, shortlist=sizes, ef=setting["ef"], metadata=False)
        assert [h.ids for h in got] == [h.ids for h in explicit]
    # k=20 scales the tuned shortlist; an explicit shortlist overrides the tuning
    plan = query_plan.make_plan(tuned, [16, 256], 20, None, None, store.index_dims, store.dim, fitted)
    assert plan.sizes[0] == 2 * choice["shapes"]["16,256"]["shortlist"]
    plan = query_plan.make_plan(store.manifest["tuned"], [16, 256], 10, 77, None, store.index_dims, store.dim)
    assert plan.sizes == (77,)


def test_tune_refuses_an_unreachable_target_and_keeps_the_previous_setting(tmp_path, rng):
    x = rng.standard_normal((3000, 256)).astype(np.float32)  # no Matryoshka structure: prefixes rank poorly
    with mrlstore.open(tmp_path / "s", dim=256, bands=(16, 64, 256)) as store:
        store.add_vectors(x)
        first = store.tune(recall=0.2, k=10, sample=50)
        with pytest.raises(
            mrlstore.TuningError, match=r"no funnel reaches recall 0.95 .*best 0\.\d+.*or index a longer prefix"
        ) as refused:
            store.tune(recall=0.95, k=10, sample=50)
        assert "set_index_dims" not in str(refused.value)  # measured: no longer prefix reaches it either
        assert store.manifest["tuned"]["target"] == 0.2 and store.manifest["tuned"] == first
        assert all(t["shortlist"] <= 3000 // 4 for t in first["tried"])  # never a store-sized shortlist
    with mrlstore.open(tmp_path / "s", read_only=True) as store:
        assert store.info()["tuned"]["target"] == 0.2


def test_tune_warns_about_shapes_that_miss_the_target(tmp_path):
    x, _ = mrl_like(3000, 256, noise=1.0, seed=8)
    with mrlstore.open(tmp_path / "s", dim=256, bands=(64, 256), index_dims=(2, 128)) as store:
        store.add_vectors(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            choice = store.tune(recall=0.95, k=10, sample=60)
        # the 128-d funnel, or an exact scan where that timed faster (a small store, a busy machine)
        assert choice["dims"] in ([128, 256], [256])
        assert not choice["shapes"]["2,256"]["reached"]
        assert any("dims=[2, 256] reached only" in str(w.message) for w in caught)


def test_row_table_keeps_rows_in_order_across_base_tail_and_new_columns():
    from mrlstore.tiers.rows import RowTable

    table = RowTable(pa.table({"id": pa.array([], pa.string())}))
    for lo in range(0, 20000, 5000):  # the tail folds into the base as it grows
        table = table.appended(
            pa.table({"id": [str(i) for i in range(lo, lo + 5000)], "n": list(range(lo, lo + 5000))})
        )
    table = table.appended(pa.table({"id": ["x", "y"], "n": [None, 7], "tag": ["a", "b"]}))  # stays in the tail
    assert table.rows == 20002 and table.tail is not None and table.base.column("id").num_chunks == 1
    rows = np.array([20001, 3, 19999, 20000, 12345])
    assert table.take(rows).to_pylist() == [
        {"id": "y", "n": 7, "tag": "b"},
        {"id": "3", "n": 3, "tag": None},
        {"id": "19999", "n": 19999, "tag": None},
        {"id": "x", "n": None, "tag": "a"},
        {"id": "12345", "n": 12345, "tag": None},
    ]
    assert table.take_ids(rows) == ["y", "3", "19999", "x", "12345"]
    assert table.take_ids(np.array([20000])) == ["x"] and table.take_ids(np.array([1])) == ["1"]


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
def test_row_table_ids_match_arrow_for_slices_nulls_and_the_tail(kind):
    ids = pa.array([f"id-{i}" if i % 7 else None for i in range(300)], kind)
    base = pa.table({"id": ids, "n": pa.array(range(300))}).slice(5, 250)  # a slice: the buffers start earlier
    table = RowTable(base).appended(pa.table({"id": pa.array(["t0", "t1"], kind), "n": pa.array([1, 2])}))
    expected = ids.slice(5, 250).to_pylist() + ["t0", "t1"]
    for rows in ([0, 1, 3, 249], [2, 9, 16], [251, 10, 250], list(range(252))):  # 2, 9, 16: null (i % 7 == 0)
        rows = np.asarray(rows, dtype=np.int64)
        assert table.take_ids(rows) == [expected[r] for r in rows]
        assert table.take_metadata(rows).column("n").to_pylist() == [(list(range(5, 255)) + [1, 2])[r] for r in rows]
    assert RowTable(pa.table({"id": ids})).take_metadata(np.arange(3)) is None  # no metadata columns


def test_tune_on_held_out_queries_measures_them_and_bad_ones_change_nothing(tmp_path):
    x, _ = mrl_like(3000, 256, noise=1.0, seed=3)
    held_out, _ = mrl_like(60, 256, noise=1.0, seed=4, sample=1)
    with mrlstore.open(tmp_path / "s", dim=256, bands=(16, 64, 256)) as store:
        store.add_vectors(x)
        choice = store.tune(recall=0.9, k=10, queries=held_out)
        assert choice["sample"] == 60 and choice["recall"] >= 0.9
        exact = [store.query(q, k=10, dims=[256]).ids for q in held_out]
        got = [store.query(q, k=10).ids for q in held_out]  # the tuned default, measured on these queries
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)]) >= choice["recall"] - 1e-9
        with pytest.raises(mrlstore.ShapeError, match="length between"):
            store.tune(recall=0.9, queries=held_out[:, :64])  # tuning needs full-dim queries
        assert store.manifest["tuned"] == choice


def test_row_records_equal_arrows_dicts_for_every_column_kind():
    """RowTable.records gathers strings, numbers and booleans without nulls itself, and anything else (nulls,
    float16, timestamps, lists, rows in the tail) through Arrow: the dicts are the same either way."""
    import datetime as dt

    n = 40
    fast = pa.table({
        "id": pa.array([f"r{i}" for i in range(n)]), "s": pa.array([f"é{i}" for i in range(n)]),
        "i32": pa.array(range(n), pa.int32()), "f32": pa.array(np.linspace(0, 1, n, dtype=np.float32)),
        "b": pa.array([i % 3 == 0 for i in range(n)]),
    })  # fmt: skip
    slow = fast.append_column("ts", pa.array([dt.datetime(2026, 1, 1 + i % 28) for i in range(n)]))
    slow = slow.append_column("null_s", pa.array([None if i % 4 else "x" for i in range(n)]))
    slow = slow.append_column("half", pa.array(np.arange(n, dtype=np.float16)))
    rows = np.array([39, 0, 7, 7, 21])
    for base in (fast, slow):
        table = RowTable(base)
        assert table.records(rows) == base.drop_columns(["id"]).take(rows).to_pylist()
        grown = table.appended(base.slice(0, 3).set_column(0, "id", pa.array(["t0", "t1", "t2"])))
        both = np.array([41, 2, 40, 39])  # rows in the tail too
        assert grown.records(both) == grown.take_metadata(both).to_pylist()


@pytest.mark.parametrize("deleted", [(), (2,)])
def test_live_sorted_keeps_the_committed_live_rows_in_order(deleted):
    from mrlstore.tiers.snapshot import Snapshot

    live = np.zeros(1024, dtype=bool)
    live[:8] = True
    live[list(deleted)] = False
    snap = Snapshot(1, 8, live, int(live.sum()), None)  # rows 0-7 committed; no table needed here
    kept = [r for r in (0, 2, 5, 7) if r not in deleted]
    labels = np.array([5, 2, 7, 0], dtype=np.int64)
    assert snap.live_sorted(labels).tolist() == kept
    assert labels.tolist() == [5, 2, 7, 0]  # the caller's labels are left as they were
    # padding (-1) and rows past the watermark (added, not committed yet) are never returned
    assert snap.live_sorted(np.array([9, 5, -1, 2, 7, 0, 8], dtype=np.int64)).tolist() == kept
    assert snap.live_sorted(np.empty(0, dtype=np.int64)).tolist() == []


def test_similar_queries_an_entrys_stored_vector_and_leaves_it_out(tmp_path):
    """More like this by id: the user had to get() the vector, query with k + 1 and drop the entry."""
    x = mrl_like(1500, 64)[0]
    ids = [f"r{i}" for i in range(1500)]
    with mrlstore.open(tmp_path / "s", dim=64, bands=(16, 64), index_dims=(16,)) as store:
        store.add_vectors(x, ids=ids, metadata=[{"g": i % 3} for i in range(1500)])
        stored = np.stack(store.get(["r5", "r9"]).column("vector").to_numpy(zero_copy_only=False))
        one = store.similar("r5", k=5, dims=[16, 64])
        expected = store.query(stored[0], k=6, dims=[16, 64])
        assert isinstance(one, mrlstore.Hits) and "r5" not in one.ids and len(one) == 5
        assert one.ids == [i for i in expected.ids if i != "r5"][:5]
        np.testing.assert_allclose(one.scores, expected.scores[1:6], rtol=1e-6)
        assert one.metadata == [{"g": int(i[1:]) % 3} for i in one.ids]
        assert one.to_arrow().column("g").to_pylist() == [m["g"] for m in one.metadata]
        both = store.similar(["r5", "r9"], k=3, where="g = 1")
        assert isinstance(both, mrlstore.HitsBatch) and [len(h) for h in both] == [3, 3]
        assert all(m == {"g": 1} for h in both for m in h.metadata) and "r5" not in both[0].ids
        assert store.similar("r5", k=5, metadata=False).metadata == []
        with pytest.raises(mrlstore.UnknownIdError):
            store.similar(["r5", "gone"])
        with pytest.raises(mrlstore.InvalidKError):
            store.similar("r5", k=0)
        assert len(store.similar("r5", k=10, dims=[16, 64], shortlist=10)) == 10  # as query() takes it
        with pytest.raises(mrlstore.InvalidIdError):
            store.similar(5)  # type: ignore[call-overload]
        store.delete(["r5"])
        with pytest.raises(mrlstore.UnknownIdError):
            store.similar("r5")
