"""Query plans: what one ``query`` call runs (the funnel's prefixes, survivors per stage, k, HNSW beam),
resolved from the call's arguments and the settings ``tune`` persisted, and remembered per argument set."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mrlstore.errors import InvalidDimsError, InvalidKError
from mrlstore.inputs.vectors import dims_tuple
from mrlstore.tiers.params import positive_int

PLAN_CACHE_SIZE = 256


def default_shortlists(k: int, stages: int) -> list[int]:
    """Survivors after each stage but the last: the paper's 200 for k=10 at the first, halving after."""
    first = max(200, 20 * k)
    return [max(k, first >> i) for i in range(stages - 1)]


def shortlist_sizes(shortlist: int | Sequence[int] | None, k: int, stages: int) -> list[int]:
    if shortlist is None:
        return default_shortlists(k, stages)
    if isinstance(shortlist, bool):
        raise TypeError(f"shortlist must be an int or a list of ints, got {shortlist!r}")
    if isinstance(shortlist, (int, np.integer)):
        if shortlist < k:
            raise ValueError(f"shortlist must be at least k={k}, got {shortlist}")
        return [max(k, int(shortlist) >> i) for i in range(stages - 1)]
    if not isinstance(shortlist, Sequence) or isinstance(shortlist, str):
        raise TypeError(f"shortlist must be an int or a list of ints, got {shortlist!r}")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in shortlist):
        raise TypeError(f"shortlist sizes must be integers, got {list(shortlist)!r}")  # 1.5 is no size
    sizes = [int(s) for s in shortlist]
    if len(sizes) != stages - 1:
        raise ValueError(f"shortlist needs {stages - 1} sizes (one per stage but the last), got {len(sizes)}")
    return sizes


@dataclass(frozen=True)
class Plan:
    """What one query call runs: the funnel's prefixes, survivors per stage but the last, k, HNSW beam."""

    dims: tuple[int, ...]
    k: int
    sizes: tuple[int, ...]
    ef: int | None = None
    fitted: bool = False  # the first stage searches the store's fitted codes (where it has them)
    tuned_live: int = 0  # the live rows tune measured ``sizes`` on (0: the sizes were not tuned)
    growth: float = 1.0  # tuned sizes grow by (live rows / tuned_live) ** growth
    taper: int = 1  # the tuned schedule's (``tapered_sizes``)


def for_rows(plan: Plan, live: int) -> Plan:
    """``plan`` for a store of ``live`` rows: its tuned survivors grown with the store since tune, then every
    size at most ``live``."""
    return within(grown(plan, live), live)


def grown(plan: Plan, live: int) -> Plan:
    """``plan`` with survivors tuned on fewer rows grown as the store grew since, by the exponent tune
    measured (``tuning.growth_exponents``). A true neighbour's rank on a short prefix grows with the rows
    around it: kept as tuned, a shortlist tuned at 20k rows found 0.71 of the top 10 at 80k rows and 0.50
    at 160k on data of 1,000 clusters, 0.99 grown (benchmarks/results/tune_growth.md)."""
    if not plan.sizes:  # one stage: no shortlist to grow
        return plan
    first = grown_size(plan.sizes[0], plan.tuned_live, plan.growth, live)
    if first == plan.sizes[0]:
        return plan
    return replace(plan, sizes=tuple(tapered_sizes(first, plan.k, len(plan.dims), plan.taper)))


def grown_size(size: int, tuned_live: int, growth: float, live: int) -> int:
    """A survivor count tuned on ``tuned_live`` rows, for ``live`` rows (see ``grown``)."""
    if not tuned_live or live <= tuned_live:
        return size
    return max(size, math.ceil(size * (live / tuned_live) ** growth))


def tuned_growth(setting: dict[str, Any]) -> tuple[int, float]:
    """The live rows a tuned setting was measured on (0: not kept) and the exponent its shortlists grow by
    (1.0 where tune did not measure it)."""
    return int(setting.get("live") or 0), float((setting.get("growth") or {}).get(str(setting["dims"][0]), 1.0))


def within(plan: Plan, rows: int) -> Plan:
    """``plan`` with k and the survivors per stage at most ``rows``, the live rows (k past the store returns
    every row; a k of 10**7 sized buffers of 20 x k per query for a store of 1,000 rows)."""
    if plan.k <= rows and all(size <= rows for size in plan.sizes):
        return plan
    return replace(plan, k=max(1, min(plan.k, rows)), sizes=tuple(max(1, min(s, rows)) for s in plan.sizes))


def shape_key(dims: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in dims)


def funnel_shapes(index_dims: Sequence[int], bands: Sequence[int], dim: int) -> list[tuple[int, ...]]:
    """The shapes users pass: for every indexed prefix d < dim, d -> dim and d -> every band edge -> dim."""
    shapes: list[tuple[int, ...]] = []
    for d in index_dims:
        if d >= dim:
            continue
        shapes.append((d, dim))
        edges = tuple(b for b in bands if d < b < dim)
        if edges:
            shapes.append((d, *edges, dim))
    return shapes or [(index_dims[0],) if index_dims else (dim,)]


def default_dims(index_dims: Sequence[int], dim: int) -> tuple[int, ...]:
    return (index_dims[0], dim) if index_dims and index_dims[0] < dim else (dim,)


def make_plan(
    tuned: dict[str, Any] | None,
    dims: Sequence[int] | int | None,
    k: Any,
    shortlist: int | Sequence[int] | None,
    ef: int | None,
    index_dims: Sequence[int],
    dim: int,
    fitted: bool = False,
) -> Plan:
    """Validate a query's arguments and resolve them against the tuned settings (of the fitted codes when
    ``fitted``, else of the raw prefixes)."""
    tuned = settings_for(tuned, fitted)
    k = positive_int(k, "k")
    if ef is not None:
        ef = positive_int(ef, "ef")
    setting = _tuned_setting(tuned, dims, dim) if shortlist is None else None
    tuned_live, growth, taper = 0, 1.0, 1
    if setting is not None:
        (tuned_live, growth), taper = tuned_growth(setting), setting.get("taper", 1)
        tuned_dims: list[int] = setting["dims"]
        dims = tuned_dims
        first = tuned_first(setting["shortlist"], setting["k"], k)
        ef = ef if ef is not None else max(setting["ef"], first)
        shortlist = tapered_sizes(first, k, len(tuned_dims), taper)  # [] for one stage
    dims_t = dims_tuple(dims if dims is not None else default_dims(index_dims, dim), dim)
    try:
        sizes = shortlist_sizes(shortlist, k, len(dims_t))
    except (ValueError, TypeError) as e:
        raise InvalidKError(str(e)) from None
    for s in sizes:
        positive_int(s, "shortlist")
        if s < k:
            raise InvalidKError(f"shortlist sizes must be at least k={k}, got {s}")
    return Plan(dims_t, k, tuple(sizes), ef, fitted, tuned_live, growth, taper)


def tuned_first(shortlist: int, tuned_k: int, k: int) -> int:
    """The first stage's survivors for ``k`` from a shortlist tuned at ``tuned_k``: grown in proportion for a
    larger k, kept for a smaller one (a shortlist that holds the top 10 at the target holds the top 1 at
    least as often; cut to 2 for k=1, it found 0.73 of them)."""
    return max(shortlist, -(-shortlist * k // tuned_k))


def for_filter_scan(plan: Plan, matched: int) -> Plan:
    """``plan`` for a where= filter whose ``matched`` rows are scanned exactly on the first prefix: at least
    the untuned shortlists. A tuned shortlist was measured on the whole store, whose nearest rows stand far
    apart from the rest; the best of a filter's rows are farther out and closer together, and a tuned
    shortlist of 25 lost a tenth of them. The scan of the matching rows costs about as much as the re-rank."""
    if not plan.sizes:
        return plan
    untuned = default_shortlists(plan.k, len(plan.dims))
    sizes = tuple(max(s, min(u, matched)) for s, u in zip(plan.sizes, untuned))
    return plan if sizes == plan.sizes else replace(plan, sizes=sizes)


def settings_for(tuned: dict[str, Any] | None, fitted: bool) -> dict[str, Any] | None:
    """The tuned settings of queries on fitted codes or on raw prefixes: a store tuned onto fitted codes
    keeps its raw prefixes' settings under ``raw_settings``."""
    if not tuned or (tuned.get("prefixes") == "fitted") == fitted:
        return tuned
    return tuned.get("raw_settings") if not fitted else None


def tapered_sizes(shortlist: int, k: int, stages: int, taper: int) -> list[int]:
    """Survivors per stage but the last: halving from ``shortlist``, the last of three or more divided by
    ``taper`` once more."""
    sizes = shortlist_sizes(shortlist, k, stages)
    if taper > 1 and len(sizes) >= 2:
        sizes[-1] = max(k, sizes[-1] // taper)
    return sizes


def plan_key(dims: Any, k: Any, shortlist: Any, ef: Any) -> tuple | None:
    """A hashable key for query arguments of plain ``int`` types (None when some are not: those are
    validated each time, so ``k=True`` or ``dims=[16.0]`` still get their error)."""
    try:
        return (_plain(dims), _plain(k), _plain(shortlist), _plain(ef))
    except TypeError:
        return None


def _plain(x: Any) -> Any:
    """``x`` when None or an int, a tuple of a list or tuple of ints; TypeError otherwise."""
    if x is None or type(x) is int:
        return x
    if isinstance(x, (list, tuple)) and all(type(v) is int for v in x):
        return tuple(x)
    raise TypeError


def _tuned_setting(tuned: dict[str, Any] | None, dims: Any, dim: int) -> dict[str, Any] | None:
    if not tuned:
        return None
    if dims is None:
        return tuned
    try:
        dims_t = dims_tuple(dims, dim)
    except InvalidDimsError:
        return None  # make_plan reports the bad dims
    key = shape_key(dims_t)
    setting = tuned.get("shapes", {}).get(key)
    if setting is None and shape_key(tuned["dims"]) == key:
        setting = tuned
    if setting is None:
        return None
    return {**setting, "dims": list(dims_t), "k": tuned["k"], "live": tuned.get("live"), "growth": tuned.get("growth")}


class PlanCache:
    """Validated plans by argument set, for one tuned state: a new ``tuned`` entry (a new object) or other
    indexed prefixes empty it."""

    def __init__(self) -> None:
        self._tuned: object = None
        self._index_dims: tuple[int, ...] = ()
        self._plans: dict[tuple, Plan] = {}

    def plan(
        self,
        tuned: dict[str, Any] | None,
        dims: Any,
        k: Any,
        shortlist: Any,
        ef: Any,
        index_dims: Sequence[int],
        dim: int,
        fitted: bool = False,
    ) -> Plan:
        if tuned is not self._tuned or tuple(index_dims) != self._index_dims:
            self._tuned, self._index_dims, self._plans = tuned, tuple(index_dims), {}
        key = plan_key(dims, k, shortlist, ef)
        key = None if key is None else (*key, fitted)
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            plan = make_plan(tuned, dims, k, shortlist, ef, index_dims, dim, fitted)
            if key is not None:
                if len(self._plans) >= PLAN_CACHE_SIZE:
                    self._plans.clear()
                self._plans[key] = plan
        return plan
