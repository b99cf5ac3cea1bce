"""The dims report: how recall and latency change with the number of dims per row and the funnel's shortlist,
measured on the store's own rows ("how many dims do I need?", answered from the user's data).

Two kinds of rows: each prefix alone (an exact scan of the first d numbers: the quality of d dims; for a
store with fitted codes, also each code alone, searched in its HNSW index), and every funnel shape at each
shortlist of tune's grid, on raw prefixes and, with a fit, on fitted codes (column ``codes``); tune's own
points are taken when they are fresh (same k, and the store unchanged since; ``taper`` 2 halves the last
re-rank of a funnel of three or more stages). Recall is
recall@k against exact full-dimension search; latency is one query at a time; bytes are the vector bytes a
query reads from the bands (HNSW stages read none: the prefix indexes are in memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mrlstore.query import tuning
from mrlstore.query.funnel import Funnel
from mrlstore.query.plan import Plan, funnel_shapes, grown_size, tapered_sizes, tuned_first, tuned_growth
from mrlstore.tiers.params import StoreParams
from mrlstore.tiers.snapshot import Snapshot

SCHEMA = pa.schema([
    ("dims", pa.list_(pa.int32())), ("kind", pa.string()), ("codes", pa.string()), ("shortlist", pa.int32()),
    ("taper", pa.int32()), ("recall", pa.float64()), ("recall_low", pa.float64()), ("p50_ms", pa.float64()),
    ("bytes_per_query", pa.int64()), ("tuned", pa.bool_()),
])  # fmt: skip


def dims_report(
    funnel: Funnel,
    snap: Snapshot,
    params: StoreParams,
    tuned: dict[str, Any] | None,
    k: int,
    sample: int,
    seed: int,
    read_queries: Callable[[np.ndarray], np.ndarray],
    generation: int = 0,
) -> pa.Table:
    """The report's table (see the module's docstring), prefixes first, then funnels by shape and shortlist."""
    probe = tuning.Probe.sample(funnel, snap, k, sample, seed, params.dim, read_queries)
    itemsize = np.dtype(params.dtype).itemsize
    coded = set(funnel.fitted.by_dim) if funnel.fitted is not None else set()
    # query() scans a prefix exactly when tune chose exact search, or one prefix no index searches
    scanned = [int(tuned["dims"][0])] if tuned is not None and _tuned_exact(funnel, tuned, coded) else []
    rows = [_prefix_row(funnel, snap, probe, d, k, itemsize) for d in sorted({*prefix_dims(params), *scanned})]
    for row in rows:
        row["tuned"] = row["dims"] == scanned
    if funnel.fitted is not None:
        rows += [_code_row(funnel, snap, probe, d, k, params.dim * itemsize) for d in sorted(funnel.fitted.by_dim)]
    for point in _funnel_points(funnel, snap, probe, params, tuned, coded, k, sample, seed, generation):
        if funnel.is_exact(point["dims"], bool(point.get("fitted")) and point["dims"][0] in coded):
            continue  # exact search (dims=[dim] is, indexed or not): a prefix row
        sizes = tapered_sizes(point["shortlist"], k + 1, len(point["dims"]), point.get("taper", 1))
        rows.append({
            "dims": point["dims"], "kind": "funnel", "codes": "fitted" if point.get("fitted") else "raw",
            "shortlist": point["shortlist"],
            "taper": point.get("taper", 1), "recall": point["recall"], "recall_low": point.get("recall_low"),
            "p50_ms": point.get("p50_ms"),
            "bytes_per_query": funnel_bytes(point["dims"], sizes, _hnsw_dims(funnel, point), snap.n_live, itemsize),
            "tuned": _key(point) == _tuned_key(funnel, tuned, k, coded, snap.n_live),
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _hnsw_dims(funnel: Funnel, point: dict[str, Any]) -> list[int]:
    """The first stages this point's funnel searches with HNSW (raw prefixes a fit replaced are scanned)."""
    codes = funnel.fitted.by_dim if funnel.fitted is not None and point.get("fitted") else {}
    return [*funnel.indexes, *codes]


def prefix_dims(params: StoreParams) -> list[int]:
    """The prefixes worth a row: the indexed ones, the band edges, and powers of two in between."""
    powers = [1 << i for i in range(3, 16) if (1 << i) < params.dim]
    return sorted({*params.index_dims, *params.bands, *powers, params.dim})


def funnel_bytes(dims: Sequence[int], sizes: Sequence[int], index_dims: Sequence[int], live: int, itemsize: int) -> int:
    """Vector bytes one query reads from the bands, at most: an exact first stage scans every live row's
    prefix (and its sums carry over); after an HNSW first stage, which keeps no sums, the first re-rank reads
    each candidate from column 0; each later stage reads its new columns for the survivors of the stage
    before. A long last stage skips the rest of rows that cannot win, so it may read less."""
    exact_first = dims[0] not in index_dims
    first = live * dims[0] if exact_first else 0
    starts = [dims[0] if exact_first else 0, *dims[1:-1]]
    later = sum(s * (b - a) for s, a, b in zip(sizes, starts, dims[1:]))
    return int((first + later) * itemsize)


def _prefix_row(funnel: Funnel, snap: Snapshot, probe: tuning.Probe, d: int, k: int, itemsize: int) -> dict:
    found, times = probe.each_timed(lambda q: funnel.exact(snap, q, d, k + 1)[0])
    per_query = probe.recalls(found, k)
    return {
        "dims": [d], "kind": "prefix alone", "codes": "raw", "shortlist": None, "taper": None,
        "recall": float(per_query.mean()),
        "recall_low": tuning.recall_lower_bound(per_query), "p50_ms": 1e3 * float(np.median(times)),
        "bytes_per_query": snap.n_live * d * itemsize, "tuned": False,
    }  # fmt: skip


def _code_row(funnel: Funnel, snap: Snapshot, probe: tuning.Probe, d: int, k: int, row_bytes: int) -> dict:
    """A fitted code alone: its HNSW index's best k+1, ranked by the codes (their rows read whole)."""
    plan = Plan((d,), k + 1, (), None, fitted=True)
    found, times = probe.each_timed(lambda q: funnel.run(snap, q, plan)[0])
    per_query = probe.recalls(found, k)
    return {
        "dims": [d], "kind": "prefix alone", "codes": "fitted", "shortlist": None, "taper": None,
        "recall": float(per_query.mean()),
        "recall_low": tuning.recall_lower_bound(per_query), "p50_ms": 1e3 * float(np.median(times)),
        "bytes_per_query": (k + 1) * row_bytes, "tuned": False,
    }  # fmt: skip


def _funnel_points(
    funnel: Funnel,
    snap: Snapshot,
    probe: tuning.Probe,
    params: StoreParams,
    tuned: dict[str, Any] | None,
    coded: set[int],
    k: int,
    sample: int,
    seed: int,
    generation: int,
) -> list[dict[str, Any]]:
    """Every shape at every shortlist of tune's grid up to its budget; the points tune measured are taken as
    they are when fresh (the store unchanged since: same rows, live rows and generation; measured the same
    way: the same k, sample and seed, on the store's own rows)."""
    grid = tuning.shortlist_grid(k, snap.n_live)[1]
    known: dict[tuple, dict[str, Any]] = {}
    for point in _fresh_points(tuned, snap, generation, k, sample, seed):
        if funnel.fitted is not None or not point.get("fitted"):  # a fit tune measured and dropped: not the store's
            point = {**point, "fitted": bool(point.get("fitted")) and point["dims"][0] in coded}  # as it ran
            known.setdefault(_key(point), point)
    shapes = [tuple(shape) for shape in funnel_shapes(params.index_dims, params.bands, params.dim)]
    # on the codes only where the first prefix has them (the others run on raw prefixes: the same funnel)
    wanted = [(shape, s, 1, fitted) for shape in shapes for fitted in (False, True) if not fitted or shape[0] in coded
              for s in grid]  # fmt: skip
    runs = _tuned_key(funnel, tuned, k, coded, snap.n_live)
    if runs is not None and runs not in wanted:
        wanted.append(runs)  # what query(v, k=k) runs, also where that shortlist is off the grid
    points = [known.pop(key) if key in known else _measure(funnel, snap, probe, key, k) for key in wanted]
    points += list(known.values())  # tune's other points: tapered schedules, fine sizes
    return sorted(
        points, key=lambda p: (bool(p.get("fitted")), len(p["dims"]), p["dims"], p["shortlist"], p.get("taper", 1))
    )


def _measure(funnel: Funnel, snap: Snapshot, probe: tuning.Probe, key: tuple, k: int) -> dict[str, Any]:
    dims, shortlist, taper, fitted = key
    return tuning.measure(funnel, snap, probe, dims, shortlist, k, 1.0, taper, fitted)


def _fresh_points(
    tuned: dict[str, Any] | None, snap: Snapshot, generation: int, k: int, sample: int, seed: int
) -> list[dict[str, Any]]:
    if not tuned or tuned.get("held_out", True):
        return []
    store_then = (tuned.get("rows"), tuned.get("live"), tuned.get("generation"))
    asked_then = (tuned.get("k"), tuned.get("sample_asked"), tuned.get("seed"))
    if store_then != (snap.watermark, snap.n_live, generation) or asked_then != (k, sample, seed):
        return []
    return [p for p in tuned.get("tried", []) if "p50_ms" in p]


def _key(point: dict[str, Any]) -> tuple[tuple[int, ...], int, int, bool]:
    return tuple(point["dims"]), point["shortlist"], point.get("taper", 1), bool(point.get("fitted"))


def _tuned_key(
    funnel: Funnel, tuned: dict[str, Any] | None, k: int, coded: set[int], live: int
) -> tuple[tuple[int, ...], int, int, bool] | None:
    """The funnel ``query(v, k=k)`` runs: tune's shape, its shortlist for this k (grown with the ``live`` rows
    since), on the codes when its first prefix has them (a fit's choice may start at a raw prefix); None for
    exact search or an untuned store."""
    if not tuned or _tuned_exact(funnel, tuned, coded):
        return None
    shortlist = tuned_first(tuned["shortlist"], tuned.get("k", k), k)
    if len(tuned["dims"]) > 1:  # as plan.grown: one stage has no shortlist to grow
        shortlist = grown_size(shortlist, *tuned_growth(tuned), live)
    return tuple(tuned["dims"]), shortlist, tuned.get("taper", 1), _tuned_codes(tuned, coded)


def _tuned_codes(tuned: dict[str, Any], coded: set[int]) -> bool:
    """Whether tune's choice shortlists on fitted codes (a fit's choice may start at a raw prefix)."""
    return tuned.get("prefixes") == "fitted" and tuned["dims"][0] in coded


def _tuned_exact(funnel: Funnel, tuned: dict[str, Any], coded: set[int]) -> bool:
    return funnel.is_exact(tuned["dims"], _tuned_codes(tuned, coded))
