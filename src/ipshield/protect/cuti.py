"""CUTI-domain ("Model Barrier", Wang et al., CVPR 2023), built from
../shared/specs/baselines.md (no reference code used).

Authorized and unauthorized images share one batch (equal halves). On every
``restyle_every``-th iteration, after each feature stage, the unauthorized half is restyled with
the authorized half's per-instance channel statistics passed through 1x1 convolutions and a
sigmoid, ``f_u * sigmoid(W_sigma sigma_a) + sigmoid(W_mu mu_a)``: the "isolation domain"
(unauthorized content carrying authorized style). Loss ``KL_a - min(1, alpha * KL_u)``
(KL to the one-hot label = cross-entropy), no MMD.

The 1x1 convolutions [ours]: the reference re-creates them (random) at every forward pass, so
they are never learned and every restyled batch sees a different random projection. Here
``style_convs="fixed"`` (default) draws them once per stage from the run's seed and keeps them
fixed (random projections, reproducible, the same isolation domain all run long);
``style_convs="resample"`` reproduces the reference behaviour (new random convs at each forward).

As for NTL, [ours]: training starts from the trained source model (all weights fine-tuned,
BatchNorm in eval mode by default). ``target_free`` uses the generated neighbourhood data of
``ipshield.protect.shifts`` as the unauthorized half.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.data.domain import Domain
from ipshield.protect.restrict import (
    BatchStream,
    FinetuneRestrictionConfig,
    finish_run,
    prepare_run,
    restriction_job,
    require_classifier,
    set_bn_mode,
    staged_net,
    step_decay,
    train_tensors,
)
from ipshield.registry import METHODS
from ipshield.utils import progress, seed_everything, resolve_device


class CUTIConfig(FinetuneRestrictionConfig):
    #: restyle the unauthorized half on every n-th iteration
    restyle_every: int = 2
    #: "fixed": 1x1 style convs drawn once (seeded) and kept; "resample": new random convs at every
    #: forward pass (reference-compatible)
    style_convs: Literal["fixed", "resample"] = "fixed"
    bn_mode: Literal["eval", "train"] = "eval"
    n_shift_compose: int = 2


class IsolationStyler(nn.Module):
    """Restyles the unauthorized half of a feature batch with the authorized half's statistics."""

    def __init__(self, channels: list[int], mode: str, generator: torch.Generator):
        super().__init__()
        self.mode = mode
        self.channels = channels
        self.sigma = nn.ModuleList([self._conv(c, generator) for c in channels])
        self.mu = nn.ModuleList([self._conv(c, generator) for c in channels])
        for p in self.parameters():
            p.requires_grad_(False)  # random projections, never learned (as in the reference)

    @staticmethod
    def _conv(c: int, generator: torch.Generator | None) -> nn.Conv2d:
        conv = nn.Conv2d(c, c, 1)
        if generator is not None:  # the default init of nn.Conv2d, drawn from our generator
            bound = 1.0 / (c ** 0.5)
            with torch.no_grad():
                conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * bound)
                conv.bias.copy_((torch.rand(conv.bias.shape, generator=generator) * 2 - 1) * bound)
        return conv

    def forward(self, h: torch.Tensor, stage: int, n_auth: int) -> torch.Tensor:
        ha, hu = h[:n_auth], h[n_auth:]
        if h.dim() != 4 or len(hu) != n_auth:
            return h
        mu_a = ha.mean((2, 3), keepdim=True)
        sd_a = (ha.var((2, 3), keepdim=True) + 1e-5).sqrt()
        if self.mode == "resample":
            conv_s = self._conv(h.shape[1], None).to(h.device)
            conv_m = self._conv(h.shape[1], None).to(h.device)
        else:
            conv_s, conv_m = self.sigma[stage], self.mu[stage]
        restyled = hu * torch.sigmoid(conv_s(sd_a)) + torch.sigmoid(conv_m(mu_a))
        return torch.cat([ha, restyled])


def _stage_channels(model, net, size: int) -> list[int]:
    with torch.no_grad():
        h = torch.zeros(2, 3, size, size, device=next(model.parameters()).device)
        h = model.preprocess(h) if hasattr(model, "preprocess") else h
        out = []
        was = net.training
        net.eval()
        for stage in net.stages:
            h = stage(h)
            out.append(h.shape[1])
        net.train(was)
    return out


def protect(source_model, config: CUTIConfig, authorized: Domain, unauthorized: list[Domain]) -> tuple[Any, dict]:
    from ipshield.protect.shifts import neighbour_shift

    seed_everything(config.seed)
    g = torch.Generator().manual_seed(config.seed + 13)
    device = resolve_device(config.device)
    model = copy.deepcopy(source_model).to(device)
    net = staged_net(model, "CUTI-domain")
    styler = IsolationStyler(_stage_channels(model, net, config.image_size), config.style_convs, g).to(device)
    xs, ys = train_tensors(authorized, config.n_train, config.image_size, config.seed)
    src = BatchStream(xs, ys, batch_size=config.batch_size, generator=g)
    if config.target_free:
        tgt = BatchStream(xs, ys, batch_size=config.batch_size, generator=g)
    else:
        parts = [train_tensors(d, config.n_train, config.image_size, config.seed) for d in unauthorized]
        tgt = BatchStream(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), batch_size=config.batch_size, generator=g)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = step_decay(opt, config.lr_decay)
    set_bn_mode(model, config.bn_mode)
    history = []
    for step in progress(range(config.steps), desc="cuti"):
        ax, ay = src.next()
        ux, uy = tgt.next()
        if config.target_free:
            ux = neighbour_shift(ux, g, n_compose=config.n_shift_compose)
        n = min(len(ax), len(ux))
        ax, ay, ux, uy = ax[:n].to(device), ay[:n].to(device), ux[:n].to(device), uy[:n].to(device)
        restyle = (step % config.restyle_every) == config.restyle_every - 1
        h = model.preprocess(torch.cat([ax, ux]))
        for i, stage in enumerate(net.stages):
            h = stage(h)
            if restyle:
                h = styler(h, i, n)
        logits = net.head(h)
        kl_a = F.cross_entropy(logits[:n], ay)
        kl_u = F.cross_entropy(logits[n:], uy)
        loss = kl_a - torch.clamp(config.alpha * kl_u, max=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == config.steps - 1:
            history.append({"step": step, "kl_a": kl_a.item(), "kl_u": kl_u.item(), "restyled": restyle})
    model.eval()
    return model, {"history": history}


def run(config: CUTIConfig, source_model, authorized: Domain, unauthorized: list[Domain], out=None) -> dict[str, Any]:
    """Protect with CUTI-domain."""
    t0 = time.time()
    require_classifier(source_model)
    unauth, before = prepare_run(config, source_model, authorized, unauthorized)
    protected, info = protect(source_model, config, authorized, unauth)
    return finish_run("cuti", config, source_model, protected, authorized, unauth, out, t0, before=before,
                      style_convs=config.style_convs, target_free=config.target_free, history=info["history"])


protect_job = restriction_job(run)
METHODS.register("cuti", config=CUTIConfig, model="classifier", data=("authorized", "unauthorized"),
                 scenarios=("target-specified", "ownership", "target-free"),
                 description="CUTI-domain: restyled unauthorized features pushed away from their labels")(protect_job)
