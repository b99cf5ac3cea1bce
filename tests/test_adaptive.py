"""The adaptive classifier on synthetic MRL-like data: early exits at small prefixes, accuracy kept."""

from __future__ import annotations

import numpy as np
import pytest
from adaptive import AdaptiveClassifier

import mrlstore
from mrlstore.testing import mrl_like


def test_adaptive_stops_early_and_keeps_accuracy():
    x, y = mrl_like(3000, 256, n_clusters=8, noise=1.5, seed=3)
    xt, yt = mrl_like(1000, 256, n_clusters=8, noise=1.5, seed=3, sample=1)
    clf = AdaptiveClassifier(nesting=(8, 16, 32, 64, 128, 256), epochs=15).fit(x, y)
    labels, used = clf.predict(xt)
    full = clf.predict_fixed(xt, 256)
    assert labels.shape == used.shape == (1000,)
    assert set(np.unique(used)) <= {8, 16, 32, 64, 128, 256}
    assert used.mean() < 128  # most items exit early
    assert (labels == yt).mean() >= (full == yt).mean() - 0.03
    assert clf.thresholds_[-1] == 0.0


def test_labels_of_any_type_and_errors():
    x, y = mrl_like(400, 32, n_clusters=3, seed=1)
    names = np.array(["cat", "dog", "eel"])[y]
    clf = AdaptiveClassifier(nesting=(8, 32), epochs=5).fit(x, names)
    assert set(clf.predict(x)[0]) <= {"cat", "dog", "eel"}
    with pytest.raises(mrlstore.ShapeError):
        AdaptiveClassifier(nesting=(8, 64)).fit(x, y)
    with pytest.raises(mrlstore.InvalidInputError):
        AdaptiveClassifier().predict(x)


def test_set_tolerance_trades_accuracy_for_shorter_prefixes():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 64)) * np.linspace(2.0, 0.2, 64)
    y = rng.integers(0, 4, 4000)
    x = (centres[y] + rng.standard_normal((4000, 64))).astype(np.float32)
    clf = AdaptiveClassifier(nesting=(4, 16, 64), epochs=10).fit(x[:3000], y[:3000])
    strict = clf.predict(x[3000:])[1].mean()
    loose = clf.set_tolerance(0.05).predict(x[3000:])[1].mean()
    assert loose <= strict and clf.tolerance == 0.05
