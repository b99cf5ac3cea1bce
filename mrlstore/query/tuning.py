"""Tuning: the cheapest shortlist (and HNSW beam) per funnel shape that reaches a recall target, measured
on the store's own rows, and the query plans that use it.

The manifest's ``tuned`` entry holds the fastest shape's setting at its top level (``dims``, ``shortlist``,
``ef``, ``recall``, ``ms_per_query``, ``k``, ``target``, ``sample``, ``taper``) and every measured shape under
``shapes`` (key ``"16,2048"``), so ``query(dims=[16, 2048])`` without ``shortlist`` uses the setting tuned
for exactly that funnel. Stores tuned before shapes existed have only the top level; it still applies.

Survivors halve from stage to stage, except that a funnel of three or more stages may ``taper``: its last
re-rank before the full dimension then gets half as many (the 256-d prefix ranks well: at 1M rows,
``[230, 115, 28]`` instead of ``[230, 115, 57]`` cost 6% less for recall 0.969 instead of 0.971). Tuning
measures both and keeps the faster one that reaches the target.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrlstore.errors import TuningError
from mrlstore.query.funnel import Funnel
from mrlstore.query.plan import Plan, shape_key, tapered_sizes
from mrlstore.tiers.snapshot import Snapshot

# Shortlists tried, smallest first; a funnel that needs more than the budget is not worth having. Between
# the last coarse size that missed and the first that reached, the fine sizes are tried too: a coarse
# step alone picks up to a third more candidates (and time per query) than the target needs.
GRID = (10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1200, 1600, 2400, 3200)
FINE_GRID = (15, 25, 40, 60, 90, 115, 130, 175, 230, 260, 350, 450, 500, 700, 1000, 1400, 2000, 2800)
MAX_SHORTLIST = 3200
TAPER = 2
RETIME_CANDIDATES, RETIME_ROUNDS = 3, 2  # the leading shapes, timed this many more times each
RECALL_BOUND_Z = 1.645  # one-sided 95%: a tuned setting reaches the target on new queries, not just the sample


# A fit is kept when its fastest funnel takes at most this many times the raw prefixes' fastest: its codes
# rank better at equal cost, and on a small store the two are timed within noise of each other.
FIT_KEEP_MARGIN = 1.05
FIT_NOISE_MARGIN = 1.25
FIT_NOISE_MS = 0.05  # on a small store every query takes tens of microseconds: the better codes win there
RACE_ROUNDS = 3
# A chosen shortlist this long: tune measures what longer prefixes (these times the first stage's, not
# indexed yet) would need, with an exact first stage on its sample, and names the shortest that needs at most
# half as many and less than this.
LONG_SHORTLIST, WIDER_FACTORS = 300, (2, 4)

# Growth: a part of 1/GROWTH_PART of the rows is measured against them all, on stores of GROWTH_MIN_ROWS;
# ranks are read up to GROWTH_RANK_CAP times the chosen shortlist.
# The rank needed grows faster on larger stores than the part shows (benchmarks/tune_growth.py's first
# generator measures under 0.3 at 20k rows, where its shortlists need about 0.5 up to 8x the rows): a floor.
GROWTH_PART, GROWTH_MIN_ROWS, GROWTH_RANK_CAP, GROWTH_FLOOR = 4, 4000, 4, 0.5

# Exact search is timed one query at a time as a candidate when the batched exact pass (which tune runs
# anyway) took at most this many times the best funnel's time per query: on a large store it is far slower.
EXACT_CANDIDATE_FACTOR = 4.0


@dataclass(frozen=True)
class Task:
    """What a tuning measures: funnel ``shapes`` over ``snap``, against a ``recall``@``k`` target on
    ``probe``'s queries, exact search at the full ``dim`` the reference; ``index_dims``, the store's indexed
    prefixes (its advice on a longer one replaces the first stage's)."""

    snap: Snapshot
    shapes: list[tuple[int, ...]]
    recall: float
    k: int
    probe: Probe
    dim: int
    index_dims: tuple[int, ...] = ()
    advice: dict[tuple[int, ...], str] = field(default_factory=dict, compare=False)  # measured once per tune


def tune(funnel: Funnel, task: Task, fitted: bool = False) -> dict[str, Any]:
    """Measure every shape's cheapest shortlist reaching the target (recall@k against exact full-dimension
    search, each sampled row's own entry excluded); returns the choice to persist. ``fitted``: the shapes'
    first stages search the funnel's fitted codes. Raises TuningError, persisting nothing, when no shape
    reaches the target."""
    snap, shapes, recall, k, probe, dim = task.snap, task.shapes, task.recall, task.k, task.probe, task.dim
    exact_ms = probe.exact_ms
    budget, grid = shortlist_grid(k, snap.n_live)
    tried: list[dict[str, Any]] = []
    best_per_shape: dict[str, dict[str, Any]] = {}  # each shape's cheapest reaching point, or its last try
    fine = sorted({max(k + 1, s) for s in FINE_GRID} - set(grid))
    for dims_t in shapes:
        point, points = _cheapest(
            lambda s, d=dims_t: measure(funnel, snap, probe, d, s, k, recall, fitted=fitted), grid, fine
        )
        if point["reached"] and len(dims_t) >= 3:  # the tapered schedule at the same first stage
            tapered = measure(funnel, snap, probe, dims_t, point["shortlist"], k, recall, TAPER, fitted)
            points.append(tapered)
            if tapered["reached"] and tapered["ms_per_query"] < point["ms_per_query"]:
                point = tapered
        tried += points
        best_per_shape[shape_key(dims_t)] = point
    reached = [p for p in best_per_shape.values() if p["reached"]]
    _retime(reached, funnel, snap, probe, k, fitted)
    exact = None
    if exact_ms < EXACT_CANDIDATE_FACTOR * min((p["ms_per_query"] for p in reached or tried), default=math.inf):
        # a small store: exact search may be faster than any funnel (or, where none reaches the target, the way)
        exact = measure(funnel, snap, probe, (dim,), k + 1, k, recall)
    hint = ""
    if exact is not None and exact["reached"] and not reached:
        hint = f"; exact search reaches it at {exact['ms_per_query']:.3f} ms per query: query(v, dims=[{dim}])"
    best = _choose(best_per_shape, tried, recall, budget, lambda d, s: _wider_advice(funnel, task, d, s), hint)
    if exact is not None:
        tried.append(exact)
        if exact["reached"] and exact["ms_per_query"] < best["ms_per_query"]:
            best = exact
    for point in tried:  # which tune measured it (an exact scan in the fitted one reads raw prefixes)
        point["prefixes"] = "fitted" if fitted else "raw"
    kept = ("shortlist", "ef", "recall", "recall_low", "ms_per_query", "reached", "taper", "fitted")
    shapes_out = {key: {f: p[f] for f in kept} for key, p in best_per_shape.items()}
    return {
        **{f: best[f] for f in ("dims", "shortlist", "ef", "recall", "recall_low", "ms_per_query", "taper")},
        "k": k,
        "target": recall,
        "sample": len(probe.rows),
        "rows": snap.watermark,
        "live": snap.n_live,
        "exact_ms_per_query": exact_ms,
        "shapes": shapes_out,
        "tried": tried,
    }


def shortlist_grid(k: int, live: int) -> tuple[int, list[int]]:
    """The largest first-stage shortlist tune tries for ``k`` on ``live`` rows, and the sizes it tries (k+1 at
    least, also for a k past MAX_SHORTLIST)."""
    budget = max(k + 1, min(MAX_SHORTLIST, max(20 * k, live // 4)))
    return budget, [s for s in sorted({max(k + 1, s) for s in GRID}) if s <= budget]


def tune_prefixes(funnel: Funnel, fitted_funnel: Funnel | None, task: Task) -> dict[str, Any]:
    """``tune`` with raw prefixes and, given ``fitted_funnel``, with its fitted codes; the choice says which
    it keeps (``prefixes``: "raw" or "fitted"). A fit is kept when its fastest funnel reaching the target is
    at least as fast as the raw prefixes' (within FIT_KEEP_MARGIN: ties go to the codes that rank better),
    and also when the raw prefixes' fastest starts at a length the fit does not code: that one is then the
    default and the codes serve the funnels that start at their lengths.
    Warnings are those of the kept choice; TuningError when neither reaches the target."""
    raw, raw_warnings = _attempt(lambda: tune(funnel, task))
    fit: dict[str, Any] | Exception | None = None
    fit_warnings: list[str] = []
    if fitted_funnel is not None:
        fit, fit_warnings = _attempt(lambda: tune(fitted_funnel, task, fitted=True))
    kept = None
    if isinstance(fit, dict) and fitted_funnel is not None:
        kept = fit if _keeps_fit(raw, fit, fitted_funnel, task) else _raw_default_with_codes(raw, fit, fitted_funnel)
    if kept is not None and isinstance(fit, dict):
        raw_settings = None if isinstance(raw, Exception) else {f: v for f, v in raw.items() if f != "tried"}
        tried = fit["tried"] + ([] if isinstance(raw, Exception) else raw["tried"])
        for message in fit_warnings:
            warnings.warn(message, stacklevel=4)  # the caller of Store.tune
        return {**kept, "prefixes": "fitted", "raw_settings": raw_settings, "tried": tried}
    if isinstance(raw, Exception):
        if fitted_funnel is not None:
            raise TuningError(f"{raw} (codes fitted to the store's rows did not reach it either)") from None
        raise raw
    for message in raw_warnings:
        warnings.warn(message, stacklevel=4)
    tried = raw["tried"] + (fit["tried"] if isinstance(fit, dict) else [])
    return {**raw, "prefixes": "raw", "raw_settings": None, "tried": tried}


def _keeps_fit(raw: dict[str, Any] | Exception, fit: dict[str, Any], funnel: Funnel, task: Task) -> bool:
    """Whether the fitted codes' funnels beat the raw prefixes': the fastest of each, timed again in turns on
    ``funnel`` (the fitted one: it runs raw plans as the raw one does; the two tunings ran one after the
    other, and a busy machine moves times by more than a query's projection costs), within FIT_KEEP_MARGIN;
    or, within FIT_NOISE_MARGIN or FIT_NOISE_MS, needing fewer candidates for the raw prefixes' fastest
    funnel, or as many with a better recall at the smallest."""
    if not any(p["fitted"] for p in fit["shapes"].values() if p["reached"]):
        return False  # no funnel that reached the target searched the codes: nothing speaks for them
    if isinstance(raw, Exception):
        return True
    raw_best, fit_best = _fastest(raw), _fastest(fit)
    if not fit_best["fitted"]:
        return False
    raw_ms, fit_ms = _race([raw_best, fit_best], funnel, task)
    if fit_ms <= FIT_KEEP_MARGIN * raw_ms:
        return True
    if fit_ms > FIT_NOISE_MARGIN * raw_ms and fit_ms - raw_ms > FIT_NOISE_MS:
        return False
    key = shape_key(raw_best["dims"])
    same = fit["shapes"].get(key)
    if not same or not same["reached"] or same["shortlist"] > raw_best["shortlist"]:
        return False
    if same["shortlist"] < raw_best["shortlist"]:
        return True
    # equal shortlists (a small store, where every funnel reaches at the smallest): the codes that rank better
    # alone, at the smallest shortlist tried
    return _first_recall(fit, key) > _first_recall(raw, key)


def _raw_default_with_codes(
    raw: dict[str, Any] | Exception, fit: dict[str, Any], funnel: Funnel
) -> dict[str, Any] | None:
    """When the raw prefixes' fastest funnel starts at a length the fit does not code, it runs the same with
    the fit installed: the fit's choice with that funnel as the default, so that queries asking for a coded
    length (``dims=[16, ...]``) still shortlist on the codes. None when it starts at a coded length (its raw
    index would leave memory) or when no funnel on the codes reached the target."""
    if isinstance(raw, Exception) or funnel.fitted is None:
        return None
    default = raw["dims"][0]
    if default in funnel.fitted.by_dim or not any(p["fitted"] and p["reached"] for p in fit["shapes"].values()):
        return None
    key = shape_key(raw["dims"])
    chosen = {f: raw[f] for f in ("dims", "shortlist", "ef", "recall", "recall_low", "ms_per_query", "taper")}
    shapes = {**fit["shapes"], **({key: raw["shapes"][key]} if key in raw["shapes"] else {})}
    return {**fit, **chosen, "exact_ms_per_query": raw["exact_ms_per_query"], "shapes": shapes}


def _fastest(choice: dict[str, Any]) -> dict[str, Any]:
    """The measured point of a choice's fastest funnel shape that reached the target."""
    key, best = min(
        ((key, p) for key, p in choice["shapes"].items() if p["reached"]), key=lambda item: item[1]["ms_per_query"]
    )
    return next(
        p for p in choice["tried"]
        if shape_key(p["dims"]) == key and p["shortlist"] == best["shortlist"] and p["taper"] == best["taper"]
    )  # fmt: skip


def _race(points: list[dict[str, Any]], funnel: Funnel, task: Task) -> list[float]:
    """Median ms per query of each point's setting, timed RACE_ROUNDS times in turns."""
    times: list[list[float]] = [[] for _ in points]
    for _ in range(RACE_ROUNDS):
        for i, p in enumerate(points):
            again = measure(
                funnel, task.snap, task.probe, p["dims"], p["shortlist"], task.k, 1.0, p["taper"], p["fitted"]
            )
            times[i].append(again["ms_per_query"])
    return [float(np.median(t)) for t in times]


def _first_recall(choice: dict[str, Any], key: str) -> float:
    """The recall of shape ``key`` at the smallest shortlist measured."""
    points = [p for p in choice["tried"] if shape_key(p["dims"]) == key and p["taper"] == 1]
    return min(points, key=lambda p: p["shortlist"])["recall"] if points else 0.0


def _attempt(run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | Exception, list[str]]:
    """``run()``'s result or TuningError, and the warnings it gave (kept back until a choice is made)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result: dict[str, Any] | Exception = run()
        except TuningError as e:
            result = e
    return result, [str(w.message) for w in caught]


def _retime(points: list[dict[str, Any]], funnel: Funnel, snap: Snapshot, probe: Probe, k: int, fitted: bool) -> None:
    """Time the fastest few shapes' settings again, in turns, and keep each one's median: a single timing of
    a few milliseconds on a busy machine flipped the choice between shapes from one tune to the next."""
    leaders = sorted(points, key=lambda p: p["ms_per_query"])[:RETIME_CANDIDATES]
    if len(leaders) < 2:
        return
    times: dict[int, list[tuple[float, float]]] = {id(p): [(p["ms_per_query"], p["p50_ms"])] for p in leaders}
    for _ in range(RETIME_ROUNDS):
        for p in leaders:
            again = measure(funnel, snap, probe, p["dims"], p["shortlist"], k, 1.0, p["taper"], fitted)
            times[id(p)].append((again["ms_per_query"], again["p50_ms"]))
    for p in leaders:
        p["ms_per_query"] = float(np.median([t[0] for t in times[id(p)]]))
        p["p50_ms"] = float(np.median([t[1] for t in times[id(p)]]))


def _choose(
    best_per_shape: dict[str, dict[str, Any]],
    tried: list[dict[str, Any]],
    recall: float,
    budget: int,
    advise: Callable[[list[int], int], str],
    hint: str = "",
) -> dict[str, Any]:
    """The fastest shape that reached the target; a warning names the shapes that missed it. ``advise(dims,
    shortlist)``: how to index a longer prefix, for a funnel that needs a long shortlist ("" for none)."""
    reached = [p for p in best_per_shape.values() if p["reached"]]
    if not reached:
        best = max(tried, key=lambda p: p["recall"])
        dims = best["dims"]
        wider = advise(dims, budget)
        raise TuningError(
            f"no funnel reaches recall {recall} with a shortlist of at most {budget} (best {best['recall']:.3f} "
            f"with dims={dims}, shortlist {best['shortlist']}); nothing was saved: lower the target, check that "
            "the vectors have Matryoshka structure (short prefixes that rank well), or index a longer prefix"
            f"{f': {wider}' if wider else ''}{hint}"
        )
    missed = [p for p in best_per_shape.values() if not p["reached"]]
    if missed:
        warnings.warn(
            "tune: "
            + "; ".join(f"dims={p['dims']} reached only {p['recall']:.3f} (shortlist {p['shortlist']})" for p in missed)
            + f" against the target {recall}; queries with those dims use that best-effort setting",
            stacklevel=4,  # the caller of Store.tune
        )
    chosen = min(reached, key=lambda p: p["ms_per_query"])  # among the shapes that reach it, the fastest
    dims, shortlist = chosen["dims"], chosen["shortlist"]
    wider = advise(dims, shortlist) if shortlist >= LONG_SHORTLIST else ""
    if wider:  # on data whose distances spread over many dimensions, or a store of many millions of rows
        warnings.warn(
            f"tune: the fastest funnel needs a shortlist of {shortlist} from {dims[0]} numbers per row; a longer "
            f"indexed prefix needs far fewer: {wider}",
            stacklevel=4,  # the caller of Store.tune
        )
    return chosen


def _wider_advice(funnel: Funnel, task: Task, dims: list[int], shortlist: int) -> str:
    """How to index a longer prefix for a funnel that starts at ``dims[0]`` and needs ``shortlist`` from it:
    the shortest of WIDER_FACTORS times as many numbers (not indexed yet) that needs at most half that
    shortlist and less than LONG_SHORTLIST (its own tune would not warn), measured with an exact first stage
    on the tune's sample (what an HNSW index over it finds at best); "" when none does."""
    key = (*dims, shortlist)
    if key not in task.advice:
        task.advice[key] = ""
        for wider in (dims[0] * f for f in WIDER_FACTORS):
            if wider >= task.dim or wider in task.index_dims:
                continue
            later = tuple(d for d in dims[1:] if d > wider)
            needs = _exact_first_shortlist(funnel, task, (wider, *later), min(shortlist // 2, LONG_SHORTLIST - 1))
            if needs is not None:
                index_dims = tuple(sorted(set(task.index_dims) - {dims[0]} | {wider}))
                task.advice[key] = (
                    f"store.set_index_dims({index_dims}), then tune again (with an exact first stage on the same "
                    f"sample, {wider} numbers need a shortlist of {needs})"
                )
                break
    return task.advice[key]


def _exact_first_shortlist(funnel: Funnel, task: Task, dims: tuple[int, ...], limit: int) -> int | None:
    """The smallest shortlist (of the tuning grids, at most ``limit``) with which the funnel ``dims``, its first
    stage an exact scan of the ``dims[0]``-prefix, reaches the target on the tune's sample; None if none does.
    One scan keeps ``limit`` rows per query; each shortlist re-ranks the best of them."""
    k, probe = task.k, task.probe
    sizes = [s for s in sorted({max(k + 1, s) for s in (*GRID, *FINE_GRID)}) if s <= limit]
    if not sizes:
        return None
    rows, offsets, _ = funnel.exact(task.snap, probe.queries, dims[0], sizes[-1])  # best first per query
    for s in sizes:
        firsts = [np.sort(rows[a : min(b, a + s)]) for a, b in zip(offsets[:-1], offsets[1:])]
        starts = np.concatenate([[0], np.cumsum([len(f) for f in firsts])]).astype(np.int64)
        plan = Plan(dims, k + 1, tuple(tapered_sizes(s, k + 1, len(dims), 1)))  # refine alone: no beam
        found, found_at, _ = funnel.refine(probe.queries, np.concatenate(firsts).astype(np.int64), starts, plan)
        per_query = probe.recalls([found[a:b] for a, b in zip(found_at[:-1], found_at[1:])], k)
        if recall_lower_bound(per_query) >= task.recall:
            return s
    return None


def growth_exponents(funnel: Funnel, task: Task, shortlist: int, seed: int) -> dict[str, float]:
    """How the shortlist each first prefix of ``task.shapes`` needs grows with the store's rows, as an exponent
    of the growth (queries grow tuned shortlists by ``(rows now / rows tuned) ** exponent``; ``plan.grown``).
    Measured as a store and a random 1/GROWTH_PART of its rows compare: with an exact scan of the raw prefix
    as the first stage, the rank on it of the sample's true neighbours (within the part, for the part) that
    recall at the target needs. 1.0 (a fixed neighbour's rank grows in proportion to the rows, and the nearest
    rows only come closer) where the store is too small to tell or the rank is past GROWTH_RANK_CAP times
    ``shortlist`` (the longest tuned); at least GROWTH_FLOOR."""
    snap, probe, k = task.snap, task.probe, task.k
    firsts = sorted({shape[0] for shape in task.shapes if shape[0] < task.dim})
    if snap.n_live < GROWTH_MIN_ROWS or not firsts:
        return {str(d): 1.0 for d in firsts}
    live = np.flatnonzero(snap.live[: snap.watermark])
    part_rows = np.sort(np.random.default_rng(seed).choice(live, size=len(live) // GROWTH_PART, replace=False))
    found, offsets, _ = funnel.exact(snap, probe.queries, task.dim, k + 1, part_rows)
    part_truth = [_others(found[a:b], r, k) for r, a, b in zip(probe.rows, offsets[:-1], offsets[1:])]
    cap = min(len(part_rows) - 1, GROWTH_RANK_CAP * max(k + 1, shortlist))
    out = {}
    for d in firsts:
        whole_rank = _needed_rank(funnel.exact(snap, probe.queries, d, cap + 1), probe, probe.truth, task.recall)
        part_rank = _needed_rank(
            funnel.exact(snap, probe.queries, d, cap + 1, part_rows), probe, part_truth, task.recall
        )
        if whole_rank > cap or part_rank > cap:
            out[str(d)] = 1.0
        else:
            exponent = math.log(whole_rank / part_rank) / math.log(GROWTH_PART)
            out[str(d)] = round(min(1.0, max(GROWTH_FLOOR, exponent)), 3)
    return out


def _needed_rank(
    ranked: tuple[np.ndarray, np.ndarray, np.ndarray], probe: Probe, truth: list[np.ndarray], recall: float
) -> int:
    """The shortlist from exact first-stage rankings (rows best first per query, offsets) that holds
    ``recall`` of ``truth``'s rows, pooled over the queries (each query's own row not counted); past the
    rankings' length where none does."""
    rows, offsets, _ = ranked
    ranks: list[int] = []
    for own, t, a, b in zip(probe.rows, truth, offsets[:-1], offsets[1:]):
        ranking = rows[a:b][rows[a:b] != own]
        position = {int(r): i + 1 for i, r in enumerate(ranking)}
        ranks += [position.get(int(r), len(ranking) + 1) for r in t]
    return int(np.quantile(ranks, recall, method="higher")) if ranks else 1


def _cheapest(measure: Any, grid: list[int], fine: list[int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The smallest size reaching the target (coarse grid, then the fine sizes just below the first size
    that reaches it), or the last size tried; and every point measured."""
    tried: list[dict[str, Any]] = []
    missed = 0
    for s in grid:
        tried.append(measure(s))
        if tried[-1]["reached"]:
            hit = tried[-1]
            for f in (f for f in fine if missed < f < s):
                tried.append(measure(f))
                if tried[-1]["reached"]:
                    return tried[-1], tried
            return hit, tried
        missed = s
    return tried[-1], tried


def _others(rows: np.ndarray, own: int, k: int) -> np.ndarray:
    return rows[rows != own][:k]


@dataclass(frozen=True)
class Probe:
    """Sampled queries and their exact top-k at full dimension: what tuning and the dims report measure
    against. ``rows``: each query's own row, excluded from its results (-1 for held-out queries)."""

    queries: np.ndarray
    rows: np.ndarray
    truth: list[np.ndarray]
    exact_ms: float  # exact full-dimension search, batched, per query

    @classmethod
    def sample(
        cls, funnel: Funnel, snap: Snapshot, k: int, sample: int, seed: int, dim: int,
        read_queries: Callable[[np.ndarray], np.ndarray],
        queries: np.ndarray | None = None,
    ) -> Probe:  # fmt: skip
        """Up to ``sample`` of the store's live rows (or of ``queries``), and their truth."""
        rng = np.random.default_rng(seed)
        if queries is None:
            live_rows = np.flatnonzero(snap.live[: snap.watermark])
            rows = np.sort(rng.choice(live_rows, size=min(sample, len(live_rows)), replace=False))
            queries = read_queries(rows)
        else:
            queries = queries[np.sort(rng.choice(len(queries), size=min(sample, len(queries)), replace=False))]
            rows = np.full(len(queries), -1)  # no own row to exclude
        t0 = time.perf_counter()
        found, offsets, _ = funnel.exact(snap, queries, dim, k + 1)
        exact_ms = 1e3 * (time.perf_counter() - t0) / len(queries)
        truth = [_others(found[a:b], r, k) for r, a, b in zip(rows, offsets[:-1], offsets[1:])]
        return cls(queries, rows, truth, exact_ms)

    def each_timed(self, search: Callable[[np.ndarray], np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
        """``search(query)`` (a 1 x dim array; it returns the rows found) for every query, one at a time: the
        rows found and the seconds each took (the latency a caller of query() sees; a batch would time the
        threads)."""
        found, times = [], []
        for q in self.queries:
            t0 = time.perf_counter()
            found.append(search(q[None]))
            times.append(time.perf_counter() - t0)
        return found, times

    def recalls(self, found: list[np.ndarray], k: int) -> np.ndarray:
        """Each query's recall@k of ``found`` (its rows, best first) against the truth."""
        return np.array([len(set(_others(f, r, k).tolist()) & set(t.tolist())) / k
                         for r, f, t in zip(self.rows, found, self.truth)])  # fmt: skip


def measure(
    funnel: Funnel,
    snap: Snapshot,
    probe: Probe,
    dims_t: Sequence[int],
    s: int,
    k: int,
    target: float,
    taper: int = 1,
    fitted: bool = False,
) -> dict[str, Any]:
    """One setting, timed one query at a time: its recall, lower bound, mean and median ms per query."""
    sizes = tuple(tapered_sizes(s, k + 1, len(dims_t), taper))
    ef = max(funnel.ef_search, s)
    plan = Plan(tuple(dims_t), k + 1, sizes, ef, fitted)
    found, times = probe.each_timed(lambda q: funnel.run(snap, q, plan)[0])
    per_query = probe.recalls(found, k)
    got, low = float(per_query.mean()), recall_lower_bound(per_query)
    return {
        "dims": list(dims_t), "shortlist": s, "ef": ef, "recall": got, "recall_low": low,
        "ms_per_query": 1e3 * float(np.mean(times)), "p50_ms": 1e3 * float(np.median(times)),
        "reached": low >= target, "taper": taper, "fitted": funnel.uses_fit(plan),
    }  # fmt: skip


def recall_lower_bound(per_query: np.ndarray) -> float:
    """A one-sided 95% lower confidence bound on the mean recall of new queries like these: the sample mean
    less Z standard errors. The sampled queries' mean alone overstates it for half of the tunings: a
    setting that just reaches the target on 200 sampled queries misses it on new ones as often as not."""
    n = len(per_query)
    if n < 2:
        return float(per_query.mean()) if n else 0.0
    return float(per_query.mean() - RECALL_BOUND_Z * per_query.std(ddof=1) / np.sqrt(n))
