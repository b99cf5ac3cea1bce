"""Scoring and the query kernels: the native kernels and their numpy twins return the same results, and both
agree with the float64 reference of ``mrlstore.scoring``."""

from __future__ import annotations

import numpy as np
import pytest

import mrlstore
from mrlstore import kernels, scoring
from mrlstore.query import plan as query_plan
from mrlstore.scoring import METRICS

needs_native = pytest.mark.skipif(not kernels.NATIVE, reason="built without a C compiler: numpy twins only")


def test_top_orders_best_first_with_stable_ties():
    s = np.array([0.1, 0.9, 0.5, 0.9, -1.0])
    assert scoring.top(s, 3, "cosine").tolist() == [1, 3, 2]
    assert scoring.top(s, 2, "l2").tolist() == [4, 0]
    assert scoring.top(s, 10, "ip").tolist() == [1, 3, 2, 0, 4]
    assert scoring.top(s, 0, "ip").tolist() == []
    assert scoring.top(np.array([0.5, 0.9, 0.9, 0.9]), 2, "ip").tolist() == [1, 2]  # ties at the cut: by position


def test_default_shortlists_follow_the_paper():
    assert query_plan.default_shortlists(10, 2) == [200]
    assert query_plan.default_shortlists(10, 4) == [200, 100, 50]
    assert query_plan.default_shortlists(50, 3) == [1000, 500]
    assert query_plan.shortlist_sizes([30, 20], 5, 3) == [30, 20]
    with pytest.raises(ValueError):
        query_plan.shortlist_sizes([30], 5, 3)


def test_zero_prefixes_score_zero_under_cosine():
    x = np.array([[0, 0], [1, 1]], np.float32)
    assert scoring.prefix_scores(x, np.ones(2), 2, "cosine")[:, 0].tolist() == [0.0, 1.0]
    assert (scoring.prefix_scores(x, np.zeros(2), 2, "cosine") == 0).all()


@pytest.fixture(scope="module", params=["float16", "float32"])
def loaded(request, tmp_path_factory):
    """A store whose small chunks and bands make every read cross chunk and band edges; rows 5-9 deleted."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((700, 64)).astype(np.float32)
    path = tmp_path_factory.mktemp("k") / "s"
    store = mrlstore.open(path, dim=64, bands=(8, 24, 64), index_dims=(8,), chunk_rows=64, dtype=request.param)
    store.add_vectors(x, ids=[str(i) for i in range(len(x))])
    store.delete([str(i) for i in range(5, 10)])
    stored = x.astype(request.param).astype(np.float32)
    yield store, stored
    store.close()


def _flat(per_query):
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in per_query])]).astype(np.int64)
    return np.concatenate(per_query).astype(np.int64), offsets


@needs_native
@pytest.mark.parametrize("metric", METRICS)
def test_refine_kernel_matches_the_numpy_twin_and_the_reference(loaded, metric):
    store, x = loaded
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((4, 64)).astype(np.float32)
    per_query = [np.sort(rng.choice(700, size=n, replace=False)) for n in (90, 1, 300, 0)]
    rows, offsets = _flat(per_query)
    got = {n: kernels.refine(store._state.vectors, rows, offsets, queries, (20, 50), (30, 7), metric, native=n)
           for n in (True, False)}  # fmt: skip
    (rows_n, off_n, s_n), (rows_p, off_p, s_p) = got[True], got[False]
    assert off_n.tolist() == off_p.tolist() == [0, 7, 8, 15, 15]
    assert rows_n.tolist() == rows_p.tolist()
    np.testing.assert_allclose(s_n, s_p, rtol=1e-5, atol=1e-6)
    for i, cand in enumerate(per_query[:3]):  # the reference: the 30 best on 20 dims, then 7 on 50
        first = np.sort(cand[scoring.top(scoring.prefix_scores(x[cand], queries[i], 20, metric)[:, 0], 30, metric)])
        ref = scoring.prefix_scores(x[first], queries[i], 50, metric)[:, 0]
        assert rows_n[off_n[i] : off_n[i + 1]].tolist() == first[scoring.top(ref, 7, metric)].tolist()
        np.testing.assert_allclose(s_n[off_n[i] : off_n[i + 1]], np.sort(ref)[::-1][:7] if metric != "l2"
                                   else np.sort(ref)[:7], rtol=1e-4, atol=1e-5)  # fmt: skip


@needs_native
def test_refine_kernel_uses_threads_on_large_batches_with_the_same_result(loaded):
    store, _ = loaded
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((64, 64)).astype(np.float32)
    rows, offsets = _flat([np.sort(rng.choice(690, 600, replace=False)) + 10 for _ in range(64)])
    with_threads = kernels.refine(store._state.vectors, rows, offsets, queries, (8, 24, 64), (200, 50, 10), "cosine")
    spans = list(zip(offsets[:-1], offsets[1:]))
    vectors = store._state.vectors
    one_by_one = [
        kernels.refine(vectors, rows[a:b], np.array([0, b - a]), queries[i : i + 1], (8, 24, 64), (200, 50, 10),
                       "cosine") for i, (a, b) in enumerate(spans)
    ]  # fmt: skip
    assert with_threads[0].tolist() == np.concatenate([r[0] for r in one_by_one]).tolist()


@needs_native
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_queries", [1, 4])
def test_scan_kernel_matches_the_numpy_twin_and_the_reference(loaded, metric, n_queries):
    store, x = loaded
    snap = store._state.snap
    queries = np.random.default_rng(3).standard_normal((n_queries, 64)).astype(np.float32)
    allowed = np.flatnonzero(snap.live[: snap.watermark])[::3]
    for kw, candidates in (
        ({"stop": snap.watermark, "live": snap.live}, np.flatnonzero(snap.live[: snap.watermark])),
        ({"rows": allowed}, allowed),
    ):
        got = {n: kernels.scan(store._state.vectors, queries, 40, 12, metric, native=n, **kw) for n in (True, False)}
        assert got[True][0].tolist() == got[False][0].tolist()
        assert got[True][2].tolist() == got[False][2].tolist() == list(range(0, 12 * n_queries + 1, 12))
        np.testing.assert_allclose(got[True][1], got[False][1], rtol=1e-5, atol=1e-6)
        ref = scoring.prefix_scores(x[candidates], queries, 40, metric)
        for i in range(n_queries):
            assert (
                got[True][0][12 * i : 12 * (i + 1)].tolist() == candidates[scoring.top(ref[:, i], 12, metric)].tolist()
            )


@needs_native
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("d", "n"), [(8, 12), (8, 300), (24, 250), (64, 5)])
def test_one_query_block_scans_match_the_numpy_twin(loaded, metric, d, n):
    """The one-query scan in blocks of eight rows (d=8: the first band, squared norms read from row_norms;
    n=300 and 250: the cheap top-n cuts its buffer several times) over chunks of 64 rows with deleted rows."""
    store, x = loaded
    snap = store._state.snap
    rng = np.random.default_rng(11)
    for q in (x[[200]] + 0.1 * rng.standard_normal((1, 64)), rng.standard_normal((1, 64))):
        q = q.astype(np.float32)
        got = {m: kernels.scan(store._state.vectors, q, d, n, metric, stop=snap.watermark, live=snap.live, native=m)
               for m in (True, False)}  # fmt: skip
        assert got[True][0].tolist() == got[False][0].tolist()
        # l2 near a stored row: sqrt(sq - 2 dot + qq) cancels, float32 sums differ by ~1e-5 there
        np.testing.assert_allclose(got[True][1], got[False][1], rtol=1e-5, atol=1e-4 if metric == "l2" else 1e-6)
        live = np.flatnonzero(snap.live[: snap.watermark])
        ref = scoring.prefix_scores(x[live], q, d, metric)[:, 0]
        assert got[True][0].tolist() == live[scoring.top(ref, n, metric)].tolist()


@needs_native
def test_scan_kernel_uses_threads_on_large_scans_with_the_same_result(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20000, 128)).astype(np.float32)
    with mrlstore.open(tmp_path / "s", dim=128, bands=(16, 128), index_dims=(16,), chunk_rows=3000) as store:
        store.add_vectors(x)
        snap = store._state.snap
        q = rng.standard_normal((1, 128)).astype(np.float32)
        got = [kernels.scan(store._state.vectors, q, 128, 50, "cosine", stop=snap.watermark, live=snap.live, native=n)
               for n in (True, False)]  # fmt: skip
        assert got[0][0].tolist() == got[1][0].tolist()


@needs_native
def test_portable_scoring_loops_agree_with_simd(loaded):
    store, _ = loaded
    native = pytest.importorskip("mrlstore._kernels")
    rows = np.arange(0, 600, 7, dtype=np.int64)
    offsets = np.array([0, len(rows)], dtype=np.int64)
    q = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)
    out = []
    for simd in (True, False):
        native.set_simd(simd)
        out.append(kernels.refine(store._state.vectors, rows, offsets, q, (8, 64), (50, 20), "l2"))
    native.set_simd(True)
    assert out[0][0].tolist() == out[1][0].tolist()
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-4, atol=1e-4)


def test_store_queries_agree_between_native_and_numpy(loaded, monkeypatch):
    store, _ = loaded
    queries = np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32)
    calls = [
        dict(dims=[8, 64], shortlist=50),
        dict(dims=[8, 24, 64], shortlist=[60, 30]),
        dict(dims=[64]),
        dict(dims=[24, 64], shortlist=40),
        dict(dims=[8, 64], shortlist=50, where="id < '300'"),
    ]
    native = [[h.ids for h in store.query(queries, k=10, metadata=False, **kw)] for kw in calls]
    monkeypatch.setattr(kernels, "_native", None)
    numpy_only = [[h.ids for h in store.query(queries, k=10, metadata=False, **kw)] for kw in calls]
    assert native == numpy_only
    assert all(str(r) not in ids for per_call in native for ids in per_call for r in range(5, 10))  # deleted


def test_kernels_refuse_rows_past_the_mapped_chunks(loaded):
    store, _ = loaded
    if not kernels.NATIVE:
        pytest.skip("native kernels not built")
    bands = [(np.zeros(1, np.uint64), 64, 0, 8, 1)]  # chunk 0 unmapped (address 0)
    native = pytest.importorskip("mrlstore._kernels")
    rows = np.array([3], np.int64)

    def call(offsets):
        out = (np.zeros(1, np.int64), np.zeros(1), np.zeros(1, np.int64))
        stage = (np.array([8], np.int32), np.array([1], np.int32), 0)
        native.refine(
            bands, rows, offsets, np.ones((1, 8), np.float32), 8, *stage, *out, 1, None, np.array([0, 8], np.int32)
        )

    with pytest.raises(IndexError):
        call(np.array([0, 1], np.int64))
    with pytest.raises(ValueError, match="offsets"):
        call(np.array([1, 0], np.int64))


@needs_native
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("stages", [((64,), (10,)), ((8, 64), (120, 10)), ((8, 24, 64), (300, 40, 7))])
def test_bounded_last_stage_returns_what_reading_every_row_returns(loaded, metric, stages, monkeypatch):
    """The last stage skips rows whose stored band norms rule them out: the hits are those of reading every
    row (native without norms, and the numpy twin), on rows spread over chunks with deleted rows among them."""
    store, stored = loaded
    rng = np.random.default_rng(7)
    queries = np.vstack([stored[[3, 400]] + 0.3 * rng.standard_normal((2, 64)), rng.standard_normal((2, 64))])
    queries = queries.astype(np.float32)
    live = np.setdiff1d(np.arange(len(stored)), np.arange(5, 10))
    rows, offsets = _flat([live, live[::3], live[100:400], live])
    dims, keeps = stages
    assert store._state.vectors.kernel_norms(len(stored)) is not None
    bounded = kernels.refine(store._state.vectors, rows, offsets, queries, dims, keeps, metric)
    twin = kernels.refine(store._state.vectors, rows, offsets, queries, dims, keeps, metric, native=False)
    monkeypatch.setattr(store._state.vectors, "kernel_norms", lambda rows_needed: None)
    unbounded = kernels.refine(store._state.vectors, rows, offsets, queries, dims, keeps, metric)
    for other in (twin, unbounded):
        assert bounded[0].tolist() == other[0].tolist()
        assert bounded[1].tolist() == other[1].tolist()
        np.testing.assert_allclose(bounded[2], other[2], rtol=1e-5, atol=1e-6)
    if len(dims) == 1:  # the first query's candidates are every live row: its hits are the exact top k
        reference = scoring.prefix_scores(stored[live], queries[:1], 64, metric)[:, 0]
        assert bounded[0][: keeps[-1]].tolist() == live[scoring.top(reference, keeps[-1], metric)].tolist()


def test_row_norms_hold_each_bands_squared_norm_as_stored(loaded):
    store, stored = loaded
    norms = store._state.vectors.norms
    got = np.vstack([norms.mapped(c) for c in range(-(-len(stored) // norms.chunk_rows))])[: len(stored)]
    want = np.stack([(stored[:, a:b].astype(np.float64) ** 2).sum(1) for a, b in ((0, 8), (8, 24), (24, 64))], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "values",
    [[1.0, -2.0, 3.0], [0.0, 0.0], [np.inf, 1.0], [1.0, np.nan], [-np.inf], [1e-45, 0.0], [3e38] * 9, [], [0.5] * 4099],
)
def test_sum_squares_is_finite_and_positive_exactly_as_the_values_are(values, monkeypatch):
    """float64 sums of float32 squares: neither the huge values' overflow nor the subnormals' underflow
    (which a float32 sum would suffer) changes the answer; native and numpy agree."""
    x = np.asarray(values, dtype=np.float32)
    exact = float(np.sum(x.astype(np.float64) ** 2))
    got = [kernels.sum_squares(x), kernels.sum_squares(x[::-1].copy()[::-1])]  # contiguous, then a strided view
    monkeypatch.setattr(kernels, "_native", None)
    got.append(kernels.sum_squares(x))
    for value in got:
        assert np.isfinite(value) == np.isfinite(x).all()
        if np.isfinite(exact):
            assert (value > 0) == bool(np.any(x != 0))
            assert value == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("k", [0, 1, 4, 7, 32])
@pytest.mark.parametrize("magnitude", [1.0, 1e-40, 1e30])
def test_project_matches_the_numpy_twin_with_and_without_simd(k, magnitude, monkeypatch):
    """Codes of a query scaled to unit length first (as a cosine query's are), whatever its magnitude: a
    subnormal query's scale is past float32's range, a huge one's squares are."""
    rng = np.random.default_rng(k)
    unit = rng.standard_normal(301)  # not a multiple of any vector width
    unit /= np.linalg.norm(unit)
    x = (unit * magnitude).astype(np.float32)
    scale = 1 / np.sqrt(np.sum(x.astype(np.float64) ** 2))
    rows = rng.standard_normal((k, 301)).astype(np.float32)
    shift = rng.standard_normal(k).astype(np.float32)
    want = (rows.astype(np.float64) @ unit - shift).astype(np.float32)
    got = [kernels.project(x, rows, shift, scale)]
    if kernels.NATIVE:
        native = pytest.importorskip("mrlstore._kernels")
        native.set_simd(False)
        try:
            got.append(kernels.project(x, rows, shift, scale))
        finally:
            native.set_simd(True)
        for bad_rows, bad_out in [(rows[:, :300].copy(), k), (rows, k + 1)][0 if k else 1 :]:  # short rows, long out
            with pytest.raises(ValueError, match="project"):
                native.project(x, bad_rows, shift, 1.0, np.empty(bad_out, np.float32))
    monkeypatch.setattr(kernels, "_native", None)
    got.append(kernels.project(x, rows, shift, scale))
    for codes in got:
        assert codes.dtype == np.float32 and codes.shape == (k,)
        tolerance = 1e-5 if magnitude != 1e-40 else 1e-3  # subnormal values keep fewer digits
        np.testing.assert_allclose(codes, want, rtol=tolerance, atol=tolerance)
