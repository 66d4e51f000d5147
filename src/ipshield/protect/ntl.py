"""NTL, non-transferable learning (Wang et al., ICLR 2022), built from
../shared/specs/baselines.md (no reference code used):

    L = KL_s - min(1, alpha * KL_t) * min(1, alpha * MMD(phi(x_s), phi(x_t)))

KL_s, KL_t: KL between the one-hot label and the softmax (= cross-entropy); phi: the output of
the first ``mmd_stages`` feature stages (flattened); MMD: multi-kernel Gaussian (5 kernels,
multiplier 2, bandwidth from the joint batch). Adam with a 0.999 learning-rate decay per step.

[ours] Without an ImageNet-pretrained backbone, NTL starts from the trained source model and
fine-tunes all of its weights for ``steps`` steps (BatchNorm in eval mode by default, so the
source running statistics are kept); the protected model is an ordinary classifier.

Target-free NTL (``ntl-tf``) replaces the unauthorized data by generated neighbourhood data.
The paper uses a conditional GAN pushed away from the source by MMD; [ours] uses the simpler
label-preserving strong shifts of the source images of ``ipshield.protect.shifts`` (colour
inversion and mixing, coloured backgrounds, blur, noise, low resolution, stroke thickening, random
pixel statistics) as that neighbourhood: documented in docs/map.md.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ipshield.data.domain import Domain
from ipshield.protect.restrict import (
    BatchStream,
    FinetuneRestrictionConfig,
    finish_run,
    prepare_run,
    restriction_job,
    mmd_multi_kernel,
    require_classifier,
    set_bn_mode,
    staged_net,
    step_decay,
    train_tensors,
)
from ipshield.registry import METHODS
from ipshield.utils import progress, seed_everything, resolve_device


class NTLConfig(FinetuneRestrictionConfig):
    #: phi = output of this many feature stages
    mmd_stages: int = 2
    n_kernels: int = 5
    kernel_multiplier: float = 2.0
    bn_mode: Literal["eval", "train"] = "eval"
    #: shifts composed per generated neighbourhood image (target-free)
    n_shift_compose: int = 2


def _forward_with_phi(model, net, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.preprocess(x) if hasattr(model, "preprocess") else x
    phi = None
    for i, stage in enumerate(net.stages):
        h = stage(h)
        if i + 1 == k:
            phi = h
    assert phi is not None
    return net.head(h), phi


def protect(source_model, config: NTLConfig, authorized: Domain, unauthorized: list[Domain]) -> tuple[Any, dict]:
    from ipshield.protect.shifts import neighbour_shift

    seed_everything(config.seed)
    g = torch.Generator().manual_seed(config.seed + 11)
    device = resolve_device(config.device)
    model = copy.deepcopy(source_model).to(device)
    net = staged_net(model, "NTL")
    k = max(1, min(config.mmd_stages, len(net.stages)))
    xs, ys = train_tensors(authorized, config.n_train, config.image_size, config.seed)
    src = BatchStream(xs, ys, batch_size=config.batch_size, generator=g)
    if not config.target_free:
        parts = [train_tensors(d, config.n_train, config.image_size, config.seed) for d in unauthorized]
        tgt = BatchStream(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), batch_size=config.batch_size, generator=g)
    else:
        tgt = BatchStream(xs, ys, batch_size=config.batch_size, generator=g)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = step_decay(opt, config.lr_decay)
    set_bn_mode(model, config.bn_mode)
    history = []
    for step in progress(range(config.steps), desc="ntl-tf" if config.target_free else "ntl"):
        bx, by = src.next()
        tx, ty = tgt.next()
        if config.target_free:
            tx = neighbour_shift(tx, g, n_compose=config.n_shift_compose)
        bx, by, tx, ty = bx.to(device), by.to(device), tx.to(device), ty.to(device)
        if config.bn_mode == "eval":
            logits, phi = _forward_with_phi(model, net, torch.cat([bx, tx]), k)
            ls_logits, lt_logits, phi_s, phi_t = logits[: len(bx)], logits[len(bx):], phi[: len(bx)], phi[len(bx):]
        else:  # separate batches: each domain normalised with its own batch statistics
            ls_logits, phi_s = _forward_with_phi(model, net, bx, k)
            lt_logits, phi_t = _forward_with_phi(model, net, tx, k)
        kl_s = F.cross_entropy(ls_logits, by)
        kl_t = F.cross_entropy(lt_logits, ty)
        mmd = mmd_multi_kernel(phi_s, phi_t, config.n_kernels, config.kernel_multiplier)
        loss = kl_s - torch.clamp(config.alpha * kl_t, max=1.0) * torch.clamp(config.alpha * mmd, max=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == config.steps - 1:
            history.append({"step": step, "kl_s": kl_s.item(), "kl_t": kl_t.item(), "mmd": mmd.item()})
    model.eval()
    return model, {"history": history}


def run(config: NTLConfig, source_model, authorized: Domain, unauthorized: list[Domain], out=None) -> dict[str, Any]:
    """Protect with NTL (target-specified, or target-free when ``config.target_free``)."""
    t0 = time.time()
    require_classifier(source_model)
    unauth, before = prepare_run(config, source_model, authorized, unauthorized)
    protected, info = protect(source_model, config, authorized, unauth)
    name = "ntl-tf" if config.target_free else "ntl"
    return finish_run(name, config, source_model, protected, authorized, unauth, out, t0, before=before,
                      target_free=config.target_free, history=info["history"])


protect_job = restriction_job(run)
METHODS.register("ntl", config=NTLConfig, defaults={"target_free": False}, model="classifier",
                 data=("authorized", "unauthorized"), scenarios=("target-specified", "ownership", "target-free"),
                 description="non-transferable learning (target-free with --scenario target-free)")(protect_job)
METHODS.register("ntl-tf", config=NTLConfig, defaults={"target_free": True}, model="classifier", data=("authorized",),
                 scenarios=("target-free",),
                 description="target-free NTL: generated neighbourhood data instead of unauthorized data")(protect_job)
