"""Attacks on domain restriction (MAP, NTL, CUTI-domain): how much unauthorized accuracy can an
attacker who holds the protected classifier win back, and at what cost?

- ``finetune``: fine-tune every weight of the protected model on ``k`` labelled images of the
  unauthorized domain (k = 10, 100, 1000 in the benchmark); pruned (zero) weights of an exported
  MAP model are ordinary weights again and can regrow.
- ``shot``: source-free domain adaptation on unlabelled unauthorized images, SHOT-style: the
  final linear layer (the "hypothesis") is frozen, the rest is trained with information
  maximisation (confident and diverse predictions) plus cross-entropy to self-supervised pseudo
  labels from feature centroids (recomputed every ``refresh_every`` steps).

Both return a dict with the unauthorized accuracy before and after the attack (percent).
Each attack works on a copy; the given model is not modified.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.config import BaseConfig
from ipshield.data.domain import Domain
from ipshield.errors import DataError, IPShieldError
from ipshield.registry import ATTACKS
from ipshield.utils import progress, seed_everything


class FinetuneAttackConfig(BaseConfig):
    #: labelled unauthorized training images the attacker holds (class-balanced)
    k: int = 100
    #: optimisation steps (the same budget for every k)
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    #: BatchNorm during the attack: "train" re-estimates the statistics on the attacker's data
    bn_mode: Literal["eval", "train"] = "train"
    augment: bool = True
    n_test: int | None = None
    image_size: int = 32
    seed: int = 0
    device: str = "cpu"


class SHOTAttackConfig(BaseConfig):
    #: unlabelled unauthorized training images used
    n_train: int = 2000
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    #: weight of the pseudo-label cross-entropy
    beta: float = 0.3
    refresh_every: int = 50
    bn_mode: Literal["eval", "train"] = "train"
    n_test: int | None = None
    image_size: int = 32
    seed: int = 0
    device: str = "cpu"


def _set_bn(model: nn.Module, bn_mode: str) -> None:
    model.train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _eval(model, domain: Domain, config) -> float:
    from ipshield.protect.restrict import test_split
    from ipshield.protect.base import accuracy

    return accuracy(model, test_split(domain, config.n_test, config.seed), size=config.image_size)


@ATTACKS.register("finetune")
def finetune_attack(model: nn.Module, domain: Domain, config: FinetuneAttackConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``k`` labelled images of ``domain``; accuracy on its test split."""
    from ipshield.models.classifiers import _random_shift
    from ipshield.protect.restrict import train_tensors

    cfg = config or FinetuneAttackConfig.build(overrides)
    if cfg.k < 1:
        raise IPShieldError(f"k must be at least 1 (got {cfg.k})", "give the number of labelled unauthorized images")
    if cfg.k > len(domain.train):
        raise DataError(f"k={cfg.k} but domain '{domain.name}' has only {len(domain.train)} training images", "use a smaller k")
    t0 = time.time()
    g = seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    acc_before = _eval(model, domain, cfg)
    x, y = train_tensors(domain, cfg.k, cfg.image_size, cfg.seed)
    attacked = copy.deepcopy(model).to(device)
    for p in attacked.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(attacked.parameters(), lr=cfg.lr)
    _set_bn(attacked, cfg.bn_mode)
    bs = min(cfg.batch_size, len(y))
    for _ in progress(range(cfg.steps), desc=f"finetune k={cfg.k}"):
        idx = torch.randperm(len(y), generator=g)[:bs]
        xb, yb = x[idx], y[idx]
        if cfg.augment:
            xb = _random_shift(xb, 2, g)
        loss = F.cross_entropy(attacked(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    attacked.eval()
    return {"attack": "finetune", "domain": domain.name, "k": cfg.k, "steps": cfg.steps, "acc_before": acc_before,
            "acc_after": _eval(attacked, domain, cfg), "seconds": round(time.time() - t0, 1), "model": attacked}


def _last_linear(model: nn.Module) -> nn.Linear:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise IPShieldError("SHOT needs a classifier ending with a linear layer (its frozen hypothesis)", "use an ipshield classifier")
    return last[-1]


@torch.no_grad()
def _pseudo_labels(model: nn.Module, head: nn.Linear, x: torch.Tensor, device, bs: int = 256) -> torch.Tensor:
    feats, probs = [], []
    store: list[torch.Tensor] = []
    h = head.register_forward_hook(lambda m, i, o: store.append(i[0].detach()))
    was = model.training
    model.eval()
    try:
        for s in range(0, len(x), bs):
            store.clear()
            probs.append(F.softmax(model(x[s:s + bs].to(device)), -1))
            feats.append(store[0])
    finally:
        h.remove()
        model.train(was)
    f = F.normalize(torch.cat(feats), dim=1)
    p = torch.cat(probs)
    # weighted centroids from the soft predictions, then one round with hard assignments
    cent = F.normalize(p.t() @ f / p.sum(0, keepdim=True).t().clamp_min(1e-8), dim=1)
    labels = (f @ cent.t()).argmax(1)
    onehot = F.one_hot(labels, p.shape[1]).float()
    cent = F.normalize(onehot.t() @ f / onehot.sum(0, keepdim=True).t().clamp_min(1e-8), dim=1)
    return (f @ cent.t()).argmax(1).cpu()


@ATTACKS.register("shot")
def shot_attack(model: nn.Module, domain: Domain, config: SHOTAttackConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """SHOT-style source-free adaptation of a copy of ``model`` to the unlabelled train split of ``domain``."""
    from ipshield.protect.restrict import train_tensors

    cfg = config or SHOTAttackConfig.build(overrides)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    acc_before = _eval(model, domain, cfg)
    x, _ = train_tensors(domain, cfg.n_train, cfg.image_size, cfg.seed)  # labels never used
    attacked = copy.deepcopy(model).to(device)
    head = _last_linear(attacked)
    for p in attacked.parameters():
        p.requires_grad_(True)
    for p in head.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in attacked.parameters() if p.requires_grad], lr=cfg.lr)
    pseudo = _pseudo_labels(attacked, head, x, device)
    _set_bn(attacked, cfg.bn_mode)
    for step in progress(range(cfg.steps), desc="shot"):
        if step and step % cfg.refresh_every == 0:
            pseudo = _pseudo_labels(attacked, head, x, device)
        idx = torch.randperm(len(x), generator=g)[: cfg.batch_size]
        logits = attacked(x[idx].to(device))
        p = F.softmax(logits, -1)
        ent = -(p * torch.log(p + 1e-6)).sum(1).mean()
        pm = p.mean(0)
        div = (pm * torch.log(pm + 1e-6)).sum()  # negative entropy of the mean prediction
        loss = ent + div + cfg.beta * F.cross_entropy(logits, pseudo[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    attacked.eval()
    return {"attack": "shot", "domain": domain.name, "steps": cfg.steps, "acc_before": acc_before,
            "acc_after": _eval(attacked, domain, cfg), "seconds": round(time.time() - t0, 1), "model": attacked}


def cost_to_break(model: nn.Module, domain: Domain, ks: tuple[int, ...] = (10, 100, 1000), shot: bool = True,
                  finetune: dict[str, Any] | None = None, shot_options: dict[str, Any] | None = None,
                  seed: int = 0, n_test: int | None = None) -> dict[str, Any]:
    """Unauthorized accuracy recovered by fine-tuning with each k and by SHOT (percent)."""
    out: dict[str, Any] = {"domain": domain.name}
    for k in ks:
        if k > len(domain.train):
            out[f"finetune_k{k}"] = None
            continue
        cfg = FinetuneAttackConfig.build({"k": k, "seed": seed, "n_test": n_test, **(finetune or {})})
        r = finetune_attack(model, domain, cfg)
        out["acc_before"] = r["acc_before"]
        out[f"finetune_k{k}"] = r["acc_after"]
    if shot:
        r = shot_attack(model, domain, SHOTAttackConfig.build({"seed": seed, "n_test": n_test, **(shot_options or {})}))
        out["acc_before"] = r["acc_before"]
        out["shot"] = r["acc_after"]
    return out
