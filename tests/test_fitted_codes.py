"""Fitted codes: ``tune`` fits short codes to the store's own rows (mrlstore.tiers.projection) where they
measure faster, the coarse indexes search them, and nothing the user stored or reads back changes."""

from __future__ import annotations

import textwrap
import time
from collections import Counter

import numpy as np
import pytest
from cli_support import run_cli
from killing import killed_part_way

import mrlstore
from mrlstore.testing import exact_funnel, exact_search, mrl_like, recall_at_k
from mrlstore.tiers import projection
from mrlstore.tiers.projection import Projection

# the fits as users get them: their quality is what most of these tests measure
pytestmark = pytest.mark.full_fit

DIM = 128
N = 3000


def _rotation(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q.astype(np.float32)


def rotated(n: int, sample: int = 0) -> np.ndarray:
    """MRL-like vectors under a random rotation: the same neighbours, no prefix structure."""
    x, _ = mrl_like(n, DIM, noise=1.0, seed=11, sample=sample)
    return np.ascontiguousarray(x @ _rotation(DIM, 3))


def _open(path, **kw) -> mrlstore.Store:
    return mrlstore.open(path, dim=DIM, bands=(16, 64, DIM), index_dims=(16,), **kw)


def _filled(path, n: int = N, **kw) -> mrlstore.Store:
    store = _open(path, **kw)
    store.add_vectors(rotated(n), ids=[str(i) for i in range(n)])
    return store


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit") / "s"
    with _filled(path) as store:
        before = store.query(rotated(20, sample=1), k=10, dims=[16, DIM], shortlist=40)
        choice = store.tune(recall=0.9, k=10, sample=100)
    return path, choice, before


def _ids(hits) -> list[list[str]]:
    return [list(h.ids) for h in hits]


def test_tune_fits_codes_where_raw_prefixes_rank_badly(fitted_store):
    path, choice, _ = fitted_store
    assert choice.prefixes == "fitted" and choice["prefixes"] == "fitted"
    assert choice.recall_low >= 0.9
    modes = {t["fitted"] for t in choice.tried}
    assert modes == {True, False}, "both the raw prefixes and the fitted codes were measured"
    with mrlstore.open(path) as store:
        info = store.info()
        assert info.prefixes == "fitted" and info.tuned["prefixes"] == "fitted"
        assert (path / "index" / "fitted_00016.hnsw").exists(), "the fitted index is saved beside the raw one"
        assert (path / "index" / "prefix_00016.hnsw").exists(), "kept on disk for the next tune"


def test_fitted_codes_find_held_out_neighbours_the_raw_prefix_misses(fitted_store):
    path, _, _ = fitted_store
    base, queries = rotated(N), rotated(50, sample=1)
    truth = exact_search(base, queries, 10)
    with mrlstore.open(path) as store:
        fitted = store.query(queries, k=10, dims=[16, DIM], shortlist=40)
        raw = store.query(queries, k=10, dims=[16, DIM], shortlist=40, prefixes="raw")
        default = store.query(queries, k=10)
    as_rows = lambda hits: [[int(i) for i in ids] for ids in _ids(hits)]  # noqa: E731
    r_fit, r_raw = recall_at_k(as_rows(fitted), truth), recall_at_k(as_rows(raw), truth)
    assert r_fit >= 0.75 and r_fit > r_raw + 0.2, (r_fit, r_raw)  # measured: 0.81 against 0.49
    assert recall_at_k(as_rows(default), truth) >= 0.85


def test_raw_prefixes_when_asked_scan_the_prefix_the_fit_took_out_of_memory(fitted_store):
    path, _, before = fitted_store
    queries = rotated(20, sample=1)
    with mrlstore.open(path) as store:
        assert 16 not in store._state.indexes.by_dim, "the raw 16-d index left memory"
        again = store.query(queries, k=10, dims=[16, DIM], shortlist=40, prefixes="raw")
    stored = rotated(N).astype(np.float16).astype(np.float32)
    reference = exact_funnel(stored, queries, [16, DIM], [40], 10)  # an exact scan of the raw 16-prefix
    assert [[int(i) for i in ids] for ids in _ids(again)] == [r.tolist() for r in reference]
    # before the fit, HNSW over the raw prefix found nearly the same rows
    assert recall_at_k(_ids(before), _ids(again)) >= 0.8


def test_full_dimension_scores_and_stored_vectors_do_not_change(fitted_store):
    path, _, _ = fitted_store
    base, queries = rotated(N), rotated(5, sample=1)
    with mrlstore.open(path) as store:
        fitted = store.query(queries, k=10, dims=[16, DIM], shortlist=200)
        raw = store.query(queries, k=10, dims=[16, DIM], shortlist=200, prefixes="raw")
        exact = store.query(queries, k=10, dims=[DIM])
        got = np.stack(store.get(["0", "7", "2999"])["vector"].to_numpy(zero_copy_only=False))
    stored = base[[0, 7, 2999]].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, stored)  # bit-exact: what the user stored
    for f, r, e in zip(fitted, raw, exact):
        by_id = dict(zip(e.ids, e.scores))
        for i, s in [*zip(f.ids, f.scores), *zip(r.ids, r.scores)]:  # the full dimension scores rows one way
            assert i not in by_id or s == pytest.approx(by_id[i], abs=1e-6)
        assert list(f.ids) == list(e.ids)


def test_a_one_stage_query_on_fitted_codes_ranks_by_the_codes(fitted_store):
    path, _, _ = fitted_store
    queries = rotated(3, sample=1)
    with mrlstore.open(path) as store:
        fit = store._state.indexes.projection
        hits = store.query(queries, k=5, dims=[16])
        raw = store.query(queries, k=5, dims=[16], prefixes="raw")
        table = store.get([i for h in hits for i in h.ids])
        vectors = np.stack(table["vector"].to_numpy(zero_copy_only=False))
    assert fit is not None
    codes = fit.codes(vectors, 16).reshape(3, 5, 16)
    q = fit.query_codes(queries, 16)
    for i, h in enumerate(hits):
        cos = codes[i] @ q[i] / np.linalg.norm(codes[i], axis=1) / np.linalg.norm(q[i])
        np.testing.assert_allclose(h.scores, cos, atol=1e-5)
        assert np.all(np.diff(h.scores) <= 1e-9)
    assert _ids(hits) != _ids(raw)


def test_the_fit_survives_reopen_with_the_same_results(fitted_store):
    path, _, _ = fitted_store
    queries = rotated(10, sample=1)
    with mrlstore.open(path) as store:
        first = store.query(queries, k=10)
        fit_id = store._state.indexes.projection.fit_id
    with mrlstore.open(path) as store:
        assert store.info().index_status == {16: "fitted code"}
        assert store._state.indexes.projection.fit_id == fit_id
        assert _ids(store.query(queries, k=10)) == _ids(first)
    with mrlstore.open(path, read_only=True) as reader:
        assert reader.info().prefixes == "fitted"
        assert _ids(reader.query(queries, k=10)) == _ids(first)


def test_adds_after_a_fit_are_projected_on_the_way_in(tmp_path):
    with _filled(tmp_path / "s") as store:
        store.tune(recall=0.9, k=10, sample=100)
        assert store.info().prefixes == "fitted"
        new = rotated(30, sample=2)
        store.add_vectors(new, ids=[f"new{i}" for i in range(30)])
        hits = store.query(new, k=1, dims=[16, DIM], shortlist=20)
        assert [h.ids[0] for h in hits] == [f"new{i}" for i in range(30)]
        index = store._state.indexes.fitted.by_dim[16]
        assert index.live_count == N + 30


def test_compaction_keeps_the_fit_and_renumbers_its_index(tmp_path):
    with _filled(tmp_path / "s") as store:
        store.tune(recall=0.9, k=10, sample=100)
        fit_id = store._state.indexes.projection.fit_id
        store.delete([str(i) for i in range(0, N, 3)])
        store.compact()
        assert store.info().prefixes == "fitted" and store._state.indexes.projection.fit_id == fit_id
        assert store._state.indexes.fitted.by_dim[16].live_count == N - len(range(0, N, 3))
        queries = rotated(30, sample=1)
        hits = store.query(queries, k=10)
    with mrlstore.open(tmp_path / "s") as store:
        assert store.info().prefixes == "fitted"
        assert _ids(store.query(queries, k=10)) == _ids(hits)
    live = [i for i in range(N) if i % 3]
    truth = exact_search(rotated(N)[live], queries, 10)
    found = [[live.index(int(i)) for i in ids] for ids in _ids(hits)]
    assert recall_at_k(found, truth) >= 0.85
    assert all(int(i) % 3 for ids in _ids(hits) for i in ids), "deleted rows never come back"


def test_a_reader_moves_to_a_version_with_a_new_fit(tmp_path):
    path = tmp_path / "s"
    _filled(path).close()
    with mrlstore.open(path, read_only=True) as reader:
        assert reader.info().prefixes == "raw"
        with mrlstore.open(path) as writer:
            writer.tune(recall=0.9, k=10, sample=100)
        deadline = time.monotonic() + 30
        while reader.info().prefixes != "fitted" and time.monotonic() < deadline:
            reader.refresh()
            time.sleep(0.2)
        assert reader.info().prefixes == "fitted"
        hits = reader.query(rotated(5, sample=1), k=10, dims=[16, DIM], shortlist=40)
        assert all(len(h) == 10 for h in hits)


def test_tiny_stores_and_raw_stores_keep_their_prefixes(tmp_path):
    with _filled(tmp_path / "tiny", n=60) as store:
        assert store.tune(recall=0.9, k=5, sample=50).prefixes == "raw"
        assert store.info().prefixes == "raw"
    with _filled(tmp_path / "raw", prefixes="raw") as store:
        assert store.config.prefixes == "raw"
        choice = None
        try:
            choice = store.tune(recall=0.9, k=10, sample=100)
        except mrlstore.TuningError as e:  # rotated vectors: raw prefixes may not reach it at all
            assert "Matryoshka" in str(e)
        assert choice is None or choice.prefixes == "raw"
        assert store.info().prefixes == "raw" and not (tmp_path / "raw" / "index" / "fitted_00016.hnsw").exists()
    with pytest.raises(mrlstore.ConfigMismatchError, match="prefixes"):
        _open(tmp_path / "raw", prefixes="auto")


def test_bad_prefixes_are_refused_clearly(tmp_path):
    with pytest.raises(mrlstore.InvalidInputError, match="prefixes must be one of"):
        _open(tmp_path / "bad", prefixes="pca")
    assert not (tmp_path / "bad").exists()
    with _filled(tmp_path / "s", n=200) as store:
        with pytest.raises(mrlstore.InvalidInputError, match="prefixes must be 'raw', 'fitted'"):
            store.query(rotated(1)[0], prefixes="svd")
        with pytest.raises(mrlstore.InvalidInputError, match="no fitted codes"):
            store.query(rotated(1)[0], prefixes="fitted")


def test_a_query_shorter_than_the_vectors_uses_raw_prefixes(fitted_store):
    path, _, _ = fitted_store
    q = rotated(1, sample=1)[0]
    with mrlstore.open(path) as store:
        short = store.query(q[:64], k=5, dims=[16, 64], shortlist=40)
        raw = store.query(q, k=5, dims=[16, 64], shortlist=40, prefixes="raw")
        assert list(short.ids) == list(raw.ids)
        with pytest.raises(mrlstore.ShapeError):
            store.query(q[:64], k=5, dims=[16, 64], prefixes="fitted")


def test_a_projection_round_trips_and_refuses_damage():
    x = rotated(500)
    fit = Projection.fit(x, 16, "cosine")
    if not fit.trained:  # training moves directions off orthogonality
        np.testing.assert_allclose(fit.basis.T @ fit.basis, np.eye(16), atol=1e-5)
    again = Projection.from_manifest(fit.to_manifest(), DIM)
    assert again.fit_id == fit.fit_id
    np.testing.assert_array_equal(again.codes(x[:5], 8), fit.codes(x[:5], 8))
    damaged = {**fit.to_manifest(), "mean": fit.to_manifest()["basis"][:100]}
    with pytest.raises(mrlstore.CorruptStoreError):
        Projection.from_manifest(damaged, DIM)
    for metric in ("ip", "l2"):  # full-width codes keep every ranking of the metric
        full = Projection.fit(x, DIM, metric)
        q = x[:3] + 0.1
        codes, qc = full.codes(x), full.query_codes(q, DIM)
        if metric == "ip":
            ref, got = q @ x.T, qc @ codes.T
            assert np.array_equal(np.argsort(-ref, 1)[:, :10], np.argsort(-got, 1)[:, :10])
        else:
            ref = ((q[:, None] - x[None]) ** 2).sum(-1)
            got = ((qc[:, None] - codes[None]) ** 2).sum(-1)
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_codes_no_better_than_the_prefixes_get_no_indexes(tmp_path):
    x, _ = mrl_like(N, DIM, n_clusters=10, seed=11)  # prefix-structured: the raw prefixes keep as much
    with _open(tmp_path / "s") as store:
        store.add_vectors(x, ids=[str(i) for i in range(N)])
        choice = store.tune(recall=0.9, k=10, sample=100)
        assert choice.prefixes == "raw" and choice.fit_s is not None, "a fit was tried"
        assert not any(t["fitted"] for t in choice.tried), "and judged on a sample before any index was built"
    assert not list((tmp_path / "s" / "index").glob("fitted_*"))


def _groups_apart_from_order(n: int, seed: int) -> np.ndarray:
    """Rows whose widest spread (4 dims of group centres) says nothing about which rows of a group are
    nearest: that lives in the other dims, whose spread decays."""
    centres = 5 * np.random.default_rng(1).standard_normal((20, 4))
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 32), np.float32)
    x[:, :4] = centres[rng.integers(0, 20, n)]
    x[:, 4:] = rng.standard_normal((n, 28)) * np.arange(1, 29) ** -0.5
    return x


@pytest.mark.parametrize(("metric", "margin"), [("cosine", 0.05), ("l2", 0.0)])
def test_a_fit_keeps_the_directions_that_order_near_neighbours(metric, margin):
    x, queries = _groups_apart_from_order(3000, 2), _groups_apart_from_order(300, 3)
    fit = Projection.fit(x, 4, metric)
    prepared = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    mean = prepared.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(prepared.T))
    principal = Projection(metric, mean.astype(np.float32), np.ascontiguousarray(vectors[:, ::-1][:, :4], np.float32))

    def held(projection: Projection) -> float:
        codes, q = projection.codes(x), projection.query_codes(queries, 4)
        if metric == "cosine":
            codes = codes / np.linalg.norm(codes, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            near = np.argsort(-(q @ codes.T), axis=1)[:, :50]
        else:
            near = np.argsort(((q[:, None] - codes[None]) ** 2).sum(-1), axis=1)[:, :50]
        truth = exact_search(x, queries, 10) if metric == "cosine" else _l2_top(x, queries, 10)
        return float(np.mean([np.isin(t, f).mean() for t, f in zip(truth, near, strict=True)]))

    assert fit.blend < 1.0, "neighbour differences weigh in where the widest spread orders nothing"
    assert held(fit) > held(principal) + margin
    assert Projection.from_manifest(fit.to_manifest(), 32).blend == fit.blend


def test_the_training_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    codes, anchors = rng.standard_normal((40, 8)), np.array([3, 7, 11])
    target = projection._softmax(rng.standard_normal((3, 40)))
    target[np.arange(3), anchors] = 0.0  # an anchor is never its own neighbour
    target /= target.sum(axis=1, keepdims=True)

    def loss(c: np.ndarray) -> float:
        total = 0.0
        for k in (4, 8):
            unit = c[:, :k] / np.linalg.norm(c[:, :k], axis=1, keepdims=True)
            logits = unit[anchors] @ unit.T / projection.TRAIN_CODE_TEMP
            logits[np.arange(3), anchors] = -np.inf
            log_q = np.log(projection._softmax(logits) + 1e-300)
            total -= float((target * np.where(target > 0, log_q, 0.0)).sum(axis=1).mean())
        return total / 2

    got = projection._code_gradient(codes, anchors, target, (4, 8))
    step, numeric = 1e-6, np.zeros_like(codes)
    for i, j in np.ndindex(*codes.shape):
        up, down = codes.copy(), codes.copy()
        up[i, j] += step
        down[i, j] -= step
        numeric[i, j] = (loss(up) - loss(down)) / (2 * step)
    np.testing.assert_allclose(got, numeric, atol=1e-6)


def test_training_keeps_more_held_out_neighbours_than_the_directions_it_starts_from():
    x, _ = mrl_like(4000, 256, n_clusters=300, noise=1.0, seed=3)  # many small clusters: principal axes blur them
    x = x @ np.linalg.qr(np.random.default_rng(1).standard_normal((256, 256)))[0].astype(np.float32)
    prepared, rng = projection._prepared(x, "cosine"), np.random.default_rng(0)
    probes, _ = projection._split(len(x), rng)
    mean = prepared.mean(axis=0)
    spread = projection._second_moment(prepared - mean)
    start = Projection("cosine", mean, projection._directions(spread, None, 1.0, 32, rng))
    span = projection._span(start.basis, spread, rng)
    trained = projection._trained(start, span, prepared, np.setdiff1d(np.arange(len(x)), probes), (16, 32), rng)
    judge = projection._Judge(prepared, probes, "cosine", len(x), (16, 32))
    assert trained.trained == projection.TRAIN_STEPS
    assert judge.held(trained) > judge.held(start) + 0.05  # measured: 0.768 -> 0.858
    again = Projection.from_manifest(trained.to_manifest(), 256)
    assert again.trained == trained.trained
    np.testing.assert_array_equal(again.codes(x[:5], 16), trained.codes(x[:5], 16))
    fit = Projection.fit(x, 32, "cosine", judge_at=(16, 32))  # the projection a fit returns is the one it judged
    assert fit.trained and fit.judged is not None
    assert judge.held(fit) == fit.judged[0], "the trained origin is kept with the trained directions"


def _l2_top(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(((queries[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :k]


SIGKILL_TUNER = textwrap.dedent(
    """
    import sys, mrlstore
    store = mrlstore.open(sys.argv[1])
    print("READY", flush=True)
    store.tune(recall=0.9, k=10, sample=100)
    print("DONE", flush=True)
    """
)


@pytest.mark.slow  # real processes, many times: CI runs it with -m slow
def test_sigkill_during_tune_leaves_the_previous_codes_or_the_new(tmp_path):
    path = tmp_path / "s"
    with _filled(path) as store:
        store.tune(recall=0.9, k=10, sample=100)
        queries = rotated(10, sample=1)
    script = tmp_path / "tuner.py"
    script.write_text(SIGKILL_TUNER)
    outcomes = set()
    for _ in killed_part_way(script, [str(path)], (0.05, 0.3, 0.8, 1.5, 3.0)):
        with mrlstore.open(path) as store:
            assert store.verify() == []
            info = store.info()
            assert info.prefixes == "fitted" and info.tuned["prefixes"] == "fitted"
            outcomes.add(store._state.indexes.projection.fit_id)
            base, found = rotated(N), store.query(queries, k=10)
            truth = exact_search(base, queries, 10)
            assert recall_at_k([[int(i) for i in h.ids] for h in found], truth) >= 0.85
    assert outcomes, "every reopen found a fit"


def test_the_command_line_creates_raw_stores_and_queries_either_codes(fitted_store, tmp_path):
    run = lambda *args: run_cli(*map(str, args))  # noqa: E731  (the commands' code path, in this process)
    out = run("create", tmp_path / "r", "--dim", DIM, "--prefixes", "raw")
    assert out.returncode == 0, out.stderr
    with mrlstore.open(tmp_path / "r") as store:
        assert store.config.prefixes == "raw"
    path, _, _ = fitted_store
    np.save(tmp_path / "q.npy", rotated(1, sample=1)[0])
    for prefixes in ("raw", "fitted"):
        out = run("query", path, tmp_path / "q.npy", "--dims", f"16,{DIM}", "--prefixes", prefixes, "--json")
        assert out.returncode == 0 and '"rank": 1' in out.stdout, out.stderr


def test_filtered_queries_on_a_fitted_store_keep_their_recall(tmp_path):
    """A where= filter matching few rows is scanned exactly on the raw prefix: with the raw settings, not the
    fitted codes' smaller shortlist."""
    base = rotated(N)
    with _open(tmp_path / "s") as store:
        store.add_vectors(base, ids=[str(i) for i in range(N)], metadata=[{"tag": i % 4} for i in range(N)])
        store.tune(recall=0.9, k=10, sample=100)
        assert store.info().prefixes == "fitted"
        queries = rotated(40, sample=1)
        hits = store.query(queries, k=10, where="tag = 0")
        one_stage = store.query(queries, k=10, dims=[16], where="tag = 0")
    allowed = np.arange(0, N, 4)
    truth = [allowed[t] for t in exact_search(base[allowed], queries, 10)]
    assert all(int(i) % 4 == 0 for h in [*hits, *one_stage] for i in h.ids)
    assert recall_at_k(_ids(hits), truth) >= 0.9


def test_a_tune_whose_funnels_cannot_use_codes_keeps_none(tmp_path):
    with _filled(tmp_path / "s") as store:
        choice = store.tune(recall=0.9, k=10, sample=100, dims=[64, DIM])
        assert choice.prefixes == "raw" and choice.fit_s is None
        assert store.info().prefixes == "raw" and not list((tmp_path / "s" / "index").glob("fitted_*"))


def test_lost_fitted_index_files_are_rebuilt_from_the_bands(tmp_path):
    with _filled(tmp_path / "s") as store:
        store.tune(recall=0.9, k=10, sample=100)
        assert store.info().prefixes == "fitted"
        store.delete([str(i) for i in range(0, 300, 3)])
    for lost in (tmp_path / "s" / "index").glob("fitted_*"):
        lost.unlink()
    with mrlstore.open(tmp_path / "s") as store:
        fitted = store._state.indexes.fitted
        assert {d: index.live_count for d, index in fitted.by_dim.items()} == {16: N - 100}
        queries = rotated(30, sample=1)
        hits = store.query(queries, k=10)
    assert (tmp_path / "s" / "index" / "fitted_00016.hnsw").exists(), "saved again after the rebuild"
    live = [i for i in range(N) if i >= 300 or i % 3]
    truth = [np.asarray(live)[t] for t in exact_search(rotated(N)[live], queries, 10)]
    assert recall_at_k(_ids(hits), truth) >= 0.85
    assert all(int(i) >= 300 or int(i) % 3 for ids in _ids(hits) for i in ids)


def _weak_first(n: int, sample: int = 0) -> np.ndarray:
    """MRL-like vectors whose first 16 numbers are weak ones from further in: a 16-number code fitted to the
    rows keeps far more neighbours than that prefix, while a 64-number code keeps about what the prefix does."""
    x, _ = mrl_like(n, DIM, noise=1.0, seed=11, sample=sample)
    return np.ascontiguousarray(np.concatenate([x[:, 64:80], x[:, :64], x[:, 80:]], axis=1))


def test_a_fit_codes_only_the_lengths_where_codes_beat_the_raw_prefix():
    fit = Projection.fit(_weak_first(N), 64, "cosine", judge_at=(16, 64))
    assert fit.coded == (16,) and fit.beats_raw
    assert fit.codes_at((16, 64)) == (16,)
    assert Projection.from_manifest(fit.to_manifest(), DIM).coded == (16,)
    old = {key: value for key, value in fit.to_manifest().items() if key != "coded"}  # a fit saved before
    assert Projection.from_manifest(old, DIM).codes_at((16, 64)) == (16, 64)


def test_lengths_without_a_gain_keep_their_raw_prefix_index(tmp_path):
    path = tmp_path / "s"
    with mrlstore.open(path, dim=DIM, bands=(16, 64, DIM), index_dims=(16, 64)) as store:
        store.add_vectors(_weak_first(N), ids=[str(i) for i in range(N)])
        choice = store.tune(recall=0.9, k=10, sample=100, dims=[16, DIM])
        assert choice.prefixes == "fitted"
        queries = _weak_first(20, sample=1)
        before = _ids(store.query(queries, k=10, dims=[64, DIM], shortlist=30))
    names = sorted(p.name for p in (path / "index").glob("*.hnsw"))
    assert names == ["fitted_00016.hnsw", "prefix_00016.hnsw", "prefix_00064.hnsw"]
    with mrlstore.open(path) as store:
        indexes = store._state.indexes
        assert set(indexes.fitted.by_dim) == {16} and set(indexes.by_dim) == {64}
        assert indexes.status == {16: "fitted code", 64: "loaded"}
        assert _ids(store.query(queries, k=10, dims=[64, DIM], shortlist=30)) == before
        rows = store.report(sample=50).to_pylist()
    # funnels from 64 run on raw prefixes whatever they ask: listed once, as raw (they were listed twice)
    keys = Counter((tuple(r["dims"]), r["kind"], r["codes"], r["shortlist"], r["taper"]) for r in rows)
    assert [key for key, n in keys.items() if n > 1] == []
    assert {r["dims"][0] for r in rows if r["codes"] == "fitted"} == {16}


def test_a_fit_learns_from_rows_other_than_tunes_probes_where_the_store_has_enough():
    from mrlstore.query.searcher import fit_sample

    probes = np.arange(0, 30_000, 150)
    big = fit_sample(np.arange(30_000), probes)
    assert len(big) == projection.FIT_SAMPLE_ROWS and not np.isin(big, probes).any()
    assert np.all(np.diff(big) > 0)
    small = fit_sample(np.arange(5_000), probes[probes < 5_000])  # a small store's fit takes every row
    np.testing.assert_array_equal(small, np.arange(5_000))


def test_codes_serve_their_lengths_when_the_default_funnel_starts_at_an_uncoded_prefix(tmp_path):
    with mrlstore.open(tmp_path / "s", dim=DIM, bands=(16, 64, DIM), index_dims=(16, 64)) as store:
        store.add_vectors(_weak_first(N), ids=[str(i) for i in range(N)])
        choice = store.tune(recall=0.9, k=10, sample=100)
        # the 64-number prefix is as good as its codes, so the fastest funnel usually starts there, on the raw
        # index (measured: [64, 128]; the codes' [16, 128] or an exact scan where those time faster); either way
        # the 16-number codes are kept for the funnels that start at 16 numbers
        assert choice.prefixes == "fitted" and choice.dims[0] in (16, 64, DIM)
        assert store._state.indexes.status == {16: "fitted code", 64: "rebuilt"}
        queries = _weak_first(50, sample=1)
        truth = exact_search(_weak_first(N), queries, 10)
        codes, raw = (store.query(queries, k=10, dims=[16, DIM], shortlist=30, prefixes=p) for p in (None, "raw"))
        assert recall_at_k(_ids(codes), truth) > recall_at_k(_ids(raw), truth) + 0.3  # measured: 0.83 against 0.30
        assert recall_at_k(_ids(store.query(queries, k=10)), truth) >= 0.85  # the default: measured 0.94


def test_a_raw_default_at_an_uncoded_length_keeps_the_codes_for_theirs():
    from types import SimpleNamespace

    from mrlstore.query import tuning

    def choice(dims: list[int], fitted: bool) -> dict:
        point = {"shortlist": 20, "ef": 40, "recall": 0.96, "recall_low": 0.95, "ms_per_query": 0.1, "taper": 1}
        shapes = {
            "16,128": {**point, "reached": True, "fitted": fitted},
            "64,128": {**point, "reached": True, "fitted": False},
        }
        return {**point, "dims": dims, "exact_ms_per_query": 1.0, "shapes": shapes, "tried": []}

    funnel = SimpleNamespace(fitted=SimpleNamespace(by_dim={16: None}))  # the fit codes 16 numbers only
    raw, fit = choice([64, 128], False), choice([16, 128], True)
    kept = tuning._raw_default_with_codes(raw, fit, funnel)
    assert kept is not None and kept["dims"] == [64, 128] and kept["shapes"]["16,128"]["fitted"]
    assert tuning._raw_default_with_codes(choice([16, 128], False), fit, funnel) is None  # its raw index goes
    assert tuning._raw_default_with_codes(raw, choice([16, 128], False), funnel) is None  # no funnel on codes


@pytest.mark.parametrize("magnitude", [1e-40, 1e30])
def test_tiny_and_huge_queries_find_what_unit_ones_find_alone_or_in_a_batch(fitted_store, magnitude):
    """Cosine ignores a query's length: one query (contiguous or a strided view) and a batch take the same
    codes whatever the magnitude (a float32 norm would overflow or underflow)."""
    path, _, _ = fitted_store
    q = rotated(2, sample=1)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    with mrlstore.open(path) as store:
        assert store.info().prefixes == "fitted"
        want = _ids(store.query(q, k=10, dims=[16]))
        scaled = (q * magnitude).astype(np.float32)
        strided = np.stack([scaled[0], scaled[0]], axis=1)[:, 0]
        assert _ids(store.query(scaled, k=10, dims=[16])) == want
        assert [list(store.query(scaled[i], k=10, dims=[16]).ids) for i in range(2)] == want
        assert list(store.query(strided, k=10, dims=[16]).ids) == want[0]
