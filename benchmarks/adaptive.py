"""Adaptive classification over Matryoshka prefixes (Kusupati et al., 2022, section 4.2.1), in numpy.

One linear softmax head per nesting size m on the (re-normalised) first m numbers; one confidence
threshold per size, learned on a held-out split (maximum softmax probability); prediction walks the sizes
from small to large and stops at the first whose confidence reaches its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mrlstore.errors import InvalidInputError, ShapeError
from mrlstore.scoring import normalize_prefix


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_softmax(x: np.ndarray, y: np.ndarray, classes: int, epochs: int, lr: float, l2: float, seed: int):
    """Multinomial logistic regression by minibatch Adam (features are unit-norm, so a scale is learned)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    w = np.zeros((d, classes), np.float32)
    b = np.zeros(classes, np.float32)
    params = [w, b]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    onehot = np.eye(classes, dtype=np.float32)[y]
    step, batch = 0, 512
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch):
            idx = order[lo : lo + batch]
            xb = x[idx]
            err = (_softmax(xb @ w + b) - onehot[idx]) / len(idx)
            grads = [xb.T @ err + l2 * w, err.sum(axis=0)]
            step += 1
            for p, g, a, v in zip(params, grads, m1, m2):
                a *= 0.9
                a += 0.1 * g
                v *= 0.999
                v += 0.001 * g * g
                p -= lr * (a / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return w, b


@dataclass
class AdaptiveClassifier:
    """Nested linear heads with learned per-size confidence thresholds.

    ``fit(X, y)`` trains the heads on most of the data and learns the thresholds on a held-out share;
    ``predict(X)`` returns the labels and the prefix length each item used.
    """

    nesting: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    holdout: float = 0.1
    tolerance: float = 0.0
    epochs: int = 30
    seed: int = 0
    classes_: np.ndarray = field(default_factory=lambda: np.empty(0))
    heads_: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    thresholds_: np.ndarray = field(default_factory=lambda: np.empty(0))
    _hold: tuple[list[np.ndarray], np.ndarray] = field(default=((), np.empty(0)), init=False, repr=False)

    def fit(self, embeddings: np.ndarray, labels: Sequence) -> AdaptiveClassifier:
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] < max(self.nesting):
            raise ShapeError(f"embeddings must be (n, >= {max(self.nesting)}), got {x.shape}")
        self.classes_, y = np.unique(np.asarray(labels), return_inverse=True)
        if len(self.classes_) < 2:
            raise InvalidInputError("an adaptive classifier needs at least two classes")
        order = np.random.default_rng(self.seed).permutation(len(x))
        n_hold = max(1, int(len(x) * self.holdout))
        hold, train = order[:n_hold], order[n_hold:]
        self.heads_ = [
            _fit_softmax(
                normalize_prefix(x[train], m), y[train], len(self.classes_), self.epochs, 0.01, 1e-5, self.seed
            )
            for m in self.nesting
        ]
        self._hold = (self._probabilities(x[hold]), y[hold])
        self.thresholds_ = self._learn_thresholds(*self._hold)
        return self

    def set_tolerance(self, tolerance: float) -> AdaptiveClassifier:
        """Re-learn the thresholds for another accuracy ``tolerance`` (same heads, same held-out split):
        a larger tolerance stops earlier, trading accuracy for shorter prefixes."""
        if not self.heads_:
            raise InvalidInputError("fit the classifier before setting its tolerance")
        self.tolerance = tolerance
        self.thresholds_ = self._learn_thresholds(*self._hold)
        return self

    def _probabilities(self, x: np.ndarray) -> list[np.ndarray]:
        return [_softmax(normalize_prefix(x, m) @ w + b) for m, (w, b) in zip(self.nesting, self.heads_)]

    def _learn_thresholds(self, probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
        """Per size, the lowest confidence at which its answers are (on the held-out split) as accurate as
        the largest head's answers for the same items, less ``tolerance``; the largest size takes all."""
        full_right = probs[-1].argmax(1) == y
        thresholds = np.ones(len(self.nesting))
        thresholds[-1] = 0.0
        grid = np.linspace(0.0, 1.0, 201)
        for i, p in enumerate(probs[:-1]):
            conf, right = p.max(1), p.argmax(1) == y
            for t in grid:
                sel = conf >= t
                if sel.sum() >= 5 and right[sel].mean() >= full_right[sel].mean() - self.tolerance:
                    thresholds[i] = t
                    break
        return thresholds

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, prefix length used) for every row."""
        if not self.heads_:
            raise InvalidInputError("fit the classifier before predicting")
        x = np.asarray(embeddings, dtype=np.float32)
        n = len(x)
        labels = np.empty(n, dtype=np.int64)
        used = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        for i, (m, (w, b)) in enumerate(zip(self.nesting, self.heads_)):
            if not len(todo):
                break
            p = _softmax(normalize_prefix(x[todo], m) @ w + b)
            done = p.max(1) >= self.thresholds_[i]
            labels[todo[done]] = p[done].argmax(1)
            used[todo[done]] = m
            todo = todo[~done]
        return self.classes_[labels], used

    def predict_fixed(self, embeddings: np.ndarray, m: int) -> np.ndarray:
        """Labels from the head of one nesting size (e.g. the full 2048-d head), for comparison."""
        w, b = self.heads_[self.nesting.index(m)]
        return self.classes_[(normalize_prefix(np.asarray(embeddings, np.float32), m) @ w + b).argmax(1)]
