"""[ours] The authorization verdict of a protected CLIP, and authorization on demand.

Nothing in this module comes from the IP-CLIP paper or its reference code; the switch is
inspired by AoD-IP (CVPR 2026, arXiv 2603.04896), whose text was not available here, so nothing
is claimed about its method.

**The verdict** (``AuthorizationHead``): a score per image saying how much it looks like the
authorized domain, computed from what the frozen image tower already gives IP-CLIP
(``visual_stats``): the per-layer style statistics flattened ([L * W], "style") or the image
feature ([D], "feature"). The features are standardised (pooled held-out statistics) and each
known set (the authorized domain and every unauthorized condition that has held-out images) gets
a probabilistic-PCA Gaussian (``verdict_dims`` principal directions, the rest isotropic), fitted
on HELD-OUT training images only (images of the training split never used for a gradient step;
never the test split; when a split has none to spare, see ``IPCLIPConfig.verdict_carve``). Three
scores are candidates:

- ``gaussian``: the authorized Gaussian's log-density (one-class; nothing about the others);
- ``contrast``: min(authorized log-density - its threshold, log-odds authorized vs the other
  known sets under the Gaussians), i.e. a generative domain classifier with an "unknown" reject;
- ``logistic``: a logistic regression authorized vs unauthorized on the top principal
  directions of the pooled held-out features (fixed authorized set only).

Each (feature, score) pair is scored by 5-fold cross-fitting on the held-out images (every
held-out image scored by a head fitted without it); the pair with the highest worst-case AUROC
(authorized vs each unauthorized held-out set) wins, ties (within 0.002) going to the simpler
score (gaussian, then contrast, then logistic; style before feature). The threshold accepts
``verdict_accept`` (95 %) of the authorized held-out images' cross-fitted scores; the final head
is then fitted on all held-out images. The out-of-fold scores are kept (a few numbers per held-out
image), so a threshold for any other authorized set is computed at deployment from held-out
training images only, without data or retraining.

**Authorization on demand** (``SwitchableIPCLIP``, ``switchable=true``): IP-CLIP trained once on
several domains. The per-image prompts (the IP projector) are trained to classify every trained
domain correctly; a collapse context (``n_ctx`` learned tokens per class) is trained to give every
input of every trained domain the same near-uniform class distribution, with the rarest training
class on top (useless predictions: the same class whatever the input). At deployment the owner names
the authorized domains (``authorize``); the head's ``contrast`` score for that set (typical of an
authorized domain, and more likely authorized than any other trained domain) gates each image:
accepted images get the per-image prompts, the others the collapse context, so their served
predictions are really at chance level, not just labelled.

Persistence: ``authorization_head.safetensors`` + ``authorization_head.json`` (no pickle).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.errors import CheckpointError, ConfigError, DataError
from ipshield.protect.ipclip.config import IPCLIPConfig
from ipshield.protect.ipclip.model import IPCLIP, VisualStats, _autocast

HEAD_FILE = "authorization_head.safetensors"
HEAD_META = "authorization_head.json"
FEATURES = ("style", "feature")
SCORES = ("gaussian", "contrast", "logistic")
#: a candidate must beat the simpler one by more than this (worst-case AUROC) to be chosen
TIE_TOLERANCE = 0.002
FOLDS = 5
NO_HEAD_NOTE = ("verdict unavailable: this run has no authorization head ({file}; runs trained before the verdict "
                "existed, or with verdict=false); accuracy only")


# ---------------------------------------------------------------------------- held-out images
def holdout_indices(n: int, max_train: int | None, seed: int, val_size: int = 0, val_fraction: float = 0.2
                    ) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(training indices, held-out indices or None, "outside" | "carved") of a training split of
    ``n`` images: the same choice as ``ipclip.data.holdout_split`` (which returns the images),
    here as indices so a run can record which images it held out."""
    from ipshield.protect.training import subsample_indices

    keep = subsample_indices(n, max_train, seed)
    if val_size <= 0:
        return keep, None, "none"
    rng = np.random.default_rng(seed + 104729)
    rest = np.setdiff1d(np.arange(n), keep)
    if len(rest) >= val_size:
        return keep, np.sort(rng.choice(rest, val_size, replace=False)), "outside"
    n_val = min(len(keep) - 1, max(1, int(round(val_fraction * len(keep)))))
    perm = rng.permutation(keep)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val]), "carved"


def spare_images(sizes: Sequence[int], max_train: int | None, seed: int) -> int:
    """How many training images every split has outside its ``max_train`` subset."""
    from ipshield.protect.training import subsample_indices

    return min((n - len(subsample_indices(n, max_train, seed)) for n in sizes), default=0)


def verdict_val_size(sizes: Sequence[int], config: IPCLIPConfig) -> int:
    """The ``val_size`` handed to the stream builder so that the verdict gets held-out images:
    ``verdict_size`` images (at most what every split has spare) from outside the training
    subset, so training is unchanged. When fewer than ``verdict_min`` are spare: with
    ``verdict_carve`` a size no split can meet, so ``val_fraction`` of each training subset is held
    out (and not trained on); without, 0 (the head falls back to training images, flagged)."""
    if config.select_best:
        return config.val_size
    if not config.verdict:
        return 0
    spare = spare_images(sizes, config.max_train, config.seed)
    if spare >= config.verdict_min:
        return min(config.verdict_size, spare)
    return max(sizes) + 1 if config.verdict_carve else 0


# ---------------------------------------------------------------------------- small statistics
def auroc(pos: np.ndarray | torch.Tensor, neg: np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve of scores ``pos`` (should be high) vs ``neg`` (Mann-Whitney, ties 1/2)."""
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if len(x) else 0.0


def head_features(stats: VisualStats, feature: str) -> torch.Tensor:
    """The head's input [N, F] from IP-CLIP's visual statistics."""
    if feature == "style":
        return stats.style.flatten(1).double().cpu()
    if feature == "feature":
        return stats.features.double().cpu()
    raise ConfigError(f"unknown verdict feature '{feature}'", f"choose one of: auto, {', '.join(FEATURES)}")


def _fit_scaler(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0) if len(x) > 1 else torch.ones_like(mean)
    floor = 1e-3 * float(std.median()) + 1e-8
    return mean, std.clamp(min=floor)


def _fit_ppca(z: torch.Tensor, dims: int) -> dict[str, torch.Tensor]:
    """Probabilistic PCA of standardised rows z [n, F]: top-k directions with their variances,
    the remaining variance shared isotropically (sigma^2)."""
    n, f = z.shape
    mu = z.mean(0)
    zc = z - mu
    k = max(1, min(dims, n - 2, f - 1))
    _, s, vh = torch.linalg.svd(zc, full_matrices=False)
    eig = s ** 2 / max(n - 1, 1)
    total = float(eig.sum())
    lam = eig[:k]
    sigma2 = max((total - float(lam.sum())) / max(f - k, 1), 1e-6 * total / f, 1e-12)
    return {"mean": mu, "components": vh[:k].contiguous(), "variances": lam.clamp(min=sigma2),
            "sigma2": torch.tensor([sigma2], dtype=torch.float64)}


def _ppca_logpdf(p: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    d = z - p["mean"]
    proj = d @ p["components"].t()
    r2 = (d ** 2).sum(1) - (proj ** 2).sum(1)
    lam, s2 = p["variances"], p["sigma2"][0]
    f, k = z.shape[1], lam.shape[0]
    return -0.5 * ((proj ** 2 / lam).sum(1) + r2.clamp(min=0) / s2 + torch.log(lam).sum()
                   + (f - k) * torch.log(s2) + f * math.log(2 * math.pi))


def _fit_logistic(z: torch.Tensor, y: torch.Tensor, dims: int, l2: float = 1e-3) -> dict[str, torch.Tensor]:
    """Balanced logistic regression on the top ``dims`` principal directions of z (pooled)."""
    mu = z.mean(0)
    k = max(1, min(dims, z.shape[0] - 2, z.shape[1]))
    _, _, vh = torch.linalg.svd(z - mu, full_matrices=False)
    basis = vh[:k].contiguous()
    h = (z - mu) @ basis.t()
    scale = h.std(0).clamp(min=1e-8)
    h = h / scale
    w = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos = float(y.sum())
    weight = torch.where(y > 0, 0.5 / max(pos, 1.0), 0.5 / max(len(y) - pos, 1.0))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * F.binary_cross_entropy_with_logits(h @ w + b, y, reduction="none")).sum() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"mean": mu, "basis": basis, "scale": scale, "w": w.detach(), "b": b.detach()}


def _logistic_score(p: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return ((z - p["mean"]) @ p["basis"].t() / p["scale"]) @ p["w"] + p["b"]


# ---------------------------------------------------------------------------- the fitted parts
class _Fit:
    """Scaler + one PPCA Gaussian per known set (+ a logistic head for a fixed authorized set)."""

    def __init__(self, xs: dict[str, torch.Tensor], dims: int, logistic_positive: Sequence[str] | None):
        self.names = list(xs)
        self.mean, self.std = _fit_scaler(torch.cat(list(xs.values())))
        self.gauss = {n: _fit_ppca(self._z(x), dims) for n, x in xs.items()}
        self.logistic = None
        if logistic_positive is not None and len(set(self.names) - set(logistic_positive)) > 0:
            z = torch.cat([self._z(x) for x in xs.values()])
            y = torch.cat([torch.full((len(x),), float(n in logistic_positive), dtype=torch.float64)
                           for n, x in xs.items()])
            self.logistic = _fit_logistic(z, y, 2 * dims)

    def _z(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def logpdf(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n_sets] log-density of every row under every known set's Gaussian."""
        z = self._z(x)
        return torch.stack([_ppca_logpdf(self.gauss[n], z) for n in self.names], 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        if self.logistic is None:
            return torch.zeros(len(x), dtype=torch.float64)
        return _logistic_score(self.logistic, self._z(x))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}scaler.mean": self.mean, f"{prefix}scaler.std": self.std}
        for i, n in enumerate(self.names):
            out.update({f"{prefix}gauss.{i}.{k}": v for k, v in self.gauss[n].items()})
        if self.logistic is not None:
            out.update({f"{prefix}logistic.{k}": v for k, v in self.logistic.items()})
        return out

    @classmethod
    def from_tensors(cls, names: list[str], t: dict[str, torch.Tensor], prefix: str = "") -> "_Fit":
        self = cls.__new__(cls)
        self.names = list(names)
        self.mean, self.std = t[f"{prefix}scaler.mean"].double(), t[f"{prefix}scaler.std"].double()
        keys = ("mean", "components", "variances", "sigma2")
        self.gauss = {n: {k: t[f"{prefix}gauss.{i}.{k}"].double() for k in keys} for i, n in enumerate(names)}
        self.logistic = ({k: t[f"{prefix}logistic.{k}"].double() for k in ("mean", "basis", "scale", "w", "b")}
                         if f"{prefix}logistic.w" in t else None)
        return self


def _combine(score: str, logpdf: torch.Tensor, logit: torch.Tensor, t_set: torch.Tensor, names: list[str],
             authorized: Sequence[str]) -> torch.Tensor:
    """The raw verdict score of rows from their per-set log-densities [N, S] (``t_set``: per-set
    thresholds of the log-density), the logistic logit [N], for the authorized set names."""
    a = torch.tensor([n in authorized for n in names])
    typical = (logpdf[:, a] - t_set[a]).max(1).values
    if score == "gaussian":
        return typical
    if score == "logistic":
        return logit
    if (~a).sum() == 0:
        return typical
    odds = torch.logsumexp(logpdf[:, a], 1) - torch.logsumexp(logpdf[:, ~a], 1)
    return torch.minimum(typical, odds)


# ---------------------------------------------------------------------------- the head
class AuthorizationHead:
    """[ours] Per-image authorization score and verdict (see the module docstring).

    ``score(stats, authorized)`` gives the raw score, ``threshold(authorized)`` the threshold
    (accepts ``accept`` of the held-out images of the authorized sets), ``margin`` their
    difference (>= 0: authorized)."""

    def __init__(self, feature: str, score: str, names: list[str], authorized: list[str], fit: _Fit,
                 oof_logpdf: torch.Tensor, oof_logit: torch.Tensor, oof_set: torch.Tensor, t_set: torch.Tensor,
                 accept: float, switchable: bool = False, meta: dict | None = None):
        self.feature, self.score_kind = feature, score
        self.names, self.authorized = list(names), list(authorized)
        self.fit_ = fit
        self.oof_logpdf, self.oof_logit, self.oof_set, self.t_set = oof_logpdf, oof_logit, oof_set, t_set
        self.accept = float(accept)
        self.switchable = bool(switchable)
        self.meta = dict(meta or {})
        self._thresholds: dict[tuple, float] = {}

    # -- deployment: which sets are authorized
    def check_authorized(self, authorized: Sequence[str] | None) -> list[str]:
        if authorized is None:
            return list(self.authorized)
        want = [str(a).strip() for a in authorized if str(a).strip()]
        if not want:
            raise DataError("no authorized domain given", f"name one or more of: {', '.join(self.names)}")
        out = []
        for w in want:
            match = [n for n in self.names if n.lower() == w.lower()]
            if not match:
                raise DataError(f"'{w}' is not a domain this run was trained on ({', '.join(self.names)})",
                                "authorize one of the trained domains (an unseen domain would need retraining)")
            out.append(match[0])
        if sorted(out) != sorted(self.authorized) and not self.switchable:
            raise DataError(f"this run's authorized domain is fixed ({', '.join(self.authorized)}): it was not trained "
                            "switchable", "train with --set switchable=true to choose the authorized domains at "
                                          "deployment")
        if self.score_kind == "logistic" and sorted(out) != sorted(self.authorized):
            raise DataError("the logistic verdict serves a fixed authorized set", "use the run's authorized domain")
        return sorted(set(out), key=self.names.index)

    def threshold(self, authorized: Sequence[str] | None = None) -> float:
        """Threshold of the raw score: the ``1 - accept`` quantile of the cross-fitted scores of
        the held-out images of the authorized sets (held-out training images only)."""
        a = self.check_authorized(authorized)
        key = tuple(a)
        if key not in self._thresholds:
            s = _combine(self.score_kind, self.oof_logpdf, self.oof_logit, self.t_set, self.names, a)
            mask = torch.tensor([self.names[int(i)] in a for i in self.oof_set])
            self._thresholds[key] = _quantile(s[mask], 1.0 - self.accept)
        return self._thresholds[key]

    def score(self, stats: VisualStats, authorized: Sequence[str] | None = None) -> torch.Tensor:
        a = self.check_authorized(authorized)
        x = head_features(stats, self.feature)
        return _combine(self.score_kind, self.fit_.logpdf(x), self.fit_.logit(x), self.t_set, self.names, a).float()

    def margin(self, stats: VisualStats, authorized: Sequence[str] | None = None) -> torch.Tensor:
        """Score minus threshold: >= 0 means authorized."""
        return self.score(stats, authorized) - self.threshold(authorized)

    def domain(self, stats: VisualStats) -> list[str]:
        """The most likely known set of each image (the Gaussians' generative classifier)."""
        idx = self.fit_.logpdf(head_features(stats, self.feature)).argmax(1)
        return [self.names[int(i)] for i in idx]

    def summary(self) -> dict:
        """What the run records about the head (JSON-able)."""
        return {"feature": self.feature, "score": self.score_kind, "sets": self.names, "authorized": self.authorized,
                "switchable": self.switchable, "accept": self.accept, "threshold": self.threshold(),
                **{k: v for k, v in self.meta.items() if k != "holdout"},
                "holdout": {n: {k: v for k, v in h.items() if k != "indices"}
                            for n, h in self.meta.get("holdout", {}).items()}}

    # -- persistence (safetensors + JSON, never pickle)
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        t = self.fit_.tensors("fit.")
        t.update({"oof.logpdf": self.oof_logpdf, "oof.logit": self.oof_logit, "oof.set": self.oof_set.long(),
                  "t_set": self.t_set})
        save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, str(folder / HEAD_FILE))
        meta = {"kind": "authorization-head", "feature": self.feature, "score": self.score_kind, "sets": self.names,
                "authorized": self.authorized, "accept": self.accept, "switchable": self.switchable,
                "threshold": self.threshold(), **self.meta}
        (folder / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n")
        return folder / HEAD_FILE

    @classmethod
    def load(cls, folder: str | Path) -> "AuthorizationHead":
        from ipshield.runs import load_tensors

        folder = Path(folder)
        p = folder / HEAD_META
        if not p.is_file():
            raise CheckpointError(NO_HEAD_NOTE.format(file=HEAD_META), "re-train the run to get a verdict")
        try:
            meta = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p} is not valid JSON ({exc})", "re-train the run") from None
        t = load_tensors(folder / HEAD_FILE)
        names = meta["sets"]
        extra = {k: v for k, v in meta.items() if k not in ("kind", "feature", "score", "sets", "authorized", "accept",
                                                            "switchable", "threshold")}
        return cls(meta["feature"], meta["score"], names, meta["authorized"], _Fit.from_tensors(names, t, "fit."),
                   t["oof.logpdf"].double(), t["oof.logit"].double(), t["oof.set"].long(), t["t_set"].double(),
                   meta["accept"], meta.get("switchable", False), extra)


def has_head(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_META).is_file() and (Path(folder) / HEAD_FILE).is_file()


def load_head(folder: str | Path) -> AuthorizationHead | None:
    """The run's head, or None for a run saved without one."""
    return AuthorizationHead.load(folder) if has_head(folder) else None


def _folds(counts: Sequence[int], k: int, seed: int) -> torch.Tensor:
    """A fold number per row, stratified by set (rows ordered set by set)."""
    g = np.random.default_rng(seed)
    parts = []
    for n in counts:
        f = np.arange(n) % k
        g.shuffle(f)
        parts.append(f)
    return torch.from_numpy(np.concatenate(parts))


def fit_head(sets: dict[str, VisualStats], authorized: Sequence[str], dims: int = 16, accept: float = 0.95,
             feature: str = "auto", score: str = "auto", switchable: bool = False, seed: int = 0,
             meta: dict | None = None) -> AuthorizationHead:
    """Fit the verdict on the visual statistics of HELD-OUT training images, one entry per known
    set (the authorized sets and the unauthorized conditions). Chooses the (feature, score) pair
    by cross-fitted worst-case AUROC; see the module docstring."""
    names = list(sets)
    authorized = [a for a in names if a in authorized]
    if not authorized:
        raise DataError("the verdict needs held-out images of the authorized domain", "give more training images")
    counts = [len(sets[n]) for n in names]
    if min(counts) < 4:
        raise DataError(f"too few held-out images for the verdict ({dict(zip(names, counts))}); at least 4 per set",
                        "give more training images or lower max_train")
    set_idx = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
    folds = _folds(counts, min(FOLDS, min(counts)), seed)
    features = FEATURES if feature == "auto" else (feature,)
    # a switchable head serves any authorized set: only the Gaussian scores (no fixed logistic)
    scores = [s for s in (SCORES if score == "auto" else (score,))
              if not (switchable and s == "logistic") and not (len(names) == 1 and s != "gaussian")]
    if not scores:
        raise ConfigError(f"verdict score '{score}' is not available here", "use verdict_score=auto")
    pos = torch.tensor([names[int(i)] in authorized for i in set_idx])
    candidates, cache = [], {}
    for feat in features:
        xs = {n: head_features(sets[n], feat) for n in names}
        x_all = torch.cat(list(xs.values()))
        oof_lp = torch.zeros(len(x_all), len(names), dtype=torch.float64)
        oof_lg = torch.zeros(len(x_all), dtype=torch.float64)
        for f in folds.unique().tolist():
            tr = folds != f
            fit = _Fit({n: x_all[tr & (set_idx == i)] for i, n in enumerate(names)}, dims,
                       authorized if "logistic" in scores else None)
            oof_lp[~tr] = fit.logpdf(x_all[~tr])
            oof_lg[~tr] = fit.logit(x_all[~tr])
        t_set = torch.tensor([_quantile(oof_lp[set_idx == i, i], 1.0 - accept) for i in range(len(names))],
                             dtype=torch.float64)
        cache[feat] = (xs, oof_lp, oof_lg, t_set)
        for sc in scores:
            s = _combine(sc, oof_lp, oof_lg, t_set, names, authorized)
            per = {}
            if switchable:  # every trained domain in turn as the authorized one
                for i, a in enumerate(names):
                    sa = _combine(sc, oof_lp, oof_lg, t_set, names, [a])
                    for j, b in enumerate(names):
                        if i != j:
                            per[f"{a} vs {b}"] = auroc(sa[set_idx == i], sa[set_idx == j])
            else:
                for j, b in enumerate(names):
                    if b not in authorized:
                        per[b] = auroc(s[pos], s[set_idx == j])
            worst = min(per.values()) if per else float("nan")
            candidates.append({"feature": feat, "score": sc, "worst_auroc": worst, "auroc": per})
    # preference on ties: the simpler score first (gaussian, contrast, logistic), style before feature
    best = None
    for c in sorted(candidates, key=lambda c: (SCORES.index(c["score"]), FEATURES.index(c["feature"]))):
        w = -1.0 if math.isnan(c["worst_auroc"]) else c["worst_auroc"]
        if best is None or w > best[0] + TIE_TOLERANCE:
            best = (w, c)
    best = best[1]
    xs, oof_lp, oof_lg, t_set = cache[best["feature"]]
    final = _Fit(xs, dims, authorized if best["score"] == "logistic" else None)
    info = dict(meta or {})
    info.update({"dims": dims, "folds": int(folds.max()) + 1, "candidates": candidates,
                 "chosen": {"feature": best["feature"], "score": best["score"], "worst_auroc": best["worst_auroc"]},
                 "n_holdout": dict(zip(names, counts))})
    return AuthorizationHead(best["feature"], best["score"], names, list(authorized), final, oof_lp.double(),
                             oof_lg.double(), set_idx, t_set, accept, switchable, info)


@torch.no_grad()
def stream_stats(adapter, stream, config: IPCLIPConfig, seed: int) -> VisualStats:
    """Visual statistics of a whole training stream, plain images (its scenario transform drawn
    from a generator of its own, so the training draws are unchanged)."""
    from ipshield.protect.ipclip.model import visual_stats

    g = torch.Generator().manual_seed(seed)
    parts = [visual_stats(adapter, stream.batch(torch.arange(s, min(len(stream), s + 256)), g, False),
                          config.stat_eps, config.amp).to("cpu") for s in range(0, len(stream), 256)]
    return VisualStats.cat(parts)


# ---------------------------------------------------------------------------- authorization on demand
class SwitchableIPCLIP(IPCLIP):
    """[ours] IP-CLIP with authorization on demand: per-image prompts that classify every trained
    domain, a static collapse context that makes predictions useless, and the head that gates
    between them for the authorized set chosen at deployment (``authorize``)."""

    def __init__(self, adapter, classes: Sequence[str], config: IPCLIPConfig | None = None):
        super().__init__(adapter, classes, config)
        # one learned context per class (so each class's collapse text can move on its own)
        self.collapse_ctx = nn.Parameter(torch.randn(len(self.classes), self.projector.n_ctx, adapter.text_width,
                                                     device=adapter.device) * 0.02)
        self.head: AuthorizationHead | None = None
        self.authorized_set: list[str] | None = None
        #: the class the collapse context serves (set by training: the rarest training class)
        self.collapse_class = 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters()) + [self.collapse_ctx]

    def collapse_text(self) -> torch.Tensor:
        """Normalised text features [C, D] of the collapse prompts (the same for every image)."""
        t = self.template
        prompts = torch.cat([t.prefix, self.collapse_ctx.to(t.prefix.dtype), t.suffix], dim=1)
        return self.adapter.encode_text_embeddings(prompts, t.eos, normalize=True).float()

    def collapse_logits(self, features: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        text = self.collapse_text() if text is None else text
        return self.adapter.logit_scale.exp().float() * features.float() @ text.t()

    def authorize(self, domains: Sequence[str] | None = None) -> list[str]:
        """Choose the authorized domains among the trained ones (None: the run's own)."""
        if self.head is None:
            raise CheckpointError("this switchable run has no authorization head", "re-train it")
        self.authorized_set = self.head.check_authorized(domains)
        return self.authorized_set

    def accepted(self, stats: VisualStats) -> torch.Tensor:
        return self.head.margin(stats, self.authorized_set) >= 0

    @torch.no_grad()
    def logits_from_stats(self, stats: VisualStats) -> torch.Tensor:
        logits = super().logits_from_stats(stats)
        if self.head is None:  # during training: the per-image prompts alone
            return logits
        ok = self.accepted(stats.to("cpu")).to(logits.device)
        with _autocast(self.adapter.device, self.config.amp):
            collapse = self.collapse_logits(stats.features.to(self.adapter.device))
        return torch.where(ok[:, None], logits, collapse.to(logits.dtype))

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        path = super().save(folder, {**(extra or {}), "switchable": True, "collapse_class": self.collapse_class,
                                     "trained_domains": self.head.names if self.head is not None else None})
        if self.head is not None:
            self.head.save(folder)
        return path

    @classmethod
    def load(cls, folder: str | Path, adapter) -> "SwitchableIPCLIP":
        from ipshield.protect.ipclip.model import read_generator_meta

        model = super().load(folder, adapter)
        model.collapse_class = int(read_generator_meta(folder).get("collapse_class", 0))
        model.head = AuthorizationHead.load(folder)
        model.authorize(None)
        return model
