"""Fitted codes: a store's short codes fitted to its own rows, for the coarse indexes.

A raw k-prefix is only as good as the encoder's training made it; on photos or embeddings it never saw, the
top k principal directions of the store's own vectors keep full-dimension neighbourhoods far better (the
bundled encoder on caltech101-ood: mAP@10 0.750 for the raw 16-prefix, 0.836 for the fitted 16-d code,
0.907 at 2048 dims). Where the largest spread is what separates groups rather than what orders a row's near
neighbours, directions fitted to neighbour differences keep more; a fit measures both and their blend on
held-out sample rows, and for cosine stores also the best of them trained to rank neighbours as the full
vectors do (benchmarks/results/fitted_codes_coverage.md: on CIFAR-10's vectors an exact 16-number shortlist
of 100 then holds 0.896 of the full top 10, against 0.869 for the raw prefix), and keeps the best. The code
of a vector is its centred projection on the directions,

    cosine: (x/|x| - mean) @ basis[:, :k]     ip and l2: (x - mean) @ basis[:, :k]

compared as cosine (cosine stores), inner product or L2, like the raw prefixes: the index ranks by the
code, every later stage re-ranks with the stored vectors. Nothing stored changes; the projection lives in
the catalog's manifest (entry ``fit``), so it commits, publishes and survives compaction with the tuned
settings that chose it.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrlstore.errors import CorruptStoreError
from mrlstore.kernels import project, sum_squares
from mrlstore.scoring import normalize_prefix

FIT_FORMAT = 1
FIT_SAMPLE_ROWS = 20_000  # rows the directions are estimated from: beyond this they barely move
FIT_OVERSAMPLE, FIT_PASSES = 16, 12  # subspace iteration: extra directions carried, passes
BLENDS = (1.0, 0.5, 0.25, 0.0)  # candidate weights of the rows' spread against their neighbour differences
NEIGHBOURS, ANCHOR_ROWS = 10, 1000  # near neighbours of this many sample rows give the differences
PROBE_ROWS = 1000  # held-out sample rows that judge the candidates
# A candidate is judged on how much of a probe's exact top 10 among the store's rows its codes keep in a
# shortlist 5 times longer (at most a tenth of the rows), scaled to the sample (a store 5x the sample: top 2
# in a shortlist of 10).
JUDGE_TOP, JUDGE_SHORTLIST_RATIO = 10, 5
# Codes whose length keeps fewer than this share of held-out neighbours more than the raw prefix get no index:
# they would not shorten a shortlist by enough to pay for building and holding one.
MIN_GAIN = 0.01
# Fewer rows than this many per code number and a fit is noise: a tiny store keeps its raw prefixes.
FIT_MIN_ROWS_PER_DIM = 2
FIT_MIN_ROWS = 100
INDEX_SPACE = {"cosine": "cosine", "ip": "ip", "l2": "l2"}  # the metric an index over the codes uses
# Training (cosine stores): the best candidate's directions and origin refined by Adam so that each code
# length's cosine ranks like the full vectors: cross-entropy between a softmax of an anchor's full
# similarities to the training rows and a softmax of its codes' similarities to them.
# The directions move within TRAIN_SPAN directions of the largest spread and neighbour differences (with
# the start's own), so that a step costs TRAIN_SPAN numbers per row instead of the vectors' dimension.
TRAIN_ROWS, TRAIN_ANCHORS, TRAIN_BATCH, TRAIN_STEPS, TRAIN_SPAN = 6000, 4096, 256, 100, 256
TRAIN_RATE, TRAIN_FULL_TEMP, TRAIN_CODE_TEMP = 1e-3, 0.02, 0.04


@dataclass(frozen=True)
class Projection:
    """``width`` fitted directions of a ``dim``-d store; ``codes`` of any ``k <= width`` numbers."""

    metric: str
    mean: np.ndarray  # (dim,) float32
    basis: np.ndarray  # (dim, width) float32, strongest first (orthonormal columns unless trained)
    blend: float = 1.0  # weight of the rows' spread against their neighbour differences (1: principal axes)
    trained: int = 0  # steps of training that refined the directions (0: the blend's own)
    # The code lengths worth an index: those whose codes kept more held-out neighbours than the raw prefix of
    # the same length (see beats_raw_at); None: every length (unjudged, or fitted before lengths were judged)
    coded: tuple[int, ...] | None = None
    # Shares of held-out sample rows' neighbours the codes and the raw prefixes kept when fitted, and how many
    # neighbours were judged (None: unjudged)
    judged: tuple[float, float, int] | None = field(default=None, compare=False)
    _maps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def width(self) -> int:
        return int(self.basis.shape[1])

    @property
    def fit_id(self) -> str:
        """Names this projection: index files built with another one are stale."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.metric.encode())
        h.update(self.mean.tobytes())
        h.update(self.basis.tobytes())
        return h.hexdigest()

    @property
    def space(self) -> str:
        return INDEX_SPACE[self.metric]

    @classmethod
    def fit(
        cls,
        sample: np.ndarray,
        width: int,
        metric: str,
        seed: int = 0,
        judge_at: tuple[int, ...] = (),
        store_rows: int | None = None,
    ) -> Projection:
        """``width`` directions fitted to ``sample`` (rows as stored), prepared as the metric compares them.

        Candidates weigh the rows' own spread (principal directions) against the differences between rows and
        their nearest neighbours (the directions a shortlist must resolve): top variance alone favours what
        separates groups and can drop what orders a row's near neighbours. The fit keeps the candidate whose
        codes of each length in ``judge_at`` (default ``width``) keep most of held-out sample rows' exact
        neighbours (see JUDGE_TOP; ``store_rows``: the rows the sample stands for, default its own); on a
        tie, plain principal directions. ``judged`` records the share it kept and the raw prefixes' share,
        ``coded`` the lengths whose codes beat the raw prefix of their length."""
        x = _prepared(np.asarray(sample, dtype=np.float32), metric)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        rng = np.random.default_rng(seed)
        probes, anchors = _split(len(x), rng)
        near = _neighbour_differences(x, anchors, metric)
        blends = BLENDS if near is not None and len(probes) else BLENDS[:1]
        spread, differences = _second_moment(x - mean), None if near is None else _second_moment(near)
        fits = [cls(metric, mean, _directions(spread, differences, b, width, rng), b) for b in blends]
        if len(fits) == 1:
            return fits[0]
        lengths = tuple(k for k in judge_at if k <= width) or (width,)
        raw = cls(metric, np.zeros_like(mean), np.eye(x.shape[1], width, dtype=np.float32))  # the raw prefixes
        judge = _Judge(x, probes, fits[0].space, store_rows or len(x), lengths)
        held = [judge.shares(c) for c in fits]
        first = int(np.argmax([np.mean(h) for h in held]))
        best, best_held = fits[first], held[first]
        if metric == "cosine":
            span = _span(best.basis, spread if differences is None else spread + differences, rng)
            trained = _trained(best, span, x, np.setdiff1d(np.arange(len(x)), probes), lengths, rng)
            trained_held = judge.shares(trained)
            if np.mean(trained_held) > np.mean(best_held):
                best, best_held = trained, trained_held
        raw_held = judge.shares(raw)
        coded = tuple(k for k, s, r in zip(lengths, best_held, raw_held) if beats_raw_at(s, r, judge.judged))
        judged = (float(np.mean(best_held)), float(np.mean(raw_held)), judge.judged)
        return cls(metric, best.mean, best.basis, best.blend, best.trained, coded, judged)

    @property
    def beats_raw(self) -> bool:
        """Whether codes of some length are worth an index (True when unjudged)."""
        return self.coded is None or bool(self.coded)

    def codes_at(self, lengths: tuple[int, ...]) -> tuple[int, ...]:
        """Which of a store's code ``lengths`` are worth an index (see ``coded``)."""
        return tuple(k for k in lengths if self.coded is None or k in self.coded)

    def shares(
        self, x: np.ndarray, probes: np.ndarray, truth: np.ndarray, lengths: tuple[int, ...], shortlist: int
    ) -> list[float]:
        """For each code length in ``lengths``, the share of ``truth`` (rows' exact top lists) that
        ``probes``' top ``shortlist`` by their codes hold among the prepared rows ``x``."""
        # x is prepared already (codes() would prepare it again); centring after the product spares a copy of x
        all_codes = x @ self.basis - self.mean @ self.basis
        all_queries = self.query_codes(x[probes], self.width)
        shares = []
        for k in lengths:
            codes, queries = all_codes[:, :k], all_queries[:, :k]
            if self.metric == "cosine":
                codes, queries = normalize_prefix(codes, k), normalize_prefix(queries, k)
            scores = _scores(queries, codes, self.space)
            scores[np.arange(len(probes)), probes] = -np.inf
            shares.append(float(np.mean(_in_shortlist(scores, truth, min(shortlist, scores.shape[1] - 1)))))
        return shares

    def codes(self, x: np.ndarray, k: int | None = None) -> np.ndarray:
        """The ``k``-number codes (default all ``width``) of stored rows ``x``, float32."""
        basis = self.basis if k is None else self.basis[:, :k]
        return np.ascontiguousarray((_prepared(x, self.metric) - self.mean) @ basis, dtype=np.float32)

    def query_codes(self, q: np.ndarray, k: int) -> np.ndarray:
        """Queries' ``k``-number codes, float32: centred like the rows', except for inner product, where the
        mean's part of a score is the same for every row. One matrix-vector product for a single query."""
        x = np.atleast_2d(np.asarray(q, dtype=np.float32))
        rows_t, shift = self._query_map(k)
        if len(x) == 1:  # native calls: after a pause each numpy call costs tens of microseconds (cold caches)
            energy = sum_squares(x[0]) if self.metric == "cosine" else 0.0
            return project(x[0], rows_t, shift, 1 / math.sqrt(energy) if energy > 0 else 1.0)[None]
        codes = _prepared(x, self.metric) @ rows_t.T
        return np.ascontiguousarray(codes - shift, dtype=np.float32)

    def _query_map(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` directions as contiguous rows, and the mean's codes to subtract (made once)."""
        cached = self._maps.get(k)
        if cached is None:
            rows_t = np.ascontiguousarray(self.basis[:, :k].T)
            shift = np.zeros(k, np.float32) if self.metric == "ip" else (self.mean @ self.basis[:, :k])
            cached = self._maps[k] = (rows_t, shift.astype(np.float32))
        return cached

    # -- persistence (the manifest's ``fit`` entry) -------------------------------------------------
    def to_manifest(self) -> dict[str, Any]:
        return {
            "format": FIT_FORMAT,
            "metric": self.metric,
            "dim": int(self.basis.shape[0]),
            "width": self.width,
            "id": self.fit_id,
            "mean": base64.b64encode(self.mean.astype("<f4").tobytes()).decode(),
            "basis": base64.b64encode(self.basis.astype("<f4").tobytes()).decode(),
            "blend": self.blend,
            "trained": self.trained,
            "coded": None if self.coded is None else list(self.coded),
        }

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], dim: int) -> Projection:
        try:
            if entry["format"] != FIT_FORMAT or entry["dim"] != dim:
                raise ValueError(f"format {entry['format']}, dim {entry['dim']}")
            width = int(entry["width"])
            mean = np.frombuffer(base64.b64decode(entry["mean"]), dtype="<f4").astype(np.float32)
            basis = np.frombuffer(base64.b64decode(entry["basis"]), dtype="<f4").astype(np.float32)
            blend = float(entry.get("blend", 1.0))  # fits made before blends were principal axes
            trained = int(entry.get("trained", 0))  # nor trained
            coded = entry.get("coded")  # absent: fitted before lengths were judged, every length indexed
            coded = None if coded is None else tuple(int(k) for k in coded)
            out = cls(str(entry["metric"]), mean.reshape(dim), basis.reshape(dim, width), blend, trained, coded)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptStoreError(f"the store's fitted projection is unreadable: {e}") from None
        if out.fit_id != entry.get("id"):
            raise CorruptStoreError("the store's fitted projection does not match its checksum")
        return out


def fit_width(index_dims: tuple[int, ...], dim: int) -> int:
    """The code numbers a fit needs: the longest indexed prefix shorter than the vectors (0: none)."""
    return max((d for d in index_dims if d < dim), default=0)


def beats_raw_at(share: float, raw_share: float, judged: int) -> bool:
    """Whether codes that kept ``share`` of ``judged`` held-out neighbours beat a raw prefix that kept
    ``raw_share`` by more than twice the judgement's standard error and by MIN_GAIN: on a tie the raw prefix's
    index exists already."""
    return share - raw_share > max(MIN_GAIN, 2.0 * np.sqrt(max(share * (1.0 - share), 1e-4) / judged))


def can_fit(live_rows: int, width: int) -> bool:
    """Whether a store this size has enough rows for a fit worth its cost."""
    return width > 0 and live_rows >= max(FIT_MIN_ROWS, FIT_MIN_ROWS_PER_DIM * width)


def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    """Rows as the metric compares them: unit length for cosine (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return normalize_prefix(x, x.shape[1]) if metric == "cosine" else x


def _split(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample rows that judge the candidates, and other rows whose neighbour differences fit them."""
    order = rng.permutation(rows)
    judges = min(PROBE_ROWS, rows // 5)
    return np.sort(order[:judges]), np.sort(order[judges : judges + ANCHOR_ROWS])


def _scores(a: np.ndarray, b: np.ndarray, space: str) -> np.ndarray:
    """Similarity of every row of ``a`` to every row of ``b`` (higher is nearer), rows prepared."""
    if space == "l2":
        return 2.0 * (a @ b.T) - np.einsum("ij,ij->i", b, b)[None, :]
    return a @ b.T


def _top(scores: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` best columns, its own (``own``) excluded; in no particular order."""
    scores[np.arange(len(own)), own] = -np.inf
    k = min(k, scores.shape[1] - 1)
    if k == 1:  # a big store's sample judges each probe's nearest row: argmax is a few times faster
        return scores.argmax(axis=1)[:, None]
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _in_shortlist(scores: np.ndarray, truth: np.ndarray, cut: int) -> np.ndarray:
    """Whether each of ``truth``'s columns scores among its row's ``cut`` best (ties in): fewer than ``cut``
    columns score higher. Counting beats a partition where ``truth`` has few columns (a big store's judge)."""
    wanted = np.take_along_axis(scores, truth, axis=1)
    if truth.shape[1] > 2:
        last = np.partition(scores, scores.shape[1] - cut, axis=1)[:, scores.shape[1] - cut]  # shortlist's worst
        return wanted >= last[:, None]
    return np.stack([(scores > wanted[:, [j]]).sum(axis=1) < cut for j in range(truth.shape[1])], axis=1)


class _Judge:
    """Judges candidates on how much of held-out ``probes``' exact neighbours among the prepared rows ``x``
    their codes keep (see JUDGE_TOP), averaged over code ``lengths``; the truth is found once."""

    def __init__(self, x: np.ndarray, probes: np.ndarray, space: str, store_rows: int, lengths: tuple[int, ...]):
        self.x, self.probes, self.lengths = x, probes, lengths
        self.top = max(1, round(JUDGE_TOP * len(x) / max(store_rows, len(x))))
        self.truth = _top(_scores(x[probes], x, space), probes, self.top)
        self.judged = int(self.truth.size)

    def held(self, candidate: Projection) -> float:
        """The share of the probes' neighbours ``candidate``'s codes keep, averaged over the code lengths."""
        return float(np.mean(self.shares(candidate)))

    def shares(self, candidate: Projection) -> list[float]:
        """``held`` for each code length."""
        return candidate.shares(self.x, self.probes, self.truth, self.lengths, self.shortlist)

    @property
    def shortlist(self) -> int:
        """JUDGE_SHORTLIST_RATIO times the top, but at most a tenth of the rows: in a tiny store a shortlist of
        half its rows holds every neighbour whatever the codes, and the judge could not tell them apart."""
        return max(self.top, min(self.top * JUDGE_SHORTLIST_RATIO, len(self.x) // 10))


def _span(basis: np.ndarray, moments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal columns spanning ``basis`` and about TRAIN_SPAN top directions of ``moments`` (two passes
    of subspace iteration: a rough span is enough to train in)."""
    extra = max(0, min(TRAIN_SPAN, moments.shape[0]) - basis.shape[1])
    if extra == 0:
        return np.linalg.qr(basis)[0].astype(np.float32)
    space = moments @ rng.standard_normal((moments.shape[0], extra)).astype(np.float32)
    space = moments @ np.linalg.qr(space)[0]
    return np.linalg.qr(np.concatenate([basis, space], axis=1))[0].astype(np.float32)


def _trained(
    start: Projection,
    span: np.ndarray,
    x: np.ndarray,
    rows: np.ndarray,
    lengths: tuple[int, ...],
    rng: np.random.Generator,
) -> Projection:
    """``start``'s directions (within ``span``'s columns) and origin refined by TRAIN_STEPS steps of Adam
    (see TRAIN_ROWS) on ``rows`` of the prepared (unit) rows ``x``: a linear code whose cosine orders near
    neighbours as the full vectors do, where principal directions keep the most variance."""
    train = x[rng.choice(rows, size=min(TRAIN_ROWS, len(rows)), replace=False)]
    centred = (train - start.mean) @ span
    anchors = rng.choice(len(train), size=min(TRAIN_ANCHORS, len(train) - 1), replace=False)
    full = train[anchors] @ train.T
    full[np.arange(len(anchors)), anchors] = -np.inf
    target = _softmax(full / TRAIN_FULL_TEMP)
    del full
    basis, shift = span.T @ start.basis, np.zeros(start.width, np.float32)  # codes: centred @ basis + shift
    adam = [(np.zeros_like(basis), np.zeros_like(basis)), (np.zeros_like(shift), np.zeros_like(shift))]
    for step in range(1, TRAIN_STEPS + 1):
        batch = rng.choice(len(anchors), size=min(TRAIN_BATCH, len(anchors)), replace=False)
        grad = _code_gradient(centred @ basis + shift, anchors[batch], target[batch], lengths)
        for value, g, (moment, square) in zip((basis, shift), (centred.T @ grad, grad.sum(axis=0)), adam):
            moment *= 0.9
            moment += 0.1 * g
            square *= 0.999
            square += 0.001 * g * g
            value -= TRAIN_RATE * (moment / (1 - 0.9**step)) / (np.sqrt(square / (1 - 0.999**step)) + 1e-8)
    basis = np.ascontiguousarray(span @ basis, dtype=np.float32)
    mean = start.mean - shift @ np.linalg.pinv(basis)  # the shift folded into the origin: (x - mean) @ basis
    return Projection(start.metric, mean.astype(np.float32), basis, start.blend, TRAIN_STEPS)


def _code_gradient(codes: np.ndarray, anchors: np.ndarray, target: np.ndarray, lengths: tuple[int, ...]) -> np.ndarray:
    """The gradient, with respect to every row's codes, of the cross-entropy between ``target`` (each
    anchor's distribution over the rows) and the softmax of the anchor's code cosine to every row, averaged
    over anchors and code lengths."""
    out = np.zeros_like(codes)
    batch = np.arange(len(anchors))
    for k in lengths:
        norms = np.linalg.norm(codes[:, :k], axis=1, keepdims=True) + 1e-12
        unit = codes[:, :k] / norms
        logits = unit[anchors] @ unit.T / TRAIN_CODE_TEMP
        logits[batch, anchors] = -np.inf
        grad = _softmax(logits) - target
        grad /= len(anchors) * len(lengths) * TRAIN_CODE_TEMP
        d_unit = grad.T @ unit[anchors]
        d_unit[anchors] += grad @ unit
        out[:, :k] += (d_unit - unit * np.einsum("ij,ij->i", unit, d_unit)[:, None]) / norms
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _neighbour_differences(x: np.ndarray, anchors: np.ndarray, metric: str) -> np.ndarray | None:
    """Differences between ``anchors`` and each of their nearest rows in ``x`` (None: too few rows)."""
    k = min(NEIGHBOURS, len(x) // 20)
    if k < 1 or len(anchors) < 2:
        return None
    out = []
    for lo in range(0, len(anchors), 512):
        block = anchors[lo : lo + 512]
        near = _top(_scores(x[block], x, INDEX_SPACE[metric]), block, k)
        out.append((x[block][:, None, :] - x[near]).reshape(-1, x.shape[1]))
    return np.concatenate(out)


def _second_moment(rows: np.ndarray) -> np.ndarray:
    """``rows.T @ rows`` scaled to unit trace (dim x dim, float32): computed once, a candidate's iteration
    then costs dim x dim products instead of passes over the sample."""
    moment = rows.T @ rows
    return moment / max(float(np.trace(moment)), 1e-30)


def _directions(
    spread: np.ndarray, differences: np.ndarray | None, blend: float, width: int, rng: np.random.Generator
) -> np.ndarray:
    """The top ``width`` eigenvectors of blend * spread + (1 - blend) * differences by subspace iteration
    (only the few directions needed, where a full eigendecomposition of the dim x dim matrix costs more)."""
    matrix = spread if differences is None or blend == 1.0 else blend * spread + (1.0 - blend) * differences
    rank = min(width + FIT_OVERSAMPLE, matrix.shape[1])
    space = np.linalg.qr(rng.standard_normal((matrix.shape[1], rank)).astype(np.float32))[0]
    for _ in range(FIT_PASSES):
        space = np.linalg.qr(matrix @ space)[0]
    small = space.T.astype(np.float64) @ (matrix @ space).astype(np.float64)  # the small problem, in that subspace
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    basis = space.astype(np.float64) @ vectors[:, np.argsort(values)[::-1][:width]]
    basis *= np.where(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])] < 0, -1.0, 1.0)
    return np.ascontiguousarray(basis, dtype=np.float32)
