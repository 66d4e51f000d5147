"""NTL-prompt: CoOp-style prompts on the frozen CLIP trained with the NTL objective
(../shared/specs/baselines.md), the simplest protected prompt baseline for IP-CLIP.

    L = KL_s - min(1, alpha * KL_t) * min(1, beta * MMD(phi(x_s), phi(x_t)))

KL = cross-entropy / C (the one-hot KL of the NTL reference). The NTL paper's phi is the output of
the first CNN blocks; on a frozen CLIP the image features do not depend on the prompt, so their
MMD would be a constant. [ours] phi is what the prompt does change: the image-text cosine
profile over the classes [B, C]. The unauthorized data per scenario are IP-CLIP's
(``ipshield.protect.ipclip.build_streams``). The prompt learner is the lead's ``CoOpModel``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ipshield.config import BaseConfig
from ipshield.data.domain import Domain
from ipshield.protect.coop import CoOpModel
from ipshield.protect.ipclip import Scenario, build_streams
from ipshield.protect.prompting import init_context
from ipshield.protect.ipclip_run import prompt_job
from ipshield.protect.restrict import mmd_multi_kernel
from ipshield.registry import METHODS
from ipshield.protect.training import cosine_with_warmup, epoch_batches
from ipshield.utils import progress, resolve_device, seed_everything


class NTLPromptConfig(BaseConfig):
    scenario: Scenario = "target-specified"
    n_ctx: int = 8
    ctx_init: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.002
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    max_train: int | None = 2000
    #: weights inside the two min(1, .) factors [NTL: 0.1 and 0.1]
    alpha: float = 0.1
    beta: float = 0.1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@torch.no_grad()
def _features(adapter, stream, device, bs: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(0, len(stream), bs):
        x = stream.batch(torch.arange(s, min(len(stream), s + bs)), g, augment=False)
        out.append(adapter.encode_image(adapter.preprocess(x.to(device)), normalize=True).float())
    return torch.cat(out)


def train_ntl_prompt(adapter, authorized: Domain, unauthorized: Sequence[Domain] = (),
                     config: NTLPromptConfig | None = None, verbose: bool = True) -> CoOpModel:
    """Learn a CoOp prompt with the NTL objective; the frozen image tower runs once per image."""
    config = config or NTLPromptConfig()
    g = seed_everything(config.seed)
    device = resolve_device(config.device)
    adapter.to(device)
    stream_a, stream_u = build_streams(authorized, unauthorized, config.scenario, config.max_train, config.seed,
                                       size=adapter.image_size)
    fa, fu = _features(adapter, stream_a, device), _features(adapter, stream_u, device)
    ya, yu = stream_a.labels.to(device), stream_u.labels.to(device)
    model = CoOpModel(adapter, authorized.classes, config.n_ctx,
                      init_context(adapter, config.n_ctx, config.ctx_init, g)).to(device)
    C = len(authorized.classes)
    bs = min(config.batch_size, len(stream_a))
    steps = max(1, len(stream_a) // bs)
    opt = torch.optim.Adam([model.ctx], lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_with_warmup(opt, config.warmup_epochs * steps, config.epochs * steps)
    model.train()
    history = []
    for epoch in progress(range(config.epochs), desc=f"ntl-prompt {config.scenario}", enabled=verbose):
        sums = {"kl_s": 0.0, "kl_t": 0.0, "mmd": 0.0, "total": 0.0}
        for idx in epoch_batches(len(stream_a), bs, g):
            iu = torch.randint(len(stream_u), (len(idx),), generator=g).to(device)
            idx = idx.to(device)
            text = model.text_features()
            za, zu = model.logits(fa[idx], text), model.logits(fu[iu], text)
            kl_s = F.cross_entropy(za, ya[idx]) / C
            kl_t = F.cross_entropy(zu, yu[iu]) / C
            scale = adapter.logit_scale.exp()
            mmd = mmd_multi_kernel(za / scale, zu / scale)
            loss = kl_s - torch.clamp(config.alpha * kl_t, max=1.0) * torch.clamp(config.beta * mmd, max=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in (("kl_s", kl_s), ("kl_t", kl_t), ("mmd", mmd), ("total", loss)):
                sums[k] += float(v.detach()) / steps
        history.append({"epoch": epoch + 1, **sums})
    model.eval()
    model.history = history
    return model


@METHODS.register("ntl-prompt", config=NTLPromptConfig, model="clip", data=("authorized", "unauthorized"),
                  scenarios=("target-specified", "ownership", "target-free", "authorization"),
                  description="baseline: a CoOp prompt trained with the NTL objective on the frozen CLIP")
def ntl_prompt_job(job, config: NTLPromptConfig) -> dict:
    """The NTL-prompt baseline, in the same run-folder shape as IP-CLIP."""
    return prompt_job("ntl-prompt", job, config, train_ntl_prompt)
