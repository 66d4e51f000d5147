"""Attacks on domain restriction that use the attacker's share of the *authorized* (source) data.

- ``source-finetune``: fine-tune every weight of a copy of the protected classifier with
  cross-entropy on a labelled ``fraction`` of the authorized training images. No unauthorized image
  is used: it measures how much of the restriction survives ordinary further training on the
  domain the owner allowed (NTLBench's source-domain fine-tuning).
- ``transntl``: TransNTL-style (CVPR 2024), reconstructed from its description [ours]: a ``fraction``
  (10 %) of the authorized training images is perturbed with small random domain shifts (colour
  and contrast jitter, inversion, a smooth coloured texture blended in, noise, a shift); the
  protected model is then repaired by self-distillation: a frozen copy of it, fed the *clean*
  images, is the teacher, and the attacked copy is trained to give the same predictions on the
  perturbed images (and on the clean ones). Restriction that rests on "any shift from the source
  breaks the model" does not survive a model taught to ignore shifts, and the unauthorized
  domain re-opens. No label and no unauthorized image is used.

Both take ``domain=`` (the unauthorized domain, evaluated; never trained on) and ``authorized=``
(the authorized domain the attacker holds a share of); a missing ``authorized`` is an
IPShieldError that says what to pass.
"""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ipshield.attacks.domain import (AttackConfig, _check_domain, _eval, _set_bn, as_config, check_target,
                                     train_labelled)
from ipshield.data.domain import Domain
from ipshield.models.classifiers import random_domain_shift
from ipshield.errors import DataError, IPShieldError
from ipshield.registry import ATTACKS
from ipshield.utils import progress, resolve_device, seed_everything


def require_authorized(name: str, authorized: Any) -> Domain:
    """``authorized`` when it is a Domain; else the error that says what the attack needs."""
    if authorized is None:
        raise IPShieldError(f"attack '{name}' needs the attacker's authorized (source-domain) images, and none were given",
                            "pass authorized=<the authorized Domain> (ipshield.data.load_domains); on the command line: "
                            "--authorized NAME (a domain of --source)")
    if not isinstance(authorized, Domain):
        raise IPShieldError(f"attack '{name}' needs the authorized images as a Domain (got {type(authorized).__name__})",
                            "pass authorized=<a Domain of ipshield.data.load_domains>")
    return authorized


def fraction_count(name: str, fraction: float, authorized: Domain) -> int:
    """How many authorized training images ``fraction`` is (at least 1, else a DataError)."""
    n = int(round(fraction * len(authorized.train)))
    if n < 1:
        least = 1.0 / max(1, len(authorized.train))
        raise DataError(f"attack '{name}': fraction={fraction:g} of the {len(authorized.train)} training images of "
                        f"'{authorized.name}' is no image at all", f"use fraction >= {least:.2g}")
    return n


class SourceFinetuneConfig(AttackConfig):
    budget_field: ClassVar[str] = "fraction"

    #: share of the authorized training images the attacker holds, labelled (class-balanced)
    fraction: float = Field(0.1, le=1.0, description="share of the authorized training images the attacker holds, labelled")
    steps: int = 80
    batch_size: int = 32
    lr: float = 1e-3
    bn_mode: Literal["eval", "train"] = "train"
    augment: bool = True
    n_test: int | None = None
    image_size: int = 32
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"


class TransNTLConfig(AttackConfig):
    budget_field: ClassVar[str] = "fraction"

    #: share of the authorized training images perturbed and used (unlabelled: the teacher labels them)
    fraction: float = Field(0.1, le=1.0, description="share of the authorized training images the attacker holds")
    steps: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    #: strength of the random domain shifts (0 = none, 1 = strong)
    strength: float = Field(0.6, ge=0.0, le=1.0)
    #: distillation temperature
    temperature: float = Field(2.0, gt=0.0)
    #: weight of the agreement on the clean images (keeps the authorized domain)
    clean_weight: float = Field(0.5, ge=0.0)
    bn_mode: Literal["eval", "train"] = "train"
    n_test: int | None = None
    image_size: int = 32
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"


def source_attack_setup(name: str, config_cls, model, domain, authorized, config, overrides):
    """The common start of an attack on the attacker's share of the authorized images: the config,
    the checks (a classifier, a Domain, authorized images), the image count, the seeded generator
    and the device. Returns (config, authorized, n, generator, device)."""
    cfg = as_config(config_cls, config, overrides)
    check_target(name, "classifier", model)
    _check_domain(name, domain)
    authorized = require_authorized(name, authorized)
    n = fraction_count(name, cfg.fraction, authorized)
    return cfg, authorized, n, seed_everything(cfg.seed), resolve_device(cfg.device)


def frozen_copy(model: nn.Module, device) -> nn.Module:
    """A copy of ``model`` on ``device`` in eval mode with no gradient (the caller's model is untouched)."""
    out = copy.deepcopy(model).to(device).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def source_finetune_attack(model: nn.Module, domain: Domain, authorized: Domain | None,
                           config: SourceFinetuneConfig | Mapping[str, Any] | None = None, *,
                           acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Fine-tune every weight of a copy of ``model`` on a labelled ``fraction`` of ``authorized``'s
    training images; accuracy on ``domain``'s test split (before and after)."""
    from ipshield.protect.restrict import train_tensors

    name = "source-finetune"
    t0 = time.time()
    cfg, authorized, n, g, device = source_attack_setup(name, SourceFinetuneConfig, model, domain, authorized, config,
                                                        overrides)
    if acc_before is None:
        acc_before = _eval(model, domain, cfg)
    x, y = train_tensors(authorized, n, cfg.image_size, cfg.seed)
    attacked = train_labelled(copy.deepcopy(model).to(device), x, y, cfg, g, device, desc=name)
    return {"attack": name, "domain": domain.name, "authorized": authorized.name, "fraction": cfg.fraction,
            "n_images": n, "steps": cfg.steps, "acc_before": acc_before, "acc_after": _eval(attacked, domain, cfg),
            "acc_authorized_after": _eval(attacked, authorized, cfg), "seconds": round(time.time() - t0, 1),
            "model": attacked}


def transntl_attack(model: nn.Module, domain: Domain, authorized: Domain | None,
                    config: TransNTLConfig | Mapping[str, Any] | None = None, *,
                    acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """TransNTL-style repair of a copy of ``model`` (see the module doc); accuracy on ``domain``'s test split."""
    from ipshield.protect.restrict import train_tensors

    name = "transntl"
    t0 = time.time()
    cfg, authorized, n, g, device = source_attack_setup(name, TransNTLConfig, model, domain, authorized, config, overrides)
    if acc_before is None:
        acc_before = _eval(model, domain, cfg)
    x, _ = train_tensors(authorized, n, cfg.image_size, cfg.seed)  # labels never used
    teacher = frozen_copy(model, device)
    attacked = copy.deepcopy(model).to(device)
    for p in attacked.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(attacked.parameters(), lr=cfg.lr)
    _set_bn(attacked, cfg.bn_mode)
    t = cfg.temperature
    bs = min(cfg.batch_size, len(x))
    for _ in progress(range(cfg.steps), desc=name):
        idx = torch.randperm(len(x), generator=g)[:bs]
        clean = x[idx]
        shifted = random_domain_shift(clean, cfg.strength, g)
        with torch.no_grad():
            target = F.softmax(teacher(clean.to(device)) / t, -1)
        logits = attacked(torch.cat([shifted, clean]).to(device)) / t
        kl = F.kl_div(F.log_softmax(logits, -1), torch.cat([target, target]), reduction="none").sum(1) * t * t
        loss = kl[:bs].mean() + cfg.clean_weight * kl[bs:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    attacked.eval()
    return {"attack": name, "domain": domain.name, "authorized": authorized.name, "fraction": cfg.fraction, "n_images": n,
            "steps": cfg.steps, "acc_before": acc_before, "acc_after": _eval(attacked, domain, cfg),
            "acc_authorized_after": _eval(attacked, authorized, cfg), "seconds": round(time.time() - t0, 1),
            "model": attacked}


@ATTACKS.register("source-finetune", config=SourceFinetuneConfig, target="classifier", budget="fraction",
                  description="fine-tune every weight on a labelled fraction of the authorized (source) training images")
def run_source_finetune(target: nn.Module, config: SourceFinetuneConfig | Mapping[str, Any] | None = None, *,
                        domain: Domain, authorized: Domain | None = None) -> dict[str, Any]:
    """``run(target, config, domain=, authorized=)`` of ``source-finetune`` (see :func:`source_finetune_attack`)."""
    return source_finetune_attack(target, domain, authorized, config)


@ATTACKS.register("transntl", config=TransNTLConfig, target="classifier", budget="fraction",
                  description="TransNTL-style: perturb a fraction of the authorized images with random domain shifts, "
                              "repair by self-distillation from the model's own clean predictions")
def run_transntl(target: nn.Module, config: TransNTLConfig | Mapping[str, Any] | None = None, *,
                 domain: Domain, authorized: Domain | None = None) -> dict[str, Any]:
    """``run(target, config, domain=, authorized=)`` of ``transntl`` (see :func:`transntl_attack`)."""
    return transntl_attack(target, domain, authorized, config)
