"""Metrics of ../shared/specs/metrics.md, as small pure functions with a declared direction.

Accuracies are top-1 in percent. "Before" is the unprotected reference, "after" the protected
model, on the same test images. ST-D is MAP's metric; ``gap``, ``chance_normalised`` and
``balanced_score`` are ipshield's own balance metrics (the IP-CLIP paper's three balance metrics
could not be obtained): they are NOT the paper's.

Every function carries ``higher_is_better`` (True, False, or None when neither), read by reports.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np


def _direction(higher: bool | None) -> Callable:
    def deco(fn: Callable) -> Callable:
        fn.higher_is_better = higher  # type: ignore[attr-defined]
        return fn

    return deco


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@_direction(None)
def accuracy(pred: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Top-1 accuracy in percent (higher is better for the authorized domain, lower for the unauthorized)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred {pred.shape} and labels {labels.shape} differ in shape")
    if pred.size == 0:
        return float("nan")
    return float((pred == labels).mean() * 100.0)


@_direction(False)
def drop_a(before: float, after: float) -> float:
    """Drop_a = Acc_a(before) - Acc_a(after): source drop in points; lower is better, negative = improved."""
    return float(before - after)


@_direction(True)
def drop_u(before: float, after: float) -> float:
    """Drop_u = Acc_u(before) - Acc_u(after): target drop in points; higher is better."""
    return float(before - after)


def drop(before: float, after: float) -> float:
    """Acc(before) - Acc(after) in points (direction depends on the domain; see drop_a / drop_u)."""
    return float(before - after)


@_direction(False)
def st_d(drop_a_: float, drop_u_: float) -> float | None:
    """ST-D (MAP) = Drop_a / Drop_u; lower is better. Undefined (None) when Drop_u <= 0, never a huge number."""
    if not (_finite(drop_a_) and _finite(drop_u_)) or drop_u_ <= 0:
        return None
    return float(drop_a_ / drop_u_)


@_direction(True)
def gap(acc_a_after: float, acc_u_after: Sequence[float]) -> float:
    """[ipshield] Acc_a(after) - mean Acc_u(after), in points; higher is better."""
    return float(acc_a_after - float(np.mean(acc_u_after)))


@_direction(False)
def chance_normalised(acc_u_after: Sequence[float], n_classes: int) -> float:
    """[ipshield] mean Acc_u(after) / (100 / n_classes): 1.0 = chance; lower is better (down to chance)."""
    if n_classes < 2:
        raise ValueError("n_classes must be at least 2")
    return float(np.mean(acc_u_after) / (100.0 / n_classes))


@_direction(True)
def retention(acc_a_before: float, acc_a_after: float) -> float:
    """[ipshield] Acc_a(after) / Acc_a(before), clipped to [0, 1]; higher is better."""
    if acc_a_before <= 0:
        return 0.0
    return float(np.clip(acc_a_after / acc_a_before, 0.0, 1.0))


@_direction(True)
def suppression(acc_u_before: float, acc_u_after: float, n_classes: int) -> float:
    """[ipshield] Drop_u / (Acc_u(before) - chance), clipped to [0, 1]: 1 = pushed to chance; higher is better.

    0 when the unprotected model was already at or below chance on that domain (nothing to suppress).
    """
    headroom = acc_u_before - 100.0 / n_classes
    if headroom <= 0:
        return 0.0
    return float(np.clip((acc_u_before - acc_u_after) / headroom, 0.0, 1.0))


@_direction(True)
def balanced_score(acc_a_before: float, acc_a_after: float, acc_u_before: Sequence[float],
                   acc_u_after: Sequence[float], n_classes: int) -> float:
    """[ipshield] harmonic mean of retention and mean suppression, in [0, 1]; high only when the
    authorized domain is kept AND the unauthorized domains collapse."""
    r = retention(acc_a_before, acc_a_after)
    s = float(np.mean([suppression(b, a, n_classes) for b, a in zip(acc_u_before, acc_u_after)]))
    if r + s == 0:
        return 0.0
    return float(2 * r * s / (r + s))


def summarize_restriction(before: Mapping[str, float], after: Mapping[str, float], authorized: str,
                          n_classes: int, unauthorized: Sequence[str] | None = None) -> dict:
    """All domain-restriction metrics for one run.

    ``before``/``after``: accuracy (percent) per domain name. ``unauthorized`` defaults to every
    domain other than ``authorized`` present in both mappings.
    """
    if authorized not in before or authorized not in after:
        raise KeyError(f"authorized domain '{authorized}' missing from the accuracies")
    unauth = list(unauthorized) if unauthorized is not None else [d for d in after if d != authorized and d in before]
    out: dict = {
        "acc_a_before": before[authorized],
        "acc_a_after": after[authorized],
        "drop_a": drop_a(before[authorized], after[authorized]),
        "n_classes": n_classes,
        "chance": 100.0 / n_classes,
    }
    if unauth:
        ub = [before[d] for d in unauth]
        ua = [after[d] for d in unauth]
        du = {d: drop_u(before[d], after[d]) for d in unauth}
        out.update(
            {
                "acc_u_before": dict(zip(unauth, ub)),
                "acc_u_after": dict(zip(unauth, ua)),
                "acc_u_after_mean": float(np.mean(ua)),
                "drop_u": du,
                "drop_u_mean": float(np.mean(list(du.values()))),
                "st_d": st_d(out["drop_a"], float(np.mean(list(du.values())))),
                "st_d_per_domain": {d: st_d(out["drop_a"], v) for d, v in du.items()},
                "gap": gap(after[authorized], ua),
                "chance_normalised": chance_normalised(ua, n_classes),
                "retention": retention(before[authorized], after[authorized]),
                "suppression": float(np.mean([suppression(b, a, n_classes) for b, a in zip(ub, ua)])),
                "balanced_score": balanced_score(before[authorized], after[authorized], ub, ua, n_classes),
            }
        )
    return out


#: name -> direction, for reports
DIRECTIONS = {
    "acc_a_after": True,
    "acc_u_after_mean": False,
    "drop_a": False,
    "drop_u_mean": True,
    "st_d": False,
    "gap": True,
    "chance_normalised": False,
    "retention": True,
    "suppression": True,
    "balanced_score": True,
}
