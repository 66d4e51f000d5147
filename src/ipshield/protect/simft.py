"""Simulated fine-tuning [ours, in the spirit of SOPHON (Deng et al., IEEE S&P 2024): built from the
idea, without the paper's code or losses]: a copy of the protected model is fine-tuned as an attacker
would (k labelled unauthorized images, a few optimiser steps, the final layer re-initialised some of
the time as NTLBench's initFC attacks do), and the gradient of the fine-tuned copy's restricted loss
is returned (first order, as first-order MAML: the gradient at the fine-tuned weights is applied to
the starting weights). ``sophon`` adds it to its weights' gradient; MAP's ``finetune_sims`` option
maps it onto the mask scores.

The restricted loss is the KL divergence of the prediction from the uniform distribution (an
uninformative output; its gradient in the logits, ``p - 1/C``, is bounded).

Three simulated attackers (``SimulatedAttacker.kinds``; each simulation draws one), named as the
attacks of ``ipshield.attacks`` they stand for [ours: shortened to the inner loop's steps]:

- ``finetune``: cross-entropy on k labelled restricted images (NTLBench's strategies);
- ``shot``: SHOT's information maximisation (entropy of each prediction minus the entropy of the
  batch mean) on unlabelled restricted images, the final layer frozen as SHOT freezes it (SHOT's
  pseudo-label term is left out of the simulation);
- ``transntl``: TransNTL-style repair, self-distillation from a frozen copy's predictions on clean
  *authorized* images to the copy on randomly domain-shifted ones (no restricted image in the
  inner loop; the fine-tuned copy is still scored on restricted images).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.protect.restrict import BatchStream, set_bn_mode


@dataclass(frozen=True)
class SimulatedAttacker:
    """How the simulated attacker fine-tunes (the fields of the methods' configs, gathered)."""

    steps: int = 10
    lr: float = 1e-3
    #: "adam" (what the fine-tuning attacks of ``ipshield.attacks`` use) or "sgd" (momentum 0.9)
    optimizer: Literal["sgd", "adam"] = "adam"
    #: BatchNorm during the fine-tuning: "train" (re-estimated on the attacker's batches, as the
    #: attacks do by default) or "eval" (the protected model's statistics)
    bn: Literal["eval", "train"] = "train"
    #: labelled images per attacker (0 = batches from the whole pool); several: each simulation
    #: picks one of them at random
    k: int | tuple[int, ...] = 10
    batch_size: int = 32
    #: chance that the attacker re-initialises the final layer first (initFC)
    init_fc_prob: float = 0.5
    #: random shifts of the attacker's batches (as the attacks' ``augment``)
    augment: bool = True
    #: the simulated attackers and their weights (each simulation draws one: "finetune", "shot",
    #: "transntl"; see the module doc)
    kinds: tuple[tuple[str, float], ...] = (("finetune", 1.0),)
    #: ``transntl``: strength of the random domain shifts, distillation temperature, weight of the
    #: clean images (as ``TransNTLConfig``)
    shift_strength: float = 0.6
    temperature: float = 2.0
    clean_weight: float = 0.5


#: the simulated attackers a method may ask for
SIM_KINDS = ("finetune", "shot", "transntl")


def uniform_kl(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(uniform || softmax(logits)) = -mean_c log p_c - log C: zero when the output says
    nothing. (``y`` is unused: the same loss whatever the label.)"""
    return (-F.log_softmax(logits, dim=1).mean(1)).mean() - float(torch.log(torch.tensor(float(logits.shape[1]))))


def final_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the classifier has no final linear layer")
    return last


class SimPool:
    """The simulated attackers' data: either one stream over the whole unauthorized pool, or (with
    ``k``) a fresh set of k labelled images per simulation plus the images it is scored on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, attacker: SimulatedAttacker, g: torch.Generator,
                 authorized: torch.Tensor | None = None):
        self.x, self.y, self.att, self.g = x, y, attacker, g
        self.stream = BatchStream(x, y, batch_size=attacker.batch_size, generator=g)
        unknown = [k for k, _ in attacker.kinds if k not in SIM_KINDS]
        if unknown:
            raise ValueError(f"unknown simulated attacker(s) {unknown}; choose among {list(SIM_KINDS)}")
        if any(k == "transntl" and w > 0 for k, w in attacker.kinds) and authorized is None:
            raise ValueError("the transntl simulation needs the authorized images")
        #: authorized images (the ``transntl`` simulation repairs on them)
        self.auth = (BatchStream(authorized, torch.zeros(len(authorized), dtype=torch.long), batch_size=attacker.batch_size,
                                 generator=g) if authorized is not None else None)

    def kind(self) -> str:
        """The attacker of the next simulation (drawn only when there is a choice, so a single kind
        leaves the random stream as it was)."""
        kinds = [(k, w) for k, w in self.att.kinds if w > 0]
        if len(kinds) == 1:
            return kinds[0][0]
        w = torch.tensor([w for _, w in kinds], dtype=torch.float)
        return kinds[int(torch.multinomial(w, 1, generator=self.g))][0]

    def draw(self) -> tuple[BatchStream, tuple[torch.Tensor, torch.Tensor]]:
        """(the inner loop's batch source, the outer batch)"""
        ks = self.att.k if isinstance(self.att.k, tuple) else (self.att.k,)
        k = ks[int(torch.randint(len(ks), (), generator=self.g))] if len(ks) > 1 else ks[0]
        if k <= 0 or k >= len(self.y):
            return self.stream, self.stream.next()
        perm = torch.randperm(len(self.y), generator=self.g)
        own, rest = perm[:k], perm[k:k + self.att.batch_size]
        return BatchStream(self.x[own], self.y[own], batch_size=self.att.batch_size, generator=self.g), (self.x[rest], self.y[rest])


def finetuned_restricted_grads(model: nn.Module, pool: SimPool, device, g: torch.Generator) -> list[torch.Tensor | None]:
    """Fine-tune a copy of ``model`` as one of ``pool.att``'s attackers would, then return the
    gradient of its restricted loss (KL from uniform) on images it was not fine-tuned on, per
    parameter of ``model`` (None for a re-initialised final layer and for parameters the loss does not
    reach; all None when the fine-tuning diverged). ``model`` is unchanged."""
    from ipshield.models.classifiers import random_domain_shift, random_shift

    att = pool.att
    kind = pool.kind()
    sim = copy.deepcopy(model)
    head_ids: set[int] = set()
    frozen: set[int] = set()
    if kind == "finetune" and bool(torch.rand((), generator=g) < att.init_fc_prob):
        head = final_linear(sim)
        head.reset_parameters()
        head_ids = {id(p) for p in head.parameters()}
    elif kind == "shot":
        frozen = {id(p) for p in final_linear(sim).parameters()}  # SHOT keeps the source hypothesis
    teacher = None
    if kind == "transntl":
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = list(sim.parameters())
    for p in params:
        p.requires_grad_(True)
    trained = [p for p in params if id(p) not in frozen]
    if att.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(trained, lr=att.lr)
    else:
        opt = torch.optim.SGD(trained, lr=att.lr, momentum=0.9)
    if kind == "finetune":
        inner, (ox, oy) = pool.draw()
    else:
        inner, (ox, oy) = pool.stream, pool.stream.next()
    set_bn_mode(sim, att.bn)
    for _ in range(att.steps):
        if kind == "transntl":
            loss = _repair_loss(sim, teacher, pool.auth.next()[0].to(device), att, g, random_domain_shift)
        else:
            x, y = inner.next()
            if att.augment:
                x = random_shift(x, 2, g)
            logits = sim(x.to(device))
            loss = F.cross_entropy(logits, y.to(device)) if kind == "finetune" else information_max(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sim.eval()
    outer = uniform_kl(sim(ox.to(device)), oy.to(device))
    grads = torch.autograd.grad(outer, params, allow_unused=True)
    if not all(gr is None or bool(torch.isfinite(gr).all()) for gr in grads):
        return [None] * len(params)  # the simulated fine-tuning diverged: it says nothing about the weights
    return [None if id(p) in head_ids else gr for p, gr in zip(params, grads)]


def information_max(logits: torch.Tensor) -> torch.Tensor:
    """SHOT's information maximisation: mean entropy of the predictions minus the entropy of their
    mean (confident, and spread over the classes)."""
    p = F.softmax(logits, -1)
    ent = -(p * torch.log(p + 1e-6)).sum(1).mean()
    pm = p.mean(0)
    return ent + (pm * torch.log(pm + 1e-6)).sum()


def _repair_loss(sim: nn.Module, teacher: nn.Module, clean: torch.Tensor, att: SimulatedAttacker, g: torch.Generator,
                 shift) -> torch.Tensor:
    """TransNTL-style self-distillation: the copy on shifted (and clean) authorized images against the
    frozen teacher's clean predictions, at temperature ``att.temperature``."""
    t = att.temperature
    shifted = shift(clean.cpu(), att.shift_strength, g).to(clean.device)
    with torch.no_grad():
        target = F.softmax(teacher(clean) / t, -1)
    logits = sim(torch.cat([shifted, clean])) / t
    kl = F.kl_div(F.log_softmax(logits, -1), torch.cat([target, target]), reduction="none").sum(1) * t * t
    n = len(clean)
    return kl[:n].mean() + att.clean_weight * kl[n:].mean()
