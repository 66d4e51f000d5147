"""Non-fine-tunable restriction in the spirit of SOPHON (Deng et al., IEEE S&P 2024) [ours: built
from the issue's description of the idea, without the paper's code or exact losses].

The protected classifier is trained so that (1) it keeps its accuracy on the authorized domain,
(2) it is useless on the unauthorized (restricted) domain as it is, and (3) it stays useless
*after an attacker fine-tunes it there*: every outer step simulates that fine-tuning (an inner loop
of ``inner_steps`` SGD steps on labelled restricted images, starting from the current weights;
with probability ``init_fc_prob`` the final layer is re-initialised first, as NTLBench's initFC
attacks do) and adds the gradient of the fine-tuned copy's restricted loss to the protected weights
(first-order, as first-order MAML: the fine-tuned copy's gradient is applied to the starting
weights).

Restricted losses are the KL divergence of the prediction from the uniform distribution (an
uninformative output; its gradient in the logits, ``p - 1/C``, is bounded, where "inverse
cross-entropy" ``-log(1 - p_y)`` diverged in our first run: its gradient grows as ``1/(1 - p_y)``).
Authorized: cross-entropy, plus a KL term to the source model's predictions (keeps what the source
knew). The summed gradient is clipped to norm ``clip_norm``.
BatchNorm stays in eval mode throughout (the source statistics are kept, as in NTL here).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ipshield.data.domain import Domain
from ipshield.protect.restrict import (
    BatchStream,
    FinetuneRestrictionConfig,
    finish_run,
    kl_to_reference,
    prepare_run,
    require_classifier,
    restriction_job,
    set_bn_mode,
    step_decay,
    train_tensors,
)
from ipshield.registry import METHODS
from ipshield.utils import progress, resolve_device, seed_everything


class SophonConfig(FinetuneRestrictionConfig):
    #: SGD steps of each simulated fine-tuning (the attacker's inner loop)
    inner_steps: int = Field(5, ge=1)
    #: the simulated attacker's learning rate (SGD with momentum 0.9)
    inner_lr: float = Field(0.01, gt=0)
    #: simulated fine-tunings per outer step (their gradients are averaged)
    n_sims: int = Field(1, ge=1)
    #: chance that a simulation re-initialises the final layer first (initFC-all)
    init_fc_prob: float = Field(0.5, ge=0, le=1)
    #: weight of the restricted loss of the protected model itself
    w_restricted: float = Field(1.0, ge=0)
    #: weight of the restricted loss after the simulated fine-tuning
    w_finetuned: float = Field(1.0, ge=0)
    #: weight of the KL to the source model on authorized images
    w_keep: float = Field(1.0, ge=0)
    #: the gradient's norm is clipped to this
    clip_norm: float = Field(5.0, gt=0)
    steps: int = 300
    lr: float = 3e-4


def uniform_kl(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(uniform || softmax(logits)) = -mean_c log p_c - log C: zero when the output says
    nothing. (``y`` is unused: the same loss whatever the label.)"""
    return (-F.log_softmax(logits, dim=1).mean(1)).mean() - float(torch.log(torch.tensor(float(logits.shape[1]))))


def _final_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the classifier has no final linear layer")
    return last


def simulated_finetune_grads(model: nn.Module, stream: BatchStream, config: SophonConfig, device,
                             reinit_head: bool, g: torch.Generator) -> list[torch.Tensor | None]:
    """Fine-tune a copy like an attacker would, then return the gradient of its restricted loss
    (KL from uniform) on a fresh batch, per parameter of ``model`` (None for the re-initialised head)."""
    sim = copy.deepcopy(model)
    set_bn_mode(sim, "eval")
    head_ids: set[int] = set()
    if reinit_head:
        head = _final_linear(sim)
        head.reset_parameters()
        head_ids = {id(p) for p in head.parameters()}
    params = list(sim.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=config.inner_lr, momentum=0.9)
    for _ in range(config.inner_steps):
        x, y = stream.next()
        loss = F.cross_entropy(sim(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    x, y = stream.next()
    outer = uniform_kl(sim(x.to(device)), y.to(device))
    grads = torch.autograd.grad(outer, params, allow_unused=True)
    return [None if id(p) in head_ids else gr for p, gr in zip(params, grads)]


def protect(source_model, config: SophonConfig, authorized: Domain, unauthorized: list[Domain]) -> tuple[Any, dict]:
    seed_everything(config.seed)
    g = torch.Generator().manual_seed(config.seed + 13)
    device = resolve_device(config.device)
    model = copy.deepcopy(source_model).to(device)
    reference = copy.deepcopy(source_model).to(device).eval()
    xs, ys = train_tensors(authorized, config.n_train, config.image_size, config.seed)
    parts = [train_tensors(d, config.n_train, config.image_size, config.seed) for d in unauthorized]
    src = BatchStream(xs, ys, batch_size=config.batch_size, generator=g)
    tgt = BatchStream(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), batch_size=config.batch_size, generator=g)
    sim_stream = BatchStream(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), batch_size=config.batch_size,
                             generator=g)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = step_decay(opt, config.lr_decay)
    set_bn_mode(model, "eval")
    history = []
    for step in progress(range(config.steps), desc="sophon"):
        bx, by = src.next()
        tx, ty = tgt.next()
        bx, by, tx, ty = bx.to(device), by.to(device), tx.to(device), ty.to(device)
        logits = model(torch.cat([bx, tx]))
        la, lu = logits[: len(bx)], logits[len(bx):]
        with torch.no_grad():
            ref = F.softmax(reference(bx), dim=1)
        ce_a = F.cross_entropy(la, by)
        keep = kl_to_reference(ref, la)
        inv_u = uniform_kl(lu, ty)
        loss = ce_a + config.w_keep * keep + config.w_restricted * inv_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.w_finetuned > 0:
            sims = [simulated_finetune_grads(model, sim_stream, config, device,
                                             bool(torch.rand((), generator=g) < config.init_fc_prob), g)
                    for _ in range(config.n_sims)]
            for i, p in enumerate(params):
                parts_i = [s[i] for s in sims if s[i] is not None]
                if parts_i:
                    extra = config.w_finetuned * torch.stack(parts_i).mean(0)
                    p.grad = extra if p.grad is None else p.grad + extra
        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == config.steps - 1:
            history.append({"step": step, "ce_a": round(ce_a.item(), 4), "kl_u": round(inv_u.item(), 4),
                            "keep": round(keep.item(), 4)})
    model.eval()
    return model, {"history": history}


def run(config: SophonConfig, source_model, authorized: Domain, unauthorized: list[Domain], out=None) -> dict[str, Any]:
    """Protect against use *and* fine-tuning on the unauthorized domains (simulated fine-tuning)."""
    t0 = time.time()
    require_classifier(source_model)
    unauth, before = prepare_run(config, source_model, authorized, unauthorized)
    protected, info = protect(source_model, config, authorized, unauth)
    return finish_run("sophon", config, source_model, protected, authorized, unauth, out, t0, before=before,
                      history=info["history"])


METHODS.register("sophon", config=SophonConfig, model="classifier", data=("authorized", "unauthorized"),
                 scenarios=("target-specified",),
                 description="non-fine-tunable restriction: trained against simulated fine-tuning on the unauthorized domain "
                             "(in the spirit of SOPHON)")(restriction_job(run))
