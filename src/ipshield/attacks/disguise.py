"""``disguise``: a black-box input-disguise attack in the spirit of JailNTL (CVPR 2025), built from
its description [ours]. The protected model is never changed and never differentiated: the
attacker only reads its OUTPUTS (softmax probabilities) on images it sends, and learns a small
image-to-image translator (a few 3x3 convolutions, a residual on the input) that disguises
unauthorized images as authorized ones.

1. *Queries.* The attacker holds a ``fraction`` (1 %) of the authorized training images (no
   labels) and ``n_unlabelled`` unlabelled unauthorized images, and queries the protected model on
   them (and on shifted copies).
2. *Surrogate.* A small CNN trained from scratch to mimic those outputs (KL to the protected
   model's probabilities): the differentiable stand-in for the black box.
3. *Translator.* Trained on unauthorized images only, through the frozen surrogate: the surrogate
   must be confident on the translated image (low entropy) while the batch stays class-diverse
   (information maximisation), its prediction must not change under a small shift of the input
   (class consistency), the translated image must keep the input's shape (content: the absolute
   correlation of the grey-level images, so a colour change or an inversion is free), and its
   style must match the authorized images (per-channel mean and std of the pixels and of the
   surrogate's first feature maps). Every ``query_every`` translator steps the protected model
   is queried on a batch of translated images and the surrogate is refreshed on everything queried
   so far, so the translator cannot live off the surrogate's mistakes.

The attacked accuracy is the protected model's accuracy on translated unauthorized test images;
``queries`` counts every image sent to the protected model. ``"model"`` in the result is the
disguised pipeline (translator, then the untouched protected model).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ipshield.attacks.domain import AttackConfig, _eval
from ipshield.attacks.sourcedata import frozen_copy, source_attack_setup
from ipshield.data.domain import Domain
from ipshield.registry import ATTACKS
from ipshield.utils import progress


class DisguiseConfig(AttackConfig):
    budget_field: ClassVar[str] = "fraction"

    #: share of the authorized training images the attacker holds (unlabelled; the black box labels them)
    fraction: float = Field(0.01, le=1.0, description="share of the authorized training images the attacker holds")
    #: unlabelled unauthorized training images (at most; all the domain has when fewer)
    n_unlabelled: int = Field(1000, ge=1)
    surrogate_arch: str = "vgg-tiny"
    surrogate_steps: int = 150
    steps: int = 150
    #: query the protected model on translated images (and refresh the surrogate) every this many steps; 0 = never
    query_every: int = Field(30, ge=0)
    refresh_steps: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    #: translator width (channels) and depth (3x3 conv layers)
    width: int = Field(16, ge=1)
    depth: int = Field(4, ge=2)
    style_weight: float = 1.0
    content_weight: float = 1.0
    consistency_weight: float = 1.0
    diversity_weight: float = 1.0
    n_test: int | None = None
    image_size: int = 32
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"


class Translator(nn.Module):
    """x -> clamp(x + f(x), 0, 1) with f a few 3x3 conv layers (the last one starts at zero: identity)."""

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for _ in range(depth - 1):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
        last = nn.Conv2d(cin, 3, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.f = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.f(x)).clamp(0, 1)


class DisguisedClassifier(nn.Module):
    """The attacker's pipeline: translate, then ask the (unchanged) protected model."""

    def __init__(self, translator: Translator, target: nn.Module):
        super().__init__()
        self.translator = translator
        self.target = target
        self.classes = list(getattr(target, "classes", []))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.target(self.translator(images))

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self(images)


def _stats(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.mean((0, 2, 3)), t.std((0, 2, 3))])


def _first_maps(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The surrogate's first feature maps (its first stage when it has ``stages``)."""
    inner = getattr(net, "net", net)
    if hasattr(inner, "stages") and hasattr(net, "preprocess"):
        return inner.stages[0](net.preprocess(x))
    return x


def _grey_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ga, gb = a.mean(1).flatten(1), b.mean(1).flatten(1)
    ga = ga - ga.mean(1, keepdim=True)
    gb = gb - gb.mean(1, keepdim=True)
    return (ga * gb).sum(1) / (ga.norm(dim=1) * gb.norm(dim=1) + 1e-6)


def disguise_attack(model: nn.Module, domain: Domain, authorized: Domain | None,
                    config: DisguiseConfig | Mapping[str, Any] | None = None, *,
                    acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a translator from the protected model's outputs only (see the module doc); the
    attacked accuracy is the protected model's on translated unauthorized test images."""
    from ipshield.models.classifiers import create_classifier, random_shift
    from ipshield.protect.restrict import train_tensors

    name = "disguise"
    t0 = time.time()
    cfg, authorized, n_auth, g, device = source_attack_setup(name, DisguiseConfig, model, domain, authorized, config,
                                                             overrides)
    target = frozen_copy(model, device)  # the attacker's black box; the caller's model is never touched
    if acc_before is None:
        acc_before = _eval(target, domain, cfg)
    xa, _ = train_tensors(authorized, n_auth, cfg.image_size, cfg.seed)  # labels never used
    xu, _ = train_tensors(domain, cfg.n_unlabelled, cfg.image_size, cfg.seed)  # labels never used
    queries = 0

    @torch.no_grad()
    def query(x: torch.Tensor) -> torch.Tensor:
        """The black box: probabilities only, no gradient, the model unchanged."""
        nonlocal queries
        queries += len(x)
        out = [F.softmax(target(x[s:s + 256].to(device)), -1).cpu() for s in range(0, len(x), 256)]
        return torch.cat(out)

    # the queried pool: authorized images (and shifted copies, the attacker's cheap augmentation) and unauthorized ones
    pool_x = [xa, random_shift(xa, 2, g), xu]
    pool_p = [query(t) for t in pool_x]
    classes = list(getattr(model, "classes", [])) or [str(i) for i in range(pool_p[0].shape[1])]
    surrogate = create_classifier(cfg.surrogate_arch, classes, cfg.image_size).to(device)
    s_opt = torch.optim.Adam(surrogate.parameters(), lr=1e-3)
    auth_weight = 0.5  # half of each surrogate batch comes from the authorized images

    def fit_surrogate(steps: int) -> None:
        px, pp = torch.cat(pool_x), torch.cat(pool_p)
        n_a = 2 * len(xa)  # the first entries of the pool are authorized
        surrogate.train()
        for _ in range(steps):
            bs_a = max(1, int(cfg.batch_size * auth_weight))
            ia = torch.randint(0, n_a, (bs_a,), generator=g)
            io = torch.randint(n_a, len(px), (cfg.batch_size - bs_a,), generator=g) if len(px) > n_a else ia[:0]
            idx = torch.cat([ia, io])
            logits = surrogate(px[idx].to(device))
            loss = F.kl_div(F.log_softmax(logits, -1), pp[idx].to(device), reduction="batchmean")
            s_opt.zero_grad(set_to_none=True)
            loss.backward()
            s_opt.step()
        surrogate.eval()

    fit_surrogate(cfg.surrogate_steps)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        style_pix = _stats(xa.to(device))
        style_feat = _stats(_first_maps(surrogate, xa.to(device)))

    translator = Translator(cfg.width, cfg.depth).to(device)
    t_opt = torch.optim.Adam(translator.parameters(), lr=cfg.lr)
    bs = min(cfg.batch_size, len(xu))
    for step in progress(range(cfg.steps), desc=name):
        if cfg.query_every and step and step % cfg.query_every == 0:
            with torch.no_grad():
                idx = torch.randperm(len(xu), generator=g)[:bs]
                xt = translator(xu[idx].to(device)).cpu()
            pool_x.append(xt)
            pool_p.append(query(xt))
            for p in surrogate.parameters():
                p.requires_grad_(True)
            fit_surrogate(cfg.refresh_steps)
            for p in surrogate.parameters():
                p.requires_grad_(False)
        translator.train()
        idx = torch.randperm(len(xu), generator=g)[:bs]
        xb = xu[idx].to(device)
        xt = translator(xb)
        p = F.softmax(surrogate(xt), -1)
        ent = -(p * torch.log(p + 1e-6)).sum(1).mean()
        pm = p.mean(0)
        div = (pm * torch.log(pm + 1e-6)).sum()  # negative entropy of the mean prediction
        p_shift = F.softmax(surrogate(translator(random_shift(xb, 2, g))), -1)
        consistency = F.kl_div(torch.log(p_shift + 1e-6), p.detach(), reduction="batchmean")
        content = (1 - _grey_corr(xt, xb).abs()).mean()
        style = F.mse_loss(_stats(xt), style_pix) + F.mse_loss(_stats(_first_maps(surrogate, xt)), style_feat)
        loss = (ent + cfg.diversity_weight * div + cfg.consistency_weight * consistency + cfg.content_weight * content
                + cfg.style_weight * style)
        t_opt.zero_grad(set_to_none=True)
        loss.backward()
        t_opt.step()
    translator.eval()
    for p in translator.parameters():
        p.requires_grad_(False)
    pipeline = DisguisedClassifier(translator, target).eval()
    acc_after = _eval(pipeline, domain, cfg)
    return {"attack": name, "domain": domain.name, "authorized": authorized.name, "fraction": cfg.fraction,
            "n_authorized": n_auth, "n_unlabelled": int(len(xu)), "queries": queries, "steps": cfg.steps,
            "acc_before": acc_before, "acc_after": acc_after, "seconds": round(time.time() - t0, 1),
            "model": pipeline}


@ATTACKS.register("disguise", config=DisguiseConfig, target="classifier", budget="fraction",
                  description="JailNTL-style black-box input disguise: a small translator learnt from the protected "
                              "model's outputs only (surrogate), 1 % of the authorized images, unlabelled unauthorized images")
def run_disguise(target: nn.Module, config: DisguiseConfig | Mapping[str, Any] | None = None, *,
                 domain: Domain, authorized: Domain | None = None) -> dict[str, Any]:
    """``run(target, config, domain=, authorized=)`` of ``disguise`` (see :func:`disguise_attack`)."""
    return disguise_attack(target, domain, authorized, config)
