"""Source-free adaptation attacks besides SHOT (``attacks/domain.py``).

- ``nrc``: Neighbourhood Reciprocal Clustering (Yang et al., NeurIPS 2021), implemented from its
  idea [ours where the paper leaves a choice]: a memory bank holds the normalised feature (the
  input of the final linear layer) and the softmax prediction of every unlabelled unauthorized
  training image. Each image is pulled toward the predictions of its ``k_neighbors`` nearest
  neighbours in feature space (weight 1 when the neighbourhood is *reciprocal*, i.e. the image
  is also among the neighbour's nearest neighbours, ``weight_nonreciprocal`` otherwise), and
  toward those of its neighbours' neighbours (the expanded neighbourhood, ``weight_expanded``),
  with a self-regularisation term on its own stored prediction and a diversity term (negative
  entropy of the batch-mean prediction) against collapse to one class. Every weight is trained
  (NRC trains the classifier too; SHOT freezes it). Banks are updated with the batch's features
  and predictions after every step. No label is used.
"""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ipshield.attacks.domain import AttackConfig, _check_domain, _eval, _last_linear, _set_bn, as_config, check_target
from ipshield.data.domain import Domain
from ipshield.registry import ATTACKS
from ipshield.utils import progress, resolve_device, seed_everything


class NRCAttackConfig(AttackConfig):
    budget_field: ClassVar[str] = "n_train"

    #: unlabelled unauthorized training images used (at most; all the domain has when fewer)
    n_train: int = Field(2000, description="unlabelled unauthorized images the attacker holds")
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    #: nearest neighbours (K) and expanded neighbours per neighbour (KK)
    k_neighbors: int = Field(5, ge=1)
    k_expanded: int = Field(5, ge=0)
    weight_nonreciprocal: float = 0.1
    weight_expanded: float = 0.1
    #: weight of the diversity term
    diversity: float = 1.0
    bn_mode: Literal["eval", "train"] = "train"
    n_test: int | None = None
    image_size: int = 32
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"


def _features_and_logits(model: nn.Module, head: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    store: list[torch.Tensor] = []
    h = head.register_forward_hook(lambda m, i, o: store.append(i[0]))
    try:
        logits = model(x)
    finally:
        h.remove()
    return store[0], logits


@torch.no_grad()
def _banks(model: nn.Module, head: nn.Linear, x: torch.Tensor, device, bs: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    feats, probs = [], []
    try:
        for s in range(0, len(x), bs):
            f, logits = _features_and_logits(model, head, x[s:s + bs].to(device))
            feats.append(F.normalize(f.flatten(1), dim=1))
            probs.append(F.softmax(logits, -1))
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(probs)


def nrc_attack(model: nn.Module, domain: Domain, config: NRCAttackConfig | Mapping[str, Any] | None = None, *,
               acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """NRC source-free adaptation of a copy of ``model`` to the unlabelled train split of ``domain``
    (see the module doc); accuracy on its test split before and after."""
    from ipshield.protect.restrict import train_tensors

    name = "nrc"
    cfg = as_config(NRCAttackConfig, config, overrides)
    check_target(name, "classifier", model)
    _check_domain(name, domain)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if acc_before is None:
        acc_before = _eval(model, domain, cfg)
    x, _ = train_tensors(domain, cfg.n_train, cfg.image_size, cfg.seed)  # labels never used
    attacked = copy.deepcopy(model).to(device)
    head = _last_linear(attacked, name)
    for p in attacked.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(attacked.parameters(), lr=cfg.lr)
    feat_bank, score_bank = _banks(attacked, head, x, device)
    n = len(x)
    k = min(cfg.k_neighbors, n - 1)
    kk = min(cfg.k_expanded, n - 1)
    _set_bn(attacked, cfg.bn_mode)
    bs = min(cfg.batch_size, n)
    for _ in progress(range(cfg.steps), desc=name):
        idx = torch.randperm(n, generator=g)[:bs].to(device)
        f, logits = _features_and_logits(attacked, head, x[idx.cpu()].to(device))
        f = F.normalize(f.flatten(1), dim=1)
        p = F.softmax(logits, -1)
        loss = torch.zeros((), device=device)
        if k >= 1:
            with torch.no_grad():
                own = score_bank[idx].clone()
                feat_bank[idx] = f.detach()
                score_bank[idx] = p.detach()
                dist = f.detach() @ feat_bank.t()
                dist[torch.arange(len(idx), device=device), idx] = -1.0  # not its own neighbour
                near = dist.topk(k, dim=1).indices  # [B, K]
                # the neighbours' own neighbourhoods: reciprocal when the image is among them
                dist_nn = feat_bank[near] @ feat_bank.t()  # [B, K, N]
                dist_nn.scatter_(2, near.unsqueeze(-1), -1.0)  # a neighbour is not its own neighbour
                near_near = dist_nn.topk(max(k, kk), dim=2).indices  # [B, K, max(K, KK)]
                reciprocal = (near_near[:, :, :k] == idx.view(-1, 1, 1)).any(-1).float()
                w = reciprocal + (1 - reciprocal) * cfg.weight_nonreciprocal
                score_near = score_bank[near]  # [B, K, C]
            loss = loss - (w * (p.unsqueeze(1) * score_near).sum(-1)).sum(1).mean()
            if kk >= 1 and cfg.weight_expanded > 0:
                with torch.no_grad():
                    exp_idx = near_near[:, :, :kk].reshape(len(idx), -1)  # [B, K*KK]
                    mask = (exp_idx != idx.view(-1, 1)).float()  # the image itself is no expanded neighbour
                    score_exp = score_bank[exp_idx]
                loss = loss - cfg.weight_expanded * (mask * (p.unsqueeze(1) * score_exp).sum(-1)).sum(1).mean()
            loss = loss - (p * own).sum(1).mean()  # self-regularisation
        pm = p.mean(0)
        loss = loss + cfg.diversity * (pm * torch.log(pm + 1e-6)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    attacked.eval()
    return {"attack": name, "domain": domain.name, "n_train": int(n), "steps": cfg.steps, "acc_before": acc_before,
            "acc_after": _eval(attacked, domain, cfg), "seconds": round(time.time() - t0, 1), "model": attacked}


@ATTACKS.register("nrc", config=NRCAttackConfig, target="classifier", budget="n_train",
                  description="NRC source-free adaptation (neighbourhood reciprocal clustering) on unlabelled images "
                              "of the unauthorized domain")
def run_nrc(target: nn.Module, config: NRCAttackConfig | Mapping[str, Any] | None = None, *,
            domain: Domain) -> dict[str, Any]:
    """``run(target, config, domain=)`` of ``nrc`` (see :func:`nrc_attack`)."""
    return nrc_attack(target, domain, config)
