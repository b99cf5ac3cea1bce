"""Inner product searched as l2: each row ``x`` lifted to one norm R by one more number, sqrt(R^2 - |x|^2), and
each query given 0 there, so that |q' - x'|^2 = |q|^2 + R^2 - 2 q.x orders rows as q.x does. hnswlib's own
"ip" space is no metric and its graphs miss neighbours: on MRL-like 16-d prefixes (8,000 rows) they found 0.61
of the top 200 at M=8, where the lifted graph found 0.96 (benchmarks/ip_graphs.py).

Rows far longer than the rest are kept beside the graph and scored exactly by every search. In the graph they
would set R: every other row would sit at about R from every query, so that the float32 l2 hnswlib computes
loses their order (in a review's scratch run, one row 10,000 times longer than the rest left 0.07 of the top
10), and the long rows themselves, far from the rest on the sphere, are seldom reached (benchmarks/ip_graphs.py,
"rows much longer than the rest"). "Far longer" is against the first rows' median, so that a group of them
counts, not only a handful. A ``Lift`` holds the radius, that limit and those rows; ``PrefixIndex`` holds one
for an inner-product index.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

HEADROOM = 1.25  # R over the longest row in the graph: rows a little longer fit without a rebuild
LONG_FACTOR = 3.0  # a row longer than this many times the first rows' median is kept beside the graph
# More rows than this beside it: the norms grew, and the graph is rebuilt at a radius that takes them in
# (scoring 4,096 32-d rows exactly costs a query about as much as its HNSW search).
LONG_MAX = 4096


def _first_limit(norms: np.ndarray) -> float:
    """The limit the first rows set: LONG_FACTOR times their median norm, all-zero rows left out (0: none
    yet, and the next rows set it)."""
    nonzero = norms[norms > 0]
    return LONG_FACTOR * float(np.median(nonzero)) if len(nonzero) else 0.0


class Split(NamedTuple):
    """Rows to add, sorted by ``Lift.split``."""

    graph_x: np.ndarray
    graph_rows: np.ndarray
    beside: dict[int, np.ndarray]
    radius: float | None  # rebuild the graph at this radius first (None: the current one serves)
    limit: float


class Lift:
    """The lifting radius of one inner-product index and the rows kept beside its graph (row -> its prefix).
    ``long`` is replaced, never changed in place, and only under the index's write lock: a search reads one
    whole dict."""

    def __init__(
        self,
        dim: int,
        radius: float = 0.0,
        long: dict[int, np.ndarray] | None = None,
        unlinked: Any = (),
        limit: float = 0.0,
    ):
        self.dim, self.radius = dim, radius
        self.limit = limit  # rows longer than this are kept beside the graph (0: set by the first rows)
        self.long: dict[int, np.ndarray] = long or {}
        # rows beside the graph whose older copy in it is marked deleted (a row number written again after
        # a failed commit); written to the graph again, hnswlib unmarks that copy
        self.unlinked: set[int] = set(unlinked)
        self._side: tuple[dict[int, np.ndarray], np.ndarray, np.ndarray] | None = None  # long as arrays

    def split(self, x: np.ndarray, rows: np.ndarray) -> Split:
        """Of rows to add: those for the graph, those to keep beside it, and the radius and limit the graph
        must be rebuilt at first (radius None: the current one serves). Changes nothing: ``place`` and
        ``moved_in`` do, under the lock."""
        norms = np.linalg.norm(x, axis=1)
        limit = self.limit or _first_limit(norms)
        beside = norms > limit if limit > 0 else np.zeros(len(norms), dtype=bool)
        kept = {row: np.array(v, dtype=np.float32) for row, v in zip(rows[beside].tolist(), x[beside])}
        longest = float(norms[~beside].max(initial=0.0))
        radius = HEADROOM * longest if longest > self.radius else None
        if len(self.long) + len(kept) > LONG_MAX:  # the norms grew: the graph takes them in, but the longest 0.1%
            beside_norms = np.linalg.norm(np.stack([*self.long.values(), *kept.values()]), axis=1)
            limit = max(limit, float(np.quantile(beside_norms, 0.999)))
            radius = max(self.radius, HEADROOM * max(longest, limit))  # never smaller: rows in the graph fit
        return Split(x[~beside], rows[~beside], kept, radius, limit)

    def place(self, graph_rows: np.ndarray, beside: dict[int, np.ndarray]) -> None:
        """``beside`` kept beside the graph, and ``graph_rows`` no longer (a row number written again after
        a failed commit may change sides)."""
        if not beside and not self.long:
            return
        long = dict(self.long)
        if long and len(graph_rows):
            held = np.fromiter(long, dtype=np.int64, count=len(long))
            for row in held[np.isin(held, graph_rows)].tolist():
                del long[row]
        long.update(beside)
        self.long = long

    def lifted(self, x: np.ndarray, radius: float | None = None) -> np.ndarray:
        """Rows with their lifting number (at ``radius``, default this lift's)."""
        r = self.radius if radius is None else radius
        lift = np.sqrt(np.maximum(r * r - np.square(np.linalg.norm(x.astype(np.float64), axis=1)), 0.0))
        return np.ascontiguousarray(np.hstack([x, lift[:, None].astype(np.float32)]))

    def relinked(self, graph_rows: np.ndarray) -> int:
        """How many of ``graph_rows`` have a copy in the graph marked deleted, which their write unmarks."""
        if not self.unlinked:
            return 0
        back = self.unlinked.intersection(np.asarray(graph_rows).tolist())
        self.unlinked -= back
        return len(back)

    def taken_in(self, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """The rows beside the graph that a graph at ``radius`` takes in (their rows, their prefixes)."""
        long = self.long
        rows = [row for row, v in long.items() if float(np.linalg.norm(v)) <= radius]
        vectors = np.array([long[row] for row in rows], dtype=np.float32).reshape(len(rows), self.dim)
        return np.array(rows, dtype=np.int64), vectors

    def moved_in(self, radius: float, limit: float, rows: np.ndarray) -> None:
        """The graph was rebuilt at ``radius`` holding ``rows`` of those beside it (and no deleted rows); rows
        longer than ``limit`` are kept beside it from now on."""
        self.radius, self.limit = radius, limit
        taken = set(rows.tolist())
        self.long = {row: v for row, v in self.long.items() if row not in taken}
        self.unlinked = set()

    def drop(self, rows: list[int]) -> None:
        """Forget deleted rows kept beside the graph."""
        gone = {row for row in rows if row in self.long} if self.long else set()
        if gone:
            self.long = {row: v for row, v in self.long.items() if row not in gone}
        self.unlinked.difference_update(rows)

    def merged(self, queries: np.ndarray, labels: np.ndarray, dists: np.ndarray, k: int) -> np.ndarray:
        """The best ``k`` per query of the graph's (labels, squared l2 distances of the lifted rows) and the
        rows beside it, by inner product."""
        long, side = self.long, self._side
        if not long:
            return labels
        if side is None or side[0] is not long:
            side = (long, np.fromiter(long, dtype=np.int64, count=len(long)), np.stack(list(long.values())))
            self._side = side
        _, side_rows, side_x = side
        q = queries[:, : self.dim]
        graph_ip = (np.einsum("ij,ij->i", q, q)[:, None] + self.radius**2 - dists) / 2
        graph_ip = np.where(labels >= 0, graph_ip, -np.inf)
        scores = np.hstack([graph_ip, q @ side_x.T])
        every = np.hstack([labels, np.broadcast_to(side_rows, (len(q), len(side_rows)))])
        keep = min(k, scores.shape[1])
        if keep < scores.shape[1]:  # the best k of thousands beside the graph: partition, then order those
            part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
            best = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1), 1)
        else:
            best = np.argsort(-scores, axis=1, kind="stable")
        out = np.take_along_axis(every, best, axis=1)
        return np.where(np.take_along_axis(scores, best, axis=1) > -np.inf, out, -1)

    def to_sidecar(self) -> dict[str, Any]:
        return {
            "ip_radius": self.radius,
            "ip_limit": self.limit,
            "ip_long": [[row, v.tolist()] for row, v in self.long.items()],
            "ip_unlinked": sorted(self.unlinked),
        }

    @classmethod
    def from_sidecar(cls, dim: int, side: dict[str, Any]) -> Lift:
        """The lift a sidecar saved; ValueError when its fields are not what ``to_sidecar`` writes."""
        try:
            long = {_row(row): np.array(v, dtype=np.float32) for row, v in side.get("ip_long") or []}
            radius = float(side.get("ip_radius") or 0.0)
            saved = side.get("ip_limit")
            limit = 4 * radius if saved is None else float(saved)  # (the rule before the limit was saved)
            unlinked = [_row(row) for row in side.get("ip_unlinked") or ()]
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"unreadable ip fields: {e}") from None
        if not (0 <= radius < 1e150 and 0 <= limit < 1e150):  # squared in float64 as it searches
            raise ValueError(f"ip_radius {radius} or ip_limit {limit} out of range")
        if any(v.shape != (dim,) or not np.isfinite(v).all() for v in long.values()):
            raise ValueError(f"ip_long holds a row that is not {dim} finite numbers")
        return cls(dim, radius, long, unlinked, limit)


def _row(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a row number")
    return value
