"""What the store's verbs return: :class:`Hits` for one query, :class:`HitsBatch` for a batch, the typed
records ``info()``, ``tune()`` and ``compact()`` return (attribute access, and dict-style for older callers),
and the :class:`AddResult` of an image add."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, SupportsIndex, overload

import numpy as np
import pyarrow as pa

from mrlstore.tiers.rows import HitRows, RowTable, records


class Hits:
    """The results of one query, best first.

    ``scores`` are cosine similarity or inner product (higher is better) or Euclidean distance for
    ``l2`` (lower is better), computed exactly on the last prefix of ``dims``. ``metadata`` is a list of
    dicts (one per hit, empty when the query asked for none), built on first access from the Arrow table
    the query returned (``to_arrow`` uses that table directly).
    """

    __slots__ = ("ids", "scores", "dims", "_table", "_rows", "_metadata")

    def __init__(
        self,
        ids: list[str],
        scores: np.ndarray,
        metadata: list[dict[str, Any]] | pa.Table | HitRows | None = None,
        dims: tuple[int, ...] = (),
    ):
        self.ids = ids
        self.scores = scores
        self.dims = dims
        self._table = metadata if isinstance(metadata, pa.Table) else None
        self._rows = metadata if isinstance(metadata, HitRows) else None
        self._metadata = None if isinstance(metadata, (pa.Table, HitRows)) else list(metadata or [])

    @classmethod
    def of_rows(cls, table: RowTable, rows: np.ndarray, scores: np.ndarray, dims: tuple, metadata: bool) -> Hits:
        """One query's hits (its funnel's rows and scores, best first), with their ids and (when ``metadata``)
        metadata from ``table``, read when first asked for."""
        ids = table.take_ids(rows)
        if not metadata:
            return cls(ids, scores, None, dims)
        return cls(ids, scores, HitRows(table, rows) if table.has_metadata else [{} for _ in ids], dims)

    @property
    def metadata(self) -> list[dict[str, Any]]:
        if self._metadata is None:
            self._metadata = self._rows.records() if self._rows is not None else records(self._table, len(self.ids))
        return self._metadata

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[str, float, dict[str, Any]]]:
        meta = self.metadata or [{} for _ in self.ids]
        return iter(zip(self.ids, self.scores.tolist(), meta))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hits):
            return NotImplemented
        return (
            self.ids == other.ids
            and np.array_equal(self.scores, other.scores)
            and self.dims == other.dims
            and self.metadata == other.metadata
        )

    def to_arrow(self) -> pa.Table:
        cols: dict[str, Any] = {
            "id": pa.array(self.ids, pa.string()),
            "score": pa.array(np.asarray(self.scores, dtype=np.float64)),
        }
        if self._rows is not None:
            self._table, self._rows = self._rows.arrow(), None
        if self._table is not None and self._table.num_columns:
            for name in self._table.column_names:
                cols[name] = self._table.column(name)
            return pa.table(cols)
        names: dict[str, None] = {}
        for m in self.metadata:
            names.update(dict.fromkeys(m))
        for name in names:
            cols[name] = pa.array([m.get(name) for m in self.metadata])
        return pa.table(cols)

    def to_pandas(self) -> Any:  # a pandas.DataFrame (pandas is optional, so not named in the type)
        return self.to_arrow().to_pandas()

    def without(self, id: str, k: int) -> Hits:  # noqa: A002 - an entry's id
        """These hits less the one of entry ``id`` (if among them), at most ``k``."""
        keep = [i for i, hit in enumerate(self.ids) if hit != id][:k]
        if len(keep) == len(self.ids):
            return self
        at = np.asarray(keep, dtype=np.int64)
        meta: list[dict[str, Any]] | pa.Table | HitRows | None
        if self._rows is not None:
            meta = HitRows(self._rows.table, self._rows.rows[at])
        elif self._table is not None:
            meta = self._table.take(at)
        else:
            meta = [self._metadata[i] for i in keep] if self._metadata else None
        return Hits([self.ids[i] for i in keep], self.scores[at], meta, self.dims)

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{s:.4f}" for i, s in zip(self.ids[:5], self.scores[:5]))
        more = ", ..." if len(self.ids) > 5 else ""
        return f"Hits(n={len(self.ids)}, dims={list(self.dims)}, [{shown}{more}])"


class HitsBatch(list[Hits]):
    """The results of a batch of queries: one :class:`Hits` per query, in order (a list; slices and sums
    of batches are batches too)."""

    @classmethod
    def of_rows(
        cls, table: RowTable, rows: np.ndarray, offsets: np.ndarray, scores: np.ndarray, dims: tuple, metadata: bool
    ) -> HitsBatch:
        """The hits of a funnel's output (rows and scores of every query, split by ``offsets``), with their
        ids and (when ``metadata``) metadata from ``table``."""
        if len(offsets) == 2:
            return cls([Hits.of_rows(table, rows, scores, dims, metadata)])
        ids = table.take_ids(rows)
        meta_table = table.take_metadata(rows) if metadata else None
        out = []
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            meta: Any = []  # no metadata asked for
            if meta_table is not None:
                meta = meta_table.slice(a, b - a)
            elif metadata:  # asked for, but the store has no metadata columns
                meta = [{} for _ in range(b - a)]
            out.append(Hits(ids[a:b], scores[a:b], meta, dims))
        return cls(out)

    @overload
    def __getitem__(self, index: SupportsIndex) -> Hits: ...
    @overload
    def __getitem__(self, index: slice) -> HitsBatch: ...
    def __getitem__(self, index: SupportsIndex | slice) -> Hits | HitsBatch:
        if isinstance(index, slice):
            return HitsBatch(list.__getitem__(self, index))
        return list.__getitem__(self, index)

    def __add__(self, other: Any) -> HitsBatch:  # type: ignore[override]
        return HitsBatch(list.__add__(self, other))

    def to_arrow(self) -> pa.Table:
        """One table: query (its position), rank (from 1), id, score, then the metadata columns."""
        parts = []
        for qi, hits in enumerate(self):
            table = hits.to_arrow()
            n = table.num_rows
            table = table.add_column(0, "rank", pa.array(np.arange(1, n + 1, dtype=np.int64)))
            parts.append(table.add_column(0, "query", pa.array(np.full(n, qi, dtype=np.int64))))
        if not parts:
            return pa.table({"query": pa.array([], pa.int64()), "rank": pa.array([], pa.int64()),
                             "id": pa.array([], pa.string()), "score": pa.array([], pa.float64())})  # fmt: skip
        return pa.concat_tables(parts, promote_options="default")

    def to_pandas(self) -> Any:  # a pandas.DataFrame (pandas is optional, so not named in the type)
        return self.to_arrow().to_pandas()

    def __repr__(self) -> str:
        return f"HitsBatch({len(self)} queries: {list.__repr__(self[:2])[1:-1]}{', ...' if len(self) > 2 else ''})"


class Record(dict[str, Any]):
    """A dataclass that is also the dict it replaced: ``r.live``, and ``r["live"]``, ``json.dumps(r)``,
    ``r | {...}`` as before (the dict holds the fields' values as made)."""

    def __post_init__(self) -> None:
        dict.update(self, {f.name: getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class StoreInfo(Record):
    """``Store.info()``: creation parameters, state and the tuned settings."""

    path: str
    dim: int
    bands: tuple[int, ...]
    metric: str
    dtype: str
    index_dims: tuple[int, ...]
    chunk_rows: list[int]
    rows: int
    live: int
    deleted: int
    index_status: dict[int, str]
    encoder: str | None
    read_only: bool
    version: int | None
    tuned: dict[str, Any] | None
    # what shortlists read: "fitted" (codes fitted to the rows by tune) or "raw" (the vectors' own prefixes)
    prefixes: str = "raw"
    # a store on object storage: its reads so far (``requests``, ``bytes``, ``rounds``: batches of requests
    # waited for one after another, ``waves``: the same counted FETCH_THREADS requests at a time) and
    # ``local_dims``, the bands it downloaded whole
    remote: dict[str, int] | None = None


@dataclass(frozen=True, eq=False)
class TuneResult(Record):
    """``Store.tune()``: the fastest funnel that reached the target (``dims``, ``shortlist``, ``ef``,
    ``recall``, ``ms_per_query``, ``taper``), whether it shortlists on fitted codes (``prefixes``), what it
    was measured against, every funnel shape's own
    setting (``shapes``) and every point measured (``tried``). A setting reaches the target when
    ``recall_low``, a 95% lower confidence bound on the recall of new queries, does."""

    dims: list[int]
    shortlist: int
    ef: int
    recall: float
    ms_per_query: float
    taper: int
    k: int
    target: float
    sample: int
    exact_ms_per_query: float  # the batched reference pass, per query: below exact search timed alone
    shapes: dict[str, dict[str, Any]]
    tried: list[dict[str, Any]]
    recall_low: float | None = None  # None in settings tuned before the bound existed
    rows: int | None = None  # the store's committed and live rows when it was tuned (None before they were kept)
    live: int | None = None
    generation: int | None = None  # its row numbering then, and how it was asked for (the report reuses
    held_out: bool | None = None  # tune's points only when all of these match)
    seed: int | None = None
    sample_asked: int | None = None
    all_shapes: bool | None = None
    # "fitted": the funnels shortlist on codes fitted to the store's rows; "raw": on the vectors' own prefixes
    prefixes: str | None = None
    raw_settings: dict[str, Any] | None = None  # with fitted codes: what the raw prefixes measured (or None)
    fit_s: float | None = None  # seconds fitting codes and indexing those that beat raw prefixes (None: not tried)
    # per first prefix ("16"), how tuned shortlists grow with the store: by (live rows / live) ** exponent
    growth: dict[str, float] | None = None  # None before it was measured: exponent 1

    def __repr__(self) -> str:  # the choice; every point measured is in ``tried`` (printed whole: 10 kB)
        return (
            f"TuneResult(dims={self.dims}, shortlist={self.shortlist}, recall={self.recall:.3f}, "
            f"ms_per_query={self.ms_per_query:.3f}, prefixes={self.prefixes!r}, target={self.target}@{self.k}, "
            f"{len(self.shapes)} shapes, {len(self.tried)} points tried)"
        )


@dataclass(frozen=True, eq=False)
class CompactResult(Record):
    """``Store.compact()``: rows before and after (deleted rows are gone)."""

    rows_before: int
    rows_after: int


@dataclass
class Failure:
    """An input that could not be read: its position among the inputs, where it came from, why."""

    index: int
    source: str
    reason: str


@dataclass(repr=False)
class AddResult(Sequence[str]):
    """What an ``add`` did. As a sequence it is ``ids``: the id of each image it covered (added, replaced,
    or already present and skipped), in input order, an image given twice twice (the inputs left out with
    ``skip_errors=True`` have none). ``added``: the ids this call wrote (added or replaced); ``replaced``:
    those of them that replaced an entry already in the store (``on_conflict="replace"``, ``upsert``);
    ``skipped``: ids already in the store (``on_conflict="skip"``) or repeated within the call; ``failed``:
    the inputs left out, and why."""

    ids: list[str]
    added: list[str]
    skipped: list[str]
    failed: list[Failure]
    replaced: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        return self.ids[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AddResult):
            return (self.ids, self.added, self.skipped, self.failed, self.replaced) == (
                other.ids, other.added, other.skipped, other.failed, other.replaced)  # fmt: skip
        return isinstance(other, list) and self.ids == other

    def __repr__(self) -> str:
        return (
            f"AddResult({len(self.ids)} images: {len(self.added)} added"
            f"{f' ({len(self.replaced)} of them replaced)' if self.replaced else ''}, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed)"
        )
