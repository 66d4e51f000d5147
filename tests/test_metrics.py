"""Metrics against independent computations (plain loops, scipy)."""

import math

import numpy as np
import pytest
from scipy import stats

from ipshield import metrics as M


def test_accuracy_matches_loop():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 10, 500)
    labels = rng.integers(0, 10, 500)
    loop = sum(int(p == l) for p, l in zip(pred, labels)) / len(labels) * 100
    assert M.accuracy(pred, labels) == pytest.approx(loop)
    assert math.isnan(M.accuracy([], []))
    with pytest.raises(ValueError):
        M.accuracy([1, 2], [1])


def test_drops_and_st_d():
    assert M.drop_a(90.0, 89.0) == pytest.approx(1.0)
    assert M.drop_u(80.0, 10.0) == pytest.approx(70.0)
    assert M.st_d(1.0, 70.0) == pytest.approx(1 / 70)
    assert M.st_d(-0.3, 75.0) == pytest.approx(-0.004)
    # undefined, never a huge number
    assert M.st_d(1.0, 0.0) is None
    assert M.st_d(1.0, -5.0) is None
    assert M.st_d(float("nan"), 5.0) is None


def test_directions_declared():
    assert M.drop_a.higher_is_better is False
    assert M.drop_u.higher_is_better is True
    assert M.st_d.higher_is_better is False
    assert M.gap.higher_is_better is True
    assert M.chance_normalised.higher_is_better is False
    assert M.balanced_score.higher_is_better is True


def test_balance_metrics_against_scipy():
    before_a, after_a = 95.0, 93.0
    before_u, after_u = [80.0, 70.0], [12.0, 9.0]
    n = 10
    r = min(max(after_a / before_a, 0), 1)
    s = np.mean([min(max((b - a) / (b - 10.0), 0), 1) for b, a in zip(before_u, after_u)])
    assert M.balanced_score(before_a, after_a, before_u, after_u, n) == pytest.approx(stats.hmean([r, s]))
    assert M.gap(after_a, after_u) == pytest.approx(after_a - np.mean(after_u))
    assert M.chance_normalised(after_u, n) == pytest.approx(np.mean(after_u) / 10.0)
    # an unprotected model (no suppression) scores 0; a perfect one scores 1
    assert M.balanced_score(95, 95, [80], [80], n) == 0.0
    assert M.balanced_score(95, 95, [80], [10], n) == pytest.approx(1.0)
    # the unauthorized domain already at chance: nothing to suppress
    assert M.suppression(9.0, 9.0, n) == 0.0


def test_summarize_restriction():
    before = {"a": 95.0, "b": 80.0, "c": 60.0}
    after = {"a": 94.0, "b": 10.0, "c": 12.0}
    s = M.summarize_restriction(before, after, "a", 10)
    assert s["drop_a"] == pytest.approx(1.0)
    assert s["drop_u"] == {"b": pytest.approx(70.0), "c": pytest.approx(48.0)}
    assert s["st_d"] == pytest.approx(1.0 / 59.0)
    assert s["acc_u_after_mean"] == pytest.approx(11.0)
    assert 0 < s["balanced_score"] <= 1
    with pytest.raises(KeyError):
        M.summarize_restriction(before, after, "zzz", 10)
