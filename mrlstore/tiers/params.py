"""A store's configuration: validated once at creation, persisted in the manifest, checked on reopen."""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from mrlstore.errors import ConfigMismatchError, CorruptStoreError, InvalidInputError, InvalidKError, NotAStoreError
from mrlstore.scoring import METRICS

FORMAT_NAME = "mrlstore"
# 2 added vectors/row_norms (per-band squared norms); 1 (without it) is still read and written, and
# compact() rewrites a store at 2. mrlstore releases that know only 1 refuse 2, so they never append rows
# without their norms.
# 3 stores each band's chunks with Zarr's sharding codec (index first): chunk files grow with their rows
# instead of being created full-size; 1 and 2 (full-size sparse chunk files) are still read and written,
# and compact() rewrites them at 3.
# 4 drops DuckDB's unique index on _items.id (about 50 bytes a row, held by every writer); ids are found
# through the ids/ cache and checked by each write. mrlstore releases that know only 1-3 refuse 4, so they
# never write without that check; compact() rewrites older stores at 4.
FORMAT_VERSION = 4
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4)
BUNDLED_ENCODER = "bundled"
BUNDLED_ENCODER_DIM = 2048
# The 16-d and 32-d prefixes get an HNSW index by default. Measured on MRL-like vectors
# (benchmarks/results/build_params*.md): the 32-d index reaches recall@10 0.95 with a shortlist of about
# 100 where the 16-d one needs 500, so the tuned default starts at 32; the 16-d index keeps dims=[16, ...]
# (the paper's funnel) served. M is 16, except 8 for prefixes of at most 16 dims:
# - at 1M rows the 32-d index at M=16 reaches recall 0.985 with a shortlist of 200 in 0.38 ms, where M=8
#   needs 400 and 0.62 ms (build_params_1000000.md): the denser graph finds the 32-d neighbours with a
#   narrower beam, for a build 23% longer (43 s against 35 s);
# - on the 16-d prefix M=16 gains nothing (100k, shortlist 400: recall 0.965 in 0.51 ms against 0.961 in
#   0.47) and doubles the links: at 1M the store's memory went from 691 MiB (M=8 for both) to 813 (M=16 for
#   both).
# A 64-d index at M=8 wins at 100k (shortlist 50: recall 0.971 against 0.950) but its graph degrades at 1M
# (shortlist 200: 0.942 against 0.961 from 32-d).
DEFAULT_INDEX_DIMS = (16, 32)
DEFAULT_HNSW_M = 16
COARSE_HNSW_M = 8  # the default M of indexes over prefixes of at most COARSE_PREFIX dims
COARSE_PREFIX = 16
PREFIX_CHOICES = ("auto", "raw")
# 40, not hnswlib's usual 200: on 16-32-d prefixes the build takes a third of the time at the same
# shortlist recall (benchmarks/results/build_params.md; at 100k, 64 -> 40 cut the build of both indexes
# from 7.1 to 4.7 s while [32, 2048] shortlist 75 went from recall 0.978 to 0.976), and the first stage
# searches with a wide beam anyway.
DEFAULT_EF_CONSTRUCTION = 40
# Wider prefixes need a better-built graph: on compare.py's gentle generator at 1M rows, [128, 1024] with a
# shortlist of 100 finds 0.855 of the top 10 on a 128-d index built at 40 (0.934 at 400), and 0.994 built at
# 200 (benchmarks/results/compare_gentle.md: the tuned query went from 4.00 to 0.38 ms, the store's build
# from 147 to 543 s; hnswlib over all 1024 dims took 1,192 s).
WIDE_PREFIX, WIDE_EF_CONSTRUCTION = 32, 200
DEFAULT_EF_SEARCH = 64
# The manifest entries that say which prefixes are indexed and how (Store.set_index_dims changes them together).
INDEX_ENTRY_KEYS = ("index_dims", "hnsw_M_by_prefix", "hnsw_ef_construction_by_prefix")
# Manifest keys of the fields whose manifest spelling differs (kept: the on-disk format is fixed).
_MANIFEST_KEYS = {
    "hnsw_m": "hnsw_M", "hnsw_m_by_prefix": "hnsw_M_by_prefix", "ef_construction": "hnsw_ef_construction",
    "ef_construction_by_prefix": "hnsw_ef_construction_by_prefix", "ef_search": "hnsw_ef_search",
}  # fmt: skip


def positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidKError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def encoder_name(encoder: object | None, dim: int, dim_given: int | None) -> str | None:
    """What the manifest records about the encoder a store was created for: "bundled" for the installed
    bundled encoder, given or not (a store made with ``encoder=load_encoder()`` recorded its name, and then
    took no images without one passed), else the encoder's name."""
    if getattr(encoder, "bundled", False) is True:
        return BUNDLED_ENCODER
    if encoder is not None:
        return str(getattr(encoder, "name", type(encoder).__name__))
    return BUNDLED_ENCODER if dim_given is None and dim == BUNDLED_ENCODER_DIM else None


def default_bands(dim: int) -> tuple[int, ...]:
    return (*[b for b in (16, 64, 256) if b < dim], dim)


def default_index_dims(dim: int) -> tuple[int, ...]:
    return tuple(d for d in DEFAULT_INDEX_DIMS if d <= dim)


def checked_index_dims(given: Any, dim: int) -> tuple[int, ...]:
    """``given`` as sorted distinct prefix lengths within 1..dim; InvalidInputError otherwise."""
    try:
        dims = tuple(positive_int(d, "an indexed prefix length") for d in given)
    except (TypeError, InvalidKError):
        raise InvalidInputError(
            f"index_dims must be a sequence of prefix lengths within 1..{dim}, got {given!r}"
        ) from None
    if any(d > dim for d in dims) or len(set(dims)) != len(dims):
        raise InvalidInputError(f"index_dims must be distinct prefix lengths within 1..{dim}, got {dims}")
    return tuple(sorted(dims))


def coarse_m(index_dims: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((d, COARSE_HNSW_M) for d in sorted(index_dims) if d <= COARSE_PREFIX)


def wide_ef_construction(index_dims: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((d, WIDE_EF_CONSTRUCTION) for d in sorted(index_dims) if d > WIDE_PREFIX)


def band_widths(dim: int, bands: Sequence[int]) -> list[int]:
    edges = [0, *bands]
    return [edges[i + 1] - edges[i] for i in range(len(bands))]


@dataclass(frozen=True)
class StoreParams:
    """The creation parameters of a store (immutable once created)."""

    dim: int
    bands: tuple[int, ...]
    metric: str
    dtype: str
    index_dims: tuple[int, ...]
    chunk_rows: tuple[int, ...]  # one per band
    hnsw_m: int
    ef_construction: int
    ef_search: int
    encoder: str | None = None
    encoder_weights: str | None = None  # sha256 of the bundled encoder's weights the vectors came from
    # (prefix, M) for the indexes whose M is not hnsw_m: the coarse prefixes of a store made with the default
    hnsw_m_by_prefix: tuple[tuple[int, int], ...] = ()
    ef_construction_by_prefix: tuple[tuple[int, int], ...] = ()
    prefixes: str = "auto"  # "raw": tune never fits codes to the rows (see mrlstore.tiers.projection)
    # whether open() was given hnsw_m / ef_construction: then it applies to every index, also of prefixes
    # indexed later (a given value equal to the default was taken for none: new coarse prefixes got M=8)
    hnsw_m_given: bool = False
    ef_construction_given: bool = False

    def m_for(self, prefix: int) -> int:
        """The HNSW M of the index over the ``prefix``-d prefix."""
        return dict(self.hnsw_m_by_prefix).get(prefix, self.hnsw_m)

    def ef_construction_for(self, prefix: int) -> int:
        """The HNSW ef_construction of the index over the ``prefix``-d prefix."""
        return dict(self.ef_construction_by_prefix).get(prefix, self.ef_construction)

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def new(
        cls, requested: dict[str, Any], encoder: str | None, auto_chunk_rows: Any, encoder_weights: str | None = None
    ) -> StoreParams:
        """Validate the parameters of ``mrlstore.open`` for a new store (``None`` means the default);
        ``auto_chunk_rows(width, dtype)`` sizes chunks when ``chunk_rows`` is not given."""
        dim = int(requested["dim"])
        if dim <= 0:
            raise InvalidInputError(f"dim must be a positive integer, got {dim}")
        bands = tuple(int(b) for b in (requested["bands"] or default_bands(dim)))
        if not bands or bands[-1] != dim or any(b <= a for a, b in zip((0, *bands), bands)):
            raise InvalidInputError(f"bands must be increasing band ends finishing at dim={dim}, got {bands}")
        metric = requested["metric"] or "cosine"
        if metric not in METRICS:
            raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}")
        dtype = requested["dtype"] or "float16"
        if dtype not in ("float16", "float32"):
            raise InvalidInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        given = requested["index_dims"]
        index_dims = checked_index_dims(given, dim) if given is not None else default_index_dims(dim)
        widths = band_widths(dim, bands)
        rows = requested["chunk_rows"]
        chunk_rows = (
            (positive_int(rows, "chunk_rows"),) * len(widths)
            if rows is not None
            else tuple(auto_chunk_rows(w, dtype) for w in widths)
        )
        return cls(
            dim=dim,
            bands=bands,
            metric=metric,
            dtype=dtype,
            index_dims=index_dims,
            chunk_rows=chunk_rows,
            hnsw_m=int(requested["hnsw_m"] or DEFAULT_HNSW_M),
            hnsw_m_by_prefix=() if requested["hnsw_m"] else coarse_m(index_dims),
            ef_construction=int(requested["ef_construction"] or DEFAULT_EF_CONSTRUCTION),
            ef_construction_by_prefix=() if requested["ef_construction"] else wide_ef_construction(index_dims),
            ef_search=DEFAULT_EF_SEARCH,
            encoder=encoder,
            encoder_weights=encoder_weights,
            prefixes=_prefixes(requested.get("prefixes")),
            hnsw_m_given=requested["hnsw_m"] is not None,
            ef_construction_given=requested["ef_construction"] is not None,
        )

    def with_index_dims(self, index_dims: Sequence[int]) -> StoreParams:
        """These parameters with other indexed prefixes (``Store.set_index_dims``). Prefixes kept keep their
        M and ef_construction; new ones get a new store's, unless this store was made with its own
        ``hnsw_m`` or ``ef_construction`` (then that one)."""
        dims = checked_index_dims(index_dims, self.dim)
        new = [d for d in dims if d not in self.index_dims]
        m = {d: v for d, v in self.hnsw_m_by_prefix if d in dims}
        ef = {d: v for d, v in self.ef_construction_by_prefix if d in dims}
        if not self.hnsw_m_given:
            m |= dict(coarse_m(new))
        if not self.ef_construction_given:
            ef |= dict(wide_ef_construction(new))
        by_m, by_ef = tuple(sorted(m.items())), tuple(sorted(ef.items()))
        return replace(self, index_dims=dims, hnsw_m_by_prefix=by_m, ef_construction_by_prefix=by_ef)

    def index_entries(self) -> dict[str, Any]:
        """The manifest entries that say which prefixes are indexed and how (INDEX_ENTRY_KEYS)."""
        values = (
            list(self.index_dims),
            {str(d): v for d, v in self.hnsw_m_by_prefix},
            {str(d): v for d, v in self.ef_construction_by_prefix},
        )
        return dict(zip(INDEX_ENTRY_KEYS, values))

    def manifest(self, created_by: str) -> dict[str, Any]:
        """The manifest a new store starts with (storage/FORMAT.md)."""
        out: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[_MANIFEST_KEYS.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        out |= self.index_entries()  # the prefix maps as JSON objects: prefix -> M or ef_construction
        out["committed_rows"] = 0
        out["created_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        out["created_by"] = created_by
        out["store_id"] = uuid.uuid4().hex  # tells this store from others (object storage refuses a mix-up)
        return out

    # -- reopening ---------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, m: dict[str, Any], where: object) -> StoreParams:
        if m.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{where} holds a DuckDB file that is not an mrlstore catalog")
        if m.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise CorruptStoreError(
                f"{where} has format version {m.get('format_version')}; this mrlstore reads "
                f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}"
            )
        try:
            optional = ("encoder", "encoder_weights", "hnsw_m_by_prefix", "ef_construction_by_prefix", "prefixes",
                        "hnsw_m_given", "ef_construction_given")  # fmt: skip
            values = {f.name: m[_MANIFEST_KEYS.get(f.name, f.name)] for f in fields(cls) if f.name not in optional}
        except KeyError as e:
            raise CorruptStoreError(f"{where} has a manifest without {e}") from None
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(
            **values,
            encoder=m.get("encoder"),
            encoder_weights=m.get("encoder_weights"),
            hnsw_m_by_prefix=_by_prefix(m, "hnsw_M_by_prefix"),
            ef_construction_by_prefix=_by_prefix(m, "hnsw_ef_construction_by_prefix"),
            prefixes=m.get("prefixes", "auto"),
            # stores made before these were kept: a value other than the default was given
            hnsw_m_given=bool(m.get("hnsw_m_given", values["hnsw_m"] != DEFAULT_HNSW_M)),
            ef_construction_given=bool(
                m.get("ef_construction_given", values["ef_construction"] != DEFAULT_EF_CONSTRUCTION)
            ),
        )

    def check_requested(self, requested: dict[str, Any], where: object) -> None:
        """Raise ConfigMismatchError when a parameter given to ``open`` differs from the stored one."""
        for key, value in requested.items():
            if value is None:
                continue
            stored = getattr(self, key)
            if key == "chunk_rows" and set(stored) == {value}:
                continue  # one size for every band, as given at creation
            if key == "index_dims" and tuple(sorted(value)) == stored:
                continue  # kept sorted
            per_prefix = {"hnsw_m": self.hnsw_m_by_prefix, "ef_construction": self.ef_construction_by_prefix}
            if value == stored and per_prefix.get(key):  # some indexes were built with another value
                name = _MANIFEST_KEYS[key + "_by_prefix"]
                raise ConfigMismatchError(
                    f"{where} was created without {_MANIFEST_KEYS[key]} given: its indexes use {name}="
                    f"{dict(per_prefix[key])} (and {stored} elsewhere), not {value} for every index"
                )
            if value != stored:
                name = _MANIFEST_KEYS.get(key, key)
                raise ConfigMismatchError(f"{where} was created with {name}={stored!r}, not {value!r}")


def _by_prefix(manifest: dict[str, Any], key: str) -> tuple[tuple[int, int], ...]:
    """A manifest's optional object from prefix length to a value (absent in older stores: none)."""
    return tuple(sorted((int(d), int(v)) for d, v in (manifest.get(key) or {}).items()))


def _prefixes(value: Any) -> str:
    if value is None:
        return "auto"
    if value not in PREFIX_CHOICES:
        raise InvalidInputError(f"prefixes must be one of {PREFIX_CHOICES}, got {value!r}")
    return str(value)
