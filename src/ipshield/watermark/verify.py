"""Verification: is a suspect embedding model a copy of our watermarked service, and whose?

Python API (the service's verification endpoint builds on this)::

    from ipshield.watermark.verify import Suspect, verify, identify_customer
    suspect = Suspect(f, g)                    # f(images [B,3,H,W] in [0,1]) -> [B,D]; g(list[str]) -> [N,D]
    # or Suspect.from_embedder(obj) (embed_images/embed_texts), Suspect.from_model_dir("student/")
    report = verify(wm, suspect, clean_adapter, probes, customer_id="acme", max_queries=512)
    report.verdict        # "stolen" | "not-detected" | "inconclusive"
    report.p_value        # combined p-value (Bonferroni over the tests in the decision)
    report.queries        # {"images": .., "texts": .., "total": .., "budget": ..}
    report.to_dict()      # JSON-safe; holds no key, matrix, trigger image or trigger text
    who = identify_customer(wm, suspect, clean_adapter, probes, customers=[...])  # one query round

``probes`` is a ``ReferenceSample`` of ordinary inputs (not secret). ``clean_adapter`` is the
owner's unwatermarked CLIP (or any embedder giving the clean embeddings).

The tests [ours], each reporting delta-cos, a real delta-L2 (mean Euclidean distance between unit
vectors, control minus test, so positive = closer) and a one-sided two-sample KS p-value (SciPy):

- ``trigger``: the suspect embeds the trigger images and the trigger texts; test = cosines of the
  customer's secret pairs, control = every unpaired (image, text) combination. Its decision p-value
  is a *permutation* test: under "not derived from our service" the secret pairing is a uniformly
  random permutation unknown to the suspect, so the mean paired cosine is compared with its exact
  permutation mean and variance (Hoeffding's combinatorial CLT, normal tail), floored at the exact
  minimum ``1/n!``. Invariant to any rotation or permutation the thief applies to both modalities.
- ``distribution``: the suspect embeds ordinary probes (images and texts); they are mapped back
  with ``W_k^-1``, centred per modality, and compared with the clean model's embeddings of the same
  probes (per-probe cosine). Control: the same with random orthogonal matrices in place of
  ``W_k``. Decision p-value by *key randomisation*: ``W_k`` is a random draw the suspect cannot
  know, so the mean cosine under ``W_k`` is compared with its distribution under 100 random
  orthogonal matrices (normal tail).
- ``covariance`` [ours]: rotation- and permutation-invariant and key-specific. ``W_k`` is only
  near-orthogonal: it carries a key-derived symmetric signature, ``W_k W_k^T ~ W W^T_pre + 2 s S_k``,
  which a thief's own rotation ``R`` cannot remove. The suspect's linear map ``A`` from the clean
  embeddings (ridge least squares on the probes) gives ``A A^T ~ W_k W_k^T`` for any ``R``.
  Statistic: the projection of ``A A^T - W W^T_pre`` (traceless, outside the protected span) on
  the key-derived Gaussian matrix behind ``S_k``, divided by its norm: exactly standard normal
  when the suspect does not come from customer k (the matrix is an independent draw from the key),
  so the p-value is exact.
- ``permutation`` [ours]: invariant to the thief's permutation of the coordinates, with or without
  sign flips, and key-specific. VLPMarker: the distribution test after undoing the signed
  permutation that best matches the suspect's coordinates to the service's frame
  ``e polar(W_k)`` (``match_coordinates``: Hungarian assignment on partially whitened coordinate
  correlations); key randomisation against the same matching with 100 random orthogonal matrices.
  EmbMarker (``aligned_trigger_test``): the trigger test after a key-free match of the suspect's
  coordinates to the clean model's. A general rotation is not undone.
- ``procrustes``: the distribution test after an orthogonal Procrustes alignment (fit on half of
  the probes, measured on the other half), which undoes a thief's rotation or permutation. It is
  not key-specific (the alignment absorbs ``W_k``) and innocent models trained on similar data
  align too, so its KS p-value is descriptive; it enters the decision only through a calibration on
  innocent models (``calibrate``): p = normal tail of its statistic against the innocent models'.

Decision: ``p_value = min(1, m * min_i p_i)`` over the m tests in the decision (Bonferroni); the
verdict is "stolen" when ``p_value <= threshold`` (``alpha``, default 1e-6, or lower when a
calibration on innocent models asks for it), "not-detected" otherwise, and "inconclusive" when the
suspect misbehaves (wrong size, non-finite, zero vectors) or a test could not run. A budget too
small to ever reach ``alpha`` is an error before any query is spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ipshield.errors import IPShieldError
from ipshield.watermark.base import CleanEncoder, ReferenceSample
from ipshield.watermark.stats import (TestResult, ks_less, l2_from_cos, min_permutation_p, norm_sf,  # noqa: F401
                                      pairing_test)

N_NULL_ROTATIONS = 100
NULL_SEED = 20231109


class SuspectError(IPShieldError):
    """The suspect returned something unusable (wrong size, non-finite values)."""


class BudgetError(IPShieldError):
    """The query budget cannot reach the requested confidence."""


# ------------------------------------------------------------------------------ suspects
class Suspect:
    """A black-box suspect: ``embed_images(images) -> [B, D]`` and ``embed_texts(texts) -> [N, D]``
    (any callables returning tensors or arrays). Every answer is checked (one row per input, the
    same size D throughout, finite, non-zero) and counted (``images_queried``, ``texts_queried``)."""

    def __init__(self, embed_images: Callable[[torch.Tensor], Any], embed_texts: Callable[[list[str]], Any],
                 name: str = "suspect", batch_size: int = 64, expected_dim: int | None = None):
        self._f = embed_images
        self._g = embed_texts
        self.name = name
        self.batch_size = batch_size
        self.dim: int | None = expected_dim
        self.images_queried = 0
        self.texts_queried = 0

    @classmethod
    def from_embedder(cls, obj, name: str | None = None, **kw) -> "Suspect":
        return cls(obj.embed_images, obj.embed_texts, name=name or type(obj).__name__, **kw)

    @classmethod
    def from_model_dir(cls, path: str | Path, name: str | None = None, **kw) -> "Suspect":
        """A local suspect: a CLIP folder (e.g. a student written by ``ipshield attack extract``)."""
        from ipshield.models.clip import load_clip

        return cls.from_embedder(CleanEncoder(load_clip(path)), name=name or Path(path).name, **kw)

    @property
    def queries(self) -> int:
        return self.images_queried + self.texts_queried

    def __repr__(self) -> str:
        return f"Suspect({self.name!r}, queries={self.queries})"

    def _check(self, out: Any, n: int, what: str) -> torch.Tensor:
        try:
            t = torch.as_tensor(np.asarray(out, dtype=np.float32) if not isinstance(out, torch.Tensor) else out)
        except (TypeError, ValueError):
            raise SuspectError(f"the suspect's {what} answer is not a numeric array", "it must return [N, D] numbers") from None
        t = t.detach().float().cpu()
        if t.ndim != 2 or t.shape[0] != n:
            raise SuspectError(f"the suspect returned {what} embeddings of shape {tuple(t.shape)} for {n} inputs",
                               "it must return one D-dimensional vector per input ([N, D])")
        if self.dim is None:
            self.dim = int(t.shape[1])
        elif t.shape[1] != self.dim:
            raise SuspectError(f"the suspect returned {what} embeddings of size {t.shape[1]}, expected {self.dim}",
                               "a suspect must return vectors of one size, the size of the service's embeddings")
        if not torch.isfinite(t).all():
            raise SuspectError(f"the suspect returned non-finite values (NaN or inf) in its {what} embeddings",
                               "check the suspect; its answers cannot be used as evidence")
        if (t.norm(dim=-1) < 1e-12).any():
            raise SuspectError(f"the suspect returned all-zero {what} embeddings", "check the suspect")
        return t

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size]
            self.images_queried += len(x)
            out.append(self._check(self._f(x), len(x), "image"))
        return torch.cat(out)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            x = texts[i:i + self.batch_size]
            self.texts_queried += len(x)
            out.append(self._check(self._g(x), len(x), "text"))
        return torch.cat(out)


def as_suspect(obj) -> Suspect:
    if isinstance(obj, Suspect):
        return obj
    if isinstance(obj, (str, Path)):
        return Suspect.from_model_dir(obj)
    if hasattr(obj, "embed_images") and hasattr(obj, "embed_texts"):
        return Suspect.from_embedder(obj)
    if isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj):
        return Suspect(obj[0], obj[1])
    raise IPShieldError("cannot use this object as a suspect",
                        "give a Suspect, a CLIP folder, an object with embed_images/embed_texts, or (f, g) callables")


def as_clean(obj):
    if hasattr(obj, "embed_images") and hasattr(obj, "embed_texts"):
        return obj
    return CleanEncoder(obj)


# ------------------------------------------------------------------------------ statistics
# TestResult, the KS / normal tails and the pairing test live in ipshield.watermark.stats (shared
# with the schemes); imported at the top and re-exported from here.


def _centre_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x - x.mean(0, keepdim=True), dim=-1)


def _per_probe_cos(s: torch.Tensor, e: torch.Tensor, n_img: int) -> torch.Tensor:
    """Per-probe cosine between mapped suspect rows and clean rows, centred per modality (the first
    ``n_img`` rows are images, the rest texts)."""
    parts = []
    for sl in (slice(0, n_img), slice(n_img, None)):
        if s[sl].shape[0]:
            parts.append((_centre_rows(s[sl]) * _centre_rows(e[sl])).sum(-1))
    return torch.cat(parts)


def null_rotations(dim: int, n: int = N_NULL_ROTATIONS) -> torch.Tensor:
    from ipshield.watermark.keys import orthogonal_from_seed

    import hashlib

    return torch.stack([orthogonal_from_seed(hashlib.sha256(f"null/{NULL_SEED}/{i}".encode()).digest(), dim) for i in range(n)])


_NULL_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def _nulls(dim: int, n: int) -> torch.Tensor:
    if (dim, n) not in _NULL_CACHE:
        _NULL_CACHE[(dim, n)] = null_rotations(dim, n)
    return _NULL_CACHE[(dim, n)]


def _null_draws(cos_fn: Callable[[torch.Tensor], torch.Tensor], dim: int, n_null: int) -> dict:
    """A key-randomisation null: the per-probe cosines ``cos_fn(R)`` for ``n_null`` fixed random
    orthogonal matrices ``R`` (their means, and a thinned pool of the values for the KS test)."""
    means, pool = [], []
    for r in _nulls(dim, n_null):
        c = cos_fn(r.double())
        means.append(float(c.mean()))
        pool.append(c[:: max(1, len(c) // 32)])
    return {"means": np.asarray(means), "pool": torch.cat(pool)}


def _key_randomisation_result(name: str, c: torch.Tensor, nulls: dict, note: str = "") -> TestResult:
    """The mean per-probe cosine under the customer's key against its null draws (normal tail)."""
    nm = nulls["means"]
    sd = float(nm.std(ddof=1)) or 1e-12
    z = (float(c.mean()) - float(nm.mean())) / sd
    ctrl = nulls["pool"]
    return TestResult(name, len(c), float(c.mean() - ctrl.mean()),
                      float(l2_from_cos(ctrl).mean() - l2_from_cos(c).mean()),
                      ks_less(c.numpy(), ctrl.numpy()), norm_sf(z), z, float(c.mean()), float(ctrl.mean()), note=note
                      ).with_values(c.tolist(), ctrl.tolist())


def distribution_test(s: torch.Tensor, e: torch.Tensor, n_img: int, w_inv: torch.Tensor,
                      n_null: int = N_NULL_ROTATIONS) -> TestResult:
    """Suspect rows ``s`` mapped back by ``w_inv`` vs the clean rows ``e`` (key-randomisation test)."""
    s, e = s.double(), e.double()
    c = _per_probe_cos(s @ w_inv.double(), e, n_img)
    nulls = _null_draws(lambda r: _per_probe_cos(s @ r.T, e, n_img), s.shape[1], n_null)
    return _key_randomisation_result("distribution", c, nulls)


def _centre_modalities(x: torch.Tensor, n_img: int) -> torch.Tensor:
    x = x.double()
    x = torch.cat([x[:n_img] - x[:n_img].mean(0), x[n_img:] - x[n_img:].mean(0)])
    return F.normalize(x, dim=-1)


def _traceless_gram(m: torch.Tensor) -> torch.Tensor:
    """``m m^T`` scaled to unit mean diagonal, minus the identity (the part no rotation changes and
    no scale explains)."""
    g = m @ m.T
    g = g / g.diagonal().mean().clamp_min(1e-12)
    return g - torch.eye(g.shape[0], dtype=g.dtype)


def suspect_map(s: torch.Tensor, e: torch.Tensor, n_img: int, ridge: float = 0.01) -> torch.Tensor:
    """The linear map ``A`` with ``e A ~ s`` (ridge least squares on the probes, both centred per
    modality and normalised). For a copy of the service rotated by the thief, ``A ~ W_k R``, so
    ``A A^T ~ W_k W_k^T`` whatever ``R`` is."""
    ec, sc = _centre_modalities(e, n_img), _centre_modalities(s, n_img)
    d = ec.shape[1]
    return torch.linalg.solve(ec.T @ ec + ridge * torch.eye(d, dtype=ec.dtype), ec.T @ sc)


def covariance_test(s: torch.Tensor, e: torch.Tensor, template: dict[str, torch.Tensor], n_img: int | None = None,
                    ridge: float = 1e-3) -> TestResult:
    """Rotation- and permutation-invariant and key-specific (VLPMarker's signature). Fit the
    suspect's linear map ``A`` from the clean embeddings (``suspect_map``); its Gram matrix
    ``G = A A^T`` does not change under any orthogonal transform the thief applies to both
    modalities, and for a copy of customer k's service ``G ~ W_k W_k^T``, which holds
    ``2 * signature * S_k`` on top of the customer's pre-signature ``W W^T``. Statistic:
    ``z = <P, A_k> / ||P||_F`` with ``P`` the symmetric ``Q (G - W W^T_pre) Q`` (traceless parts)
    and ``A_k`` the key-derived iid N(0, 1) matrix whose symmetric part is ``S_k``. ``A_k`` is
    derived from the key independently of everything in ``P`` unless the suspect comes from
    customer k's service, so under "not derived from it" ``z`` is exactly standard normal: an exact
    key-randomisation p-value, no fitted null."""
    n_img = len(s) // 2 if n_img is None else n_img
    q = template["proj"].double()
    g = _traceless_gram(suspect_map(s.double(), e.double(), n_img, ridge))
    base = template["base_gram"].double()
    base = base / base.diagonal().mean() - torch.eye(base.shape[0], dtype=torch.float64)
    p = q @ (g - base) @ q
    p = (p + p.T) / 2
    a = template["a"].double()
    norm = float(p.norm())
    z = float((p * a).sum()) / max(norm, 1e-12)
    # descriptive cosines: P against the customer's signature direction and against 32 directions
    # of the same law (the decision uses the exact normal null above)
    sym = q @ ((a + a.T) / 2) @ q
    c = float((p * sym).sum() / (norm * float(sym.norm())) if norm > 0 else 0.0)
    gen = torch.Generator().manual_seed(NULL_SEED)
    ctrl = []
    for _ in range(32):
        r = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        r = q @ ((r + r.T) / 2) @ q
        ctrl.append(float((p * r).sum() / max(norm * float(r.norm()), 1e-12)))
    ctrl_t = torch.tensor(ctrl, dtype=torch.float64)
    return TestResult("covariance", len(s), c - float(ctrl_t.mean()),
                      float(l2_from_cos(ctrl_t).mean() - l2_from_cos(torch.tensor([c])).mean()),
                      float("nan"), norm_sf(z), z, c, float(ctrl_t.mean()),
                      note=f"exact key-randomisation null (standard normal); linear map fit on {len(s)} probes"
                      ).with_values([c], ctrl)


#: coordinate matching: the probes' coordinates are partially whitened (covariance to the power
#: -MATCH_POWER, eigenvalues floored at MATCH_FLOOR times the largest) before their correlations
#: are compared; chosen on the benchmark's 6000-pair student (recovers 56 % of a random signed
#: permutation instead of 46 % unwhitened)
MATCH_POWER = 0.25
MATCH_FLOOR = 1e-2


def _partially_whitened(x: torch.Tensor) -> torch.Tensor:
    c = x.T @ x / max(len(x), 1)
    ev, u = torch.linalg.eigh(c)
    ev = ev.clamp_min(MATCH_FLOOR * float(ev.max().clamp_min(1e-300)))
    return x @ u @ torch.diag(ev ** -MATCH_POWER) @ u.T


def _matching_columns(x: torch.Tensor, n_img: int) -> torch.Tensor:
    """Probe coordinates as ``match_coordinates`` compares them: centred per modality, partially
    whitened, centred again and scaled to unit columns."""
    a = _partially_whitened(_centre_modalities(x, n_img))
    return F.normalize(a - a.mean(0), dim=0)


def match_coordinates(s: torch.Tensor, y: torch.Tensor, n_img: int, s_columns: torch.Tensor | None = None) -> torch.Tensor:
    """The signed permutation matrix ``M`` with ``s M ~ y``: each coordinate of the suspect's probe
    embeddings ``s`` is matched to one coordinate of ``y`` (both centred per modality and partially
    whitened) by the Hungarian assignment on the absolute correlations over the probes (SciPy's
    ``linear_sum_assignment``); the sign is the correlation's. Undoes a thief's permutation of the
    coordinates, with or without sign flips. ``s_columns``: ``_matching_columns(s, n_img)`` when
    the caller matches the same suspect many times."""
    from scipy.optimize import linear_sum_assignment

    a = _matching_columns(s, n_img) if s_columns is None else s_columns
    corr = a.T @ _matching_columns(y, n_img)
    rows, cols = linear_sum_assignment(-corr.abs().numpy())
    m = torch.zeros_like(corr)
    m[rows, cols] = torch.sign(corr[rows, cols]) + (corr[rows, cols] == 0).to(corr.dtype)
    return m


def polar_factor(w: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to ``w`` (``U V^T`` of its SVD)."""
    u, _, vt = torch.linalg.svd(w.double())
    return u @ vt


def _permutation_cos(s: torch.Tensor, e: torch.Tensor, n_img: int, q: torch.Tensor,
                     s_columns: torch.Tensor | None = None) -> torch.Tensor:
    """Per-probe cosines of the suspect mapped back through orthogonal ``q`` after undoing the
    signed permutation that best matches it to ``e q``."""
    m = match_coordinates(s, F.normalize(e @ q, dim=-1), n_img, s_columns)
    return _per_probe_cos(s @ m @ q.T, e, n_img)


def permutation_nulls(s: torch.Tensor, e: torch.Tensor, n_img: int, n_null: int = N_NULL_ROTATIONS) -> dict:
    """The permutation test's statistic under ``n_null`` random orthogonal matrices (it does not
    depend on the customer: compute once per suspect)."""
    s, e = s.double(), e.double()
    cols = _matching_columns(s, n_img)  # the suspect's side of every matching, computed once
    return _null_draws(lambda r: _permutation_cos(s, e, n_img, r, cols), s.shape[1], n_null)


def permutation_test(s: torch.Tensor, e: torch.Tensor, n_img: int, w: torch.Tensor, nulls: dict | None = None) -> TestResult:
    """Key-specific and invariant to the thief's permutation of the coordinates (with or without
    sign flips) [ours]: the distribution test after undoing the signed permutation that best matches
    the suspect's coordinates to those of the service's frame ``e polar(W_k)`` (``match_coordinates``).
    A permutation, unlike a general rotation, cannot absorb ``W_k``: for any other orthogonal matrix
    the best signed permutation matches poorly. Decision p-value by key randomisation, as for the
    distribution test, against the same statistic under 100 random orthogonal matrices. With a
    protected span ``W_k = M_k W0`` where ``M_k`` does not depend on the Haar-random start ``W0``, so
    ``polar(W_k) = polar(M_k) W0`` is itself Haar-random: under "not derived from customer k" the
    statistic has exactly the law of the null draws."""
    s, e = s.double(), e.double()
    nulls = nulls or permutation_nulls(s, e, n_img)
    c = _permutation_cos(s, e, n_img, polar_factor(w))
    return _key_randomisation_result("permutation", c, nulls, note=f"key randomisation against {len(nulls['means'])}"
                                     " random orthogonal matrices, after a signed-permutation match")


def procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q minimising ||a Q - b||_F."""
    u, _, vt = torch.linalg.svd(a.double().T @ b.double())
    return u @ vt


def procrustes_test(s: torch.Tensor, e: torch.Tensor, n_img: int, w_inv: torch.Tensor | None = None,
                    calibration: dict | None = None) -> TestResult:
    """Distribution test after an orthogonal Procrustes alignment fit on the even-indexed probes and
    measured on the odd ones. Control: the same alignment applied to mismatched probes."""
    s, e = s.double(), e.double()
    if w_inv is not None:
        s = s @ w_inv.double()
    # centre per modality with all probes, then fit on even rows
    sc = torch.cat([s[:n_img] - s[:n_img].mean(0), s[n_img:] - s[n_img:].mean(0)])
    ec = torch.cat([e[:n_img] - e[:n_img].mean(0), e[n_img:] - e[n_img:].mean(0)])
    sc, ec = F.normalize(sc, dim=-1), F.normalize(ec, dim=-1)
    idx = torch.arange(len(s))
    fit, ev = idx[idx % 2 == 0], idx[idx % 2 == 1]
    q = procrustes(sc[fit], ec[fit])
    a = sc[ev] @ q
    c = (a * ec[ev]).sum(-1)
    ctrl = (a * ec[ev].roll(1, 0)).sum(-1)
    stat = float(c.mean())
    note = "descriptive (not key-specific); in the decision only with a calibration on innocent models"
    in_decision, p, z = False, float("nan"), float("nan")
    if calibration and calibration.get("procrustes_mean") is not None and calibration.get("procrustes_sd"):
        z = (stat - calibration["procrustes_mean"]) / calibration["procrustes_sd"]
        p = norm_sf(z)
        in_decision = True
        note = f"p from the calibration on {calibration.get('n_innocent', '?')} innocent models"
    return TestResult("procrustes", len(c), float(c.mean() - ctrl.mean()),
                      float(l2_from_cos(ctrl).mean() - l2_from_cos(c).mean()),
                      ks_less(c.numpy(), ctrl.numpy()), p, z, stat, float(ctrl.mean()), in_decision, note,
                      customer_specific=False).with_values(c.tolist(), ctrl.tolist())


# ------------------------------------------------------------------------------ reports
@dataclass
class VerificationReport:
    scheme: str
    customer_id: str | None
    verdict: str
    p_value: float
    threshold: float
    tests: dict[str, TestResult] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    ranking: list[dict] = field(default_factory=list)
    suspect: str = "suspect"

    @property
    def stolen(self) -> bool:
        return self.verdict == "stolen"

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "tests"}
        d["tests"] = {k: t.to_dict() for k, t in self.tests.items()}
        return d

    def summary(self) -> str:
        parts = [f"{self.verdict} (p={self.p_value:.3g}, threshold={self.threshold:.3g}, customer={self.customer_id},"
                 f" queries={self.queries.get('total')})"]
        for t in self.tests.values():
            parts.append(f"  {t.name}: delta_cos={t.delta_cos:+.4f} delta_l2={t.delta_l2:+.4f} ks_p={t.ks_p:.3g}"
                         f" p={t.p_value:.3g}{'' if t.in_decision else ' (not in decision)'}")
        parts += [f"  note: {r}" for r in self.reasons]
        return "\n".join(parts)


def combine(tests: dict[str, TestResult]) -> float:
    ps = [t.p_value for t in tests.values() if t.in_decision and t.p_value == t.p_value]
    if not ps:
        return float("nan")
    return min(1.0, len(ps) * min(ps))


def decide(p: float, threshold: float) -> str:
    if p != p:
        return "inconclusive"
    return "stolen" if p <= threshold else "not-detected"


@dataclass
class QueryPlan:
    n_pairs: int
    n_probes: int  # per modality
    n_extra: int = 0  # scheme-specific queries (EmbMarker's cluster test)

    @property
    def total(self) -> int:
        return 2 * self.n_pairs + 2 * self.n_probes + self.n_extra


def plan_queries(watermark, max_queries: int, n_probes_available: int, alpha: float, n_customers: int = 1) -> QueryPlan:
    """Split the budget: the scheme's extra queries (``watermark.extra_queries``) first, then trigger
    pairs (up to the trigger set, at most half of what is left), the rest to probes. Raises
    ``BudgetError`` when the budget cannot reach ``alpha``."""
    n_trig = watermark.n_triggers
    extra = int(getattr(watermark, "extra_queries", 0) or 0)
    room = max_queries - extra
    pairs = min(n_trig, room // 4) if room >= 4 else 0
    probes = min(n_probes_available, (room - 2 * pairs) // 2)
    min_pairs = 8
    while min_pairs < 200 and 2 * n_customers * min_permutation_p(min_pairs) > alpha:
        min_pairs += 1
    need = 2 * min_pairs + 2 * 16 + extra
    if pairs < min_pairs or probes < 16:
        raise BudgetError(
            f"{max_queries} verification queries cannot reach p <= {alpha:g}: the trigger test needs at least "
            f"{min_pairs} pairs ({2 * min_pairs} queries) and the distribution test at least 16 probes per modality"
            + (f", after the {extra} queries of the scheme's own tests" if extra else ""),
            f"allow at least {need} queries (--max-queries), or ask for a weaker confidence (--alpha)",
        )
    return QueryPlan(pairs, probes, extra)


def usable_probes(watermark, probes: ReferenceSample) -> ReferenceSample:
    """The probes minus the captions a text layer would change (``watermark.plain_text``: EmbMarker
    and the stacked scheme move texts holding trigger words toward a target). Those captions are
    not "ordinary" for the tests that compare the suspect with ``e W_k`` or with the clean model,
    and would only add noise; the choice depends on the trigger words, never on the suspect."""
    plain = getattr(watermark, "plain_text", None)
    if plain is None:
        return probes
    return ReferenceSample(probes.images, [t for t in probes.texts if plain(t)])


def _probe_embeddings(suspect: Suspect, clean, probes: ReferenceSample, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    imgs, texts = probes.images[:n], probes.texts[:n]
    s = torch.cat([suspect.embed_images(imgs), suspect.embed_texts(texts)])
    e = torch.cat([clean.embed_images(imgs), clean.embed_texts(texts)])
    return s, e, len(imgs)


def run_tests(watermark, suspect, clean, probes: ReferenceSample, customers: list[str], max_queries: int, alpha: float,
         calibration: dict | None, on_bad_suspect: str) -> list[VerificationReport]:
    suspect = as_suspect(suspect)
    clean = as_clean(clean)
    if on_bad_suspect not in ("raise", "inconclusive"):
        raise IPShieldError("on_bad_suspect must be 'raise' or 'inconclusive'", "pick one")
    threshold = float(alpha)
    if calibration and calibration.get("threshold") is not None:
        threshold = min(threshold, float(calibration["threshold"]))
    probes = usable_probes(watermark, probes)
    plan = plan_queries(watermark, max_queries, min(len(probes.images), len(probes.texts)), alpha / max(1, len(customers)),
                        len(customers))
    start_q = (suspect.images_queried, suspect.texts_queried)

    def queries() -> dict[str, int]:
        return {"images": suspect.images_queried - start_q[0], "texts": suspect.texts_queried - start_q[1],
                "total": suspect.queries - start_q[0] - start_q[1], "budget": int(max_queries)}

    def bad(exc: SuspectError) -> list[VerificationReport]:
        if on_bad_suspect == "raise":
            raise exc
        return [VerificationReport(watermark.scheme, c, "inconclusive", float("nan"), threshold, {}, queries(),
                                   [f"{exc.problem}: no evidence either way"], suspect=suspect.name) for c in customers]

    try:
        trig = watermark.trigger_queries_for(customers, plan.n_pairs)
        t_img = suspect.embed_images(trig["images"]) if len(trig["images"]) else torch.zeros(0, 0)
        t_txt = suspect.embed_texts(trig["texts"]) if len(trig["texts"]) else torch.zeros(0, 0)
        s, e, n_img = _probe_embeddings(suspect, clean, probes, plan.n_probes)
    except SuspectError as exc:
        return bad(exc)
    reasons_common = []
    if s.shape[1] != watermark.dim:
        exc = SuspectError(f"the suspect's embeddings have size {s.shape[1]} but the service's have {watermark.dim}",
                           "verify against the watermark of a service with the suspect's embedding size")
        return bad(exc)
    proc = procrustes_test(s, e, n_img, None, calibration)
    perm_nulls = None
    align = None  # key-free signed permutation of the suspect onto the clean model's coordinates
    cluster = watermark.cluster_test(trig, t_txt) if hasattr(watermark, "cluster_test") and len(t_txt) else None
    reports = []
    for cid in customers:
        tests: dict[str, TestResult] = {}
        tests["trigger"] = watermark.trigger_test(trig, t_img, t_txt, cid)
        w = watermark.transform(cid)
        if w is not None:
            tests["distribution"] = distribution_test(s, e, n_img, torch.linalg.inv(w.double()))
            template = watermark.signature_template(cid) if hasattr(watermark, "signature_template") else None
            if template is not None:
                tests["covariance"] = covariance_test(s, e, template, n_img)
            if perm_nulls is None:
                perm_nulls = permutation_nulls(s, e, n_img)
            tests["permutation"] = permutation_test(s, e, n_img, w, perm_nulls)
        elif getattr(watermark, "aligned_trigger_test", None) is not None and len(t_txt):
            if align is None:
                align = match_coordinates(s.double(), e.double(), n_img)
            tests["permutation"] = watermark.aligned_trigger_test(trig, t_txt, cid, align)
        if cluster is not None:
            tests["cluster"] = cluster
        tests["procrustes"] = proc
        p = combine(tests)
        reasons = list(reasons_common)
        if tests["trigger"].n < 8:
            reasons.append(f"only {tests['trigger'].n} trigger pairs were usable")
        reports.append(VerificationReport(watermark.scheme, cid, decide(p, threshold), p, threshold, tests, queries(),
                                          reasons, suspect=suspect.name))
    return reports


def verify(watermark, suspect, clean, probes: ReferenceSample, customer_id: str, max_queries: int = 512,
           alpha: float = 1e-6, calibration: dict | None = None, on_bad_suspect: str = "inconclusive") -> VerificationReport:
    """Verify one customer's watermark in a suspect (see the module docstring)."""
    return run_tests(watermark, suspect, clean, probes, [customer_id], max_queries, alpha, calibration, on_bad_suspect)[0]


def identify_customer(watermark, suspect, clean, probes: ReferenceSample, customers: Sequence[str],
                      max_queries: int = 512, alpha: float = 1e-6, calibration: dict | None = None,
                      on_bad_suspect: str = "inconclusive") -> VerificationReport:
    """Test every customer on one round of queries and name the most likely source. The returned
    report is the best customer's, with ``ranking`` (every customer's p-value, best first); its
    verdict is "stolen" only if the best p-value, Bonferroni-corrected for the number of customers,
    is below the threshold."""
    customers = list(dict.fromkeys(customers))
    if not customers:
        raise IPShieldError("no customers to identify among", "pass the customer ids of the service")
    reports = run_tests(watermark, suspect, clean, probes, customers, max_queries, alpha, calibration, on_bad_suspect)
    # customers are told apart by the customer-specific tests only (the others agree for everyone)
    own = {r.customer_id: combine({n: t for n, t in r.tests.items() if t.customer_specific}) for r in reports}
    ranking = sorted(({"customer_id": r.customer_id, "p_value": r.p_value, "p_customer": own[r.customer_id],
                       "p_trigger": r.tests["trigger"].p_value if "trigger" in r.tests else None,
                       "p_distribution": r.tests["distribution"].p_value if "distribution" in r.tests else None}
                      for r in reports), key=lambda d: (d["p_customer"] != d["p_customer"], d["p_customer"],
                                                        d["p_value"] != d["p_value"], d["p_value"]))
    best = next(r for r in reports if r.customer_id == ranking[0]["customer_id"])
    k = len(customers)
    p = min(1.0, min(r.p_value for r in reports) * k) if best.p_value == best.p_value else float("nan")
    best.p_value = p
    best.verdict = decide(p, best.threshold) if best.verdict != "inconclusive" else "inconclusive"
    best.ranking = ranking
    best.reasons.append(f"identification among {k} customers (p-value Bonferroni-corrected by {k})")
    p_own = own[best.customer_id]
    if best.verdict == "stolen" and not (p_own == p_own and min(1.0, p_own * k) <= best.threshold):
        best.reasons.append("derived from the service, but only tests that agree for every customer fired: "
                            "the leaking customer cannot be told apart")
        best.customer_id = None
    elif best.verdict != "stolen":
        best.customer_id = None if best.verdict == "not-detected" else best.customer_id
    return best


# ------------------------------------------------------------------------------ calibration
def calibrate(innocent_reports: Sequence[VerificationReport], alpha: float = 1e-6, margin: float = 100.0,
              min_innocent: int = 5, min_sd: float = 0.02) -> dict:
    """Calibration on innocent models' reports (same watermark, same customer set):
    the Procrustes statistic's mean and sd (floored at ``min_sd``; needs ``min_innocent`` models) so
    that test can enter the decision, and the decision threshold: ``alpha``, lowered to
    ``min innocent p / margin`` if any innocent model came closer."""
    proc = np.asarray([r.tests["procrustes"].test_mean_cos for r in innocent_reports if "procrustes" in r.tests])
    ps = np.asarray([r.p_value for r in innocent_reports if r.p_value == r.p_value])
    cal: dict[str, Any] = {"n_innocent": len(innocent_reports), "alpha": alpha}
    if len(proc) >= max(2, min_innocent):
        cal["procrustes_mean"] = float(proc.mean())
        # a floor on the spread: a handful of innocent models can agree by chance
        cal["procrustes_sd"] = max(float(proc.std(ddof=1)), min_sd)
    thr = alpha
    if len(ps) and ps.min() / margin < alpha:
        thr = float(ps.min() / margin)
    cal["threshold"] = thr
    cal["innocent_p_min"] = float(ps.min()) if len(ps) else None
    return cal


def recalibrate(report: VerificationReport, calibration: dict | None) -> VerificationReport:
    """The same verification under another calibration (e.g. leave-one-out over innocent models):
    recomputes the Procrustes test's calibrated p-value, the combined p-value and the verdict from
    the stored statistics (no new query)."""
    import copy

    r = copy.deepcopy(report)
    if r.verdict == "inconclusive" or "procrustes" not in r.tests:
        return r
    t = r.tests["procrustes"]
    if calibration and calibration.get("procrustes_sd"):
        t.z = (t.test_mean_cos - calibration["procrustes_mean"]) / calibration["procrustes_sd"]
        t.p_value = norm_sf(t.z)
        t.in_decision = True
        t.note = f"p from the calibration on {calibration.get('n_innocent', '?')} innocent models"
    else:
        t.in_decision, t.p_value, t.z = False, float("nan"), float("nan")
    r.threshold = float(calibration.get("threshold", r.threshold)) if calibration else r.threshold
    r.p_value = combine(r.tests)
    r.verdict = decide(r.p_value, r.threshold)
    return r
