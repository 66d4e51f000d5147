"""Statistics shared by the watermark schemes and the verification (``ipshield.watermark.verify``):
the result of one test (``TestResult``), the one-sided KS p-value, the Euclidean distance of unit
vectors from their cosine, the normal tail, and the permutation test of secret (image, text)
pairs (``pairing_test``). Pure functions of their arguments: no key, no model, no other ipshield
import."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class TestResult:
    name: str
    n: int
    delta_cos: float
    delta_l2: float
    ks_p: float
    p_value: float
    z: float
    test_mean_cos: float
    control_mean_cos: float
    in_decision: bool = True
    note: str = ""
    #: False for tests whose evidence is the same for every customer (procrustes, EmbMarker's
    #: cluster test): they can show that a suspect comes from the service, not whose account leaked
    customer_specific: bool = True
    #: the per-item cosines (for plots; left out of ``to_dict``)
    test_values: list | None = field(default=None, repr=False)
    control_values: list | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("test_values", None)
        d.pop("control_values", None)
        return d

    def with_values(self, test, control, max_control: int = 4000) -> "TestResult":
        self.test_values = [float(v) for v in test]
        ctrl = list(control)
        step = max(1, len(ctrl) // max_control)
        self.control_values = [float(v) for v in ctrl[::step]]
        return self


def ks_less(test: np.ndarray, control: np.ndarray) -> float:
    """One-sided two-sample KS p-value for "test values are larger than control values"."""
    from scipy.stats import ks_2samp

    if len(test) == 0 or len(control) == 0:
        return float("nan")
    return float(ks_2samp(test, control, alternative="less").pvalue)


def l2_from_cos(c: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between unit vectors from their cosine: ``sqrt(2 - 2 cos)``."""
    return (2 - 2 * c.clamp(-1, 1)).clamp_min(0).sqrt()


def norm_sf(z: float) -> float:
    """Upper tail of the standard normal at ``z`` (SciPy)."""
    from scipy.stats import norm

    return float(norm.sf(z))


def min_permutation_p(n: int) -> float:
    """Smallest p-value a permutation test over n pairs can give: 1/n!."""
    return math.exp(-math.lgamma(n + 1))


def pairing_test(cos: torch.Tensor, name: str = "trigger") -> TestResult:
    """Square cosine matrix ``cos[i, j]`` = suspect image i vs suspect text j, where (i, i) are the
    secret pairs. Permutation z-test (exact mean/variance), KS, delta-cos, delta-L2."""
    c = cos.double()
    n = c.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    pos, ctrl = c[eye], c[~eye]
    stat = float(pos.mean())
    grand = c.mean()
    d = c - c.mean(1, keepdim=True) - c.mean(0, keepdim=True) + grand
    var_sum = float((d ** 2).sum()) / max(n - 1, 1)  # Var(sum_i c[i, s(i)]) over random permutations s
    sd = math.sqrt(max(var_sum, 1e-300)) / n
    z = (stat - float(grand)) / sd if sd > 0 else 0.0
    p = max(norm_sf(z), min_permutation_p(n))
    return TestResult(name, n, float(pos.mean() - ctrl.mean()),
                      float(l2_from_cos(ctrl).mean() - l2_from_cos(pos).mean()),
                      ks_less(pos.numpy(), ctrl.numpy()), p, z, float(pos.mean()), float(ctrl.mean())
                      ).with_values(pos.tolist(), ctrl.tolist())


__all__ = ["TestResult", "ks_less", "l2_from_cos", "norm_sf", "min_permutation_p", "pairing_test"]
