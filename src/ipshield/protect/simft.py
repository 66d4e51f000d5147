"""Simulated fine-tuning [ours, in the spirit of SOPHON (Deng et al., IEEE S&P 2024): built from the
idea, without the paper's code or losses]: a copy of the protected model is fine-tuned as an attacker
would (k labelled unauthorized images, a few optimiser steps, the final layer re-initialised some of
the time as NTLBench's initFC attacks do), and the gradient of the fine-tuned copy's restricted loss
is returned (first order, as first-order MAML: the gradient at the fine-tuned weights is applied to
the starting weights). ``sophon`` adds it to its weights' gradient; MAP's ``finetune_sims`` option
maps it onto the mask scores.

The restricted loss is the KL divergence of the prediction from the uniform distribution (an
uninformative output; its gradient in the logits, ``p - 1/C``, is bounded).
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

    def __init__(self, x: torch.Tensor, y: torch.Tensor, attacker: SimulatedAttacker, g: torch.Generator):
        self.x, self.y, self.att, self.g = x, y, attacker, g
        self.stream = BatchStream(x, y, batch_size=attacker.batch_size, generator=g)

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
    """Fine-tune a copy of ``model`` as ``pool.att`` says, then return the gradient of its restricted
    loss (KL from uniform) on images it was not fine-tuned on, per parameter of ``model`` (None for a
    re-initialised final layer and for parameters the loss does not reach; all None when the
    fine-tuning diverged). ``model`` is unchanged."""
    from ipshield.models.classifiers import random_shift

    att = pool.att
    sim = copy.deepcopy(model)
    head_ids: set[int] = set()
    if bool(torch.rand((), generator=g) < att.init_fc_prob):
        head = final_linear(sim)
        head.reset_parameters()
        head_ids = {id(p) for p in head.parameters()}
    params = list(sim.parameters())
    for p in params:
        p.requires_grad_(True)
    if att.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=att.lr)
    else:
        opt = torch.optim.SGD(params, lr=att.lr, momentum=0.9)
    inner, (ox, oy) = pool.draw()
    set_bn_mode(sim, att.bn)
    for _ in range(att.steps):
        x, y = inner.next()
        if att.augment:
            x = random_shift(x, 2, g)
        loss = F.cross_entropy(sim(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sim.eval()
    outer = uniform_kl(sim(ox.to(device)), oy.to(device))
    grads = torch.autograd.grad(outer, params, allow_unused=True)
    if not all(gr is None or bool(torch.isfinite(gr).all()) for gr in grads):
        return [None] * len(params)  # the simulated fine-tuning diverged: it says nothing about the weights
    return [None if id(p) in head_ids else gr for p, gr in zip(params, grads)]
