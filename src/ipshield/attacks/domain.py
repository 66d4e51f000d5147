"""Attacks on domain restriction (MAP, NTL, CUTI-domain): how much unauthorized accuracy can an
attacker who holds the protected classifier win back, and at what cost?

- ``finetune-initfc-all``, ``finetune-initfc-fc``, ``finetune-direct-fc``, ``finetune-direct-all``:
  the four target-domain fine-tuning strategies of NTLBench with ``k`` labelled unauthorized
  images (k = 10, 100, 1000 in the benchmark): re-initialise the final linear layer ("initFC") or
  keep it ("direct"), then train every weight ("all") or only that layer ("FC"; the backbone,
  BatchNorm statistics included, stays frozen). ``finetune`` is the historical name of
  ``finetune-direct-all`` (same config, same numbers); pruned (zero) weights of an exported MAP
  model are ordinary weights again and can regrow.
- ``shot``: source-free domain adaptation on unlabelled unauthorized images, SHOT-style: the
  final linear layer (the "hypothesis") is frozen, the rest is trained with information
  maximisation (confident and diverse predictions) plus cross-entropy to self-supervised pseudo
  labels from feature centroids (recomputed every ``refresh_every`` steps).
- :func:`scratch_attack` (a reference, not an attack): the same architecture trained from random
  weights on the same labelled images with the same step budget.

The other attacks of the suite live in ``attacks/sourcedata.py`` (``source-finetune``,
``transntl``), ``attacks/disguise.py`` (``disguise``, JailNTL-style) and
``attacks/sourcefree.py`` (``nrc``); ``attacks/robust.py`` runs them all with their references.

Both return a dict with the unauthorized accuracy before and after the attack (percent) and the
attacked copy under ``"model"``. Each attack works on a copy; the given model is not modified.

The contract of every entry of ``ATTACKS`` (docs/dev/CONTRACTS.md) is defined here too, and
shared by ``ipshield.attacks.watermark``: a config class derived from :class:`AttackConfig`
(extra keys rejected, its budget field greater than 0), one signature
``run(target, config, **inputs) -> dict`` (``inputs``: ``domain=`` for classifier attacks,
``public=`` for watermark attacks), and a result dict with ``"attack"``, the budget and the
attacked target under ``"model"``. :func:`check_target` refuses a target of another kind.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ipshield.config import BaseConfig
from ipshield.data.domain import Domain
from ipshield.errors import ConfigError, DataError, IPShieldError
from ipshield.registry import ATTACKS
from ipshield.utils import progress, seed_everything, resolve_device


# ============================================================================ the contract of every attack
#: the kinds of target an attack takes (``AttackSpec.target``), in words
TARGET_KINDS = {
    "classifier": "an image classifier (e.g. a protected classifier folder loaded with load_classifier)",
    "prompt": "a CLIP prompt model (a CoOp, IP-CLIP or NTL-prompt model)",
    "embedder": "an embedding service or a CLIP model (embed_images/embed_texts, or a CLIP adapter)",
}


def target_kind(target: Any) -> str | None:
    """The kind of attack target ``target`` is: "embedder" (anything with ``embed_images`` and
    ``embed_texts``, or a CLIP adapter with ``encode_image``/``encode_text``), "prompt" (a module
    built on a CLIP adapter: ``.adapter``), "classifier" (any other ``nn.Module``), or None."""
    if hasattr(target, "embed_images") and hasattr(target, "embed_texts"):
        return "embedder"
    if hasattr(target, "encode_image") and hasattr(target, "encode_text"):
        return "embedder"
    if isinstance(target, nn.Module):
        return "prompt" if hasattr(target, "adapter") else "classifier"
    return None


def check_target(name: str, kind: str, target: Any) -> Any:
    """``target`` when it is of the ``kind`` the attack ``name`` takes; else an IPShieldError that
    names what was given and the attacks that take it."""
    got = target_kind(target)
    if got == kind:
        return target
    what = f"{TARGET_KINDS[got].split(' (')[0]} ({type(target).__name__})" if got else \
        f"a {type(target).__name__}, which is no model ipshield can attack"
    fix = f"give {TARGET_KINDS[kind]}"
    if got:
        others = [n for n, s in ATTACKS.items() if s.target == got]
        if others:
            fix += f"; the attacks on {got}s are: {', '.join(others)}"
    raise IPShieldError(f"attack '{name}' takes {TARGET_KINDS[kind].split(' (')[0]}, not {what}", fix)


class AttackConfig(BaseConfig):
    """Base of every attack config: extra keys rejected, and the budget (the field named by
    ``budget_field``: labelled images, queries, strength) must be greater than 0."""

    #: the field that is the attack's budget (the spec's ``budget``)
    budget_field: ClassVar[str] = ""

    @model_validator(mode="after")
    def _check_budget(self):
        name = self.budget_field
        v = getattr(self, name, None) if name else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not v > 0:
            desc = type(self).model_fields[name].description
            raise ValueError(f"the attack budget {name}{f' ({desc})' if desc else ''} must be greater than 0 (got {v})")
        return self

    @classmethod
    def build(cls, data: Mapping[str, Any] | None = None, overrides: list[str] | None = None):
        try:
            return super().build(dict(data or {}), overrides)
        except ConfigError as exc:
            name = cls.budget_field
            if name and "unknown key" not in exc.problem and re.search(rf"(?<![\w.]){re.escape(name)}\b", exc.problem):
                default = cls.model_fields[name].default
                raise ConfigError(exc.problem, f"give the budget {name} a valid value, e.g. {name}={default}") from None
            raise


def as_config(cls: type[AttackConfig], config: Any = None, overrides: Mapping[str, Any] | None = None) -> AttackConfig:
    """``config`` as an instance of ``cls``: None (the defaults), a mapping, or an instance;
    ``overrides`` (keyword arguments of the old call style) on top."""
    if isinstance(config, cls):
        return cls.build({**config.to_dict(), **dict(overrides)}) if overrides else config
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"{type(config).__name__} is not a config of this attack", f"give a {cls.__name__} or a mapping")
    return cls.build({**dict(config or {}), **dict(overrides or {})})


# ============================================================================ the attacks
class FinetuneAttackConfig(AttackConfig):
    budget_field: ClassVar[str] = "k"

    #: labelled unauthorized training images the attacker holds (class-balanced)
    k: int = Field(100, description="labelled unauthorized images the attacker holds")
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
    device: Literal["auto", "cpu", "cuda"] = "cpu"


class SHOTAttackConfig(AttackConfig):
    budget_field: ClassVar[str] = "n_train"

    #: unlabelled unauthorized training images used (at most; all the domain has when fewer)
    n_train: int = Field(2000, description="unlabelled unauthorized images the attacker holds")
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
    device: Literal["auto", "cpu", "cuda"] = "cpu"


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


def _check_domain(name: str, domain: Any) -> Domain:
    if not isinstance(domain, Domain):
        raise IPShieldError(f"attack '{name}' needs the attacker's data as a Domain (got {type(domain).__name__})",
                            "pass domain=<a Domain of ipshield.data.load_domains>")
    return domain


#: the fine-tuning strategies of NTLBench: (re-initialise the final linear layer, train every weight)
FINETUNE_STRATEGIES: dict[str, tuple[bool, bool]] = {
    "initfc-all": (True, True), "initfc-fc": (True, False), "direct-fc": (False, False), "direct-all": (False, True),
}


def check_k(name: str, k: int, domain: Domain) -> None:
    if k > len(domain.train):
        raise DataError(f"k={k} labelled images asked for, but domain '{domain.name}' has only {len(domain.train)} "
                        "training images", f"use k <= {len(domain.train)}, or a data source with more images of '{domain.name}'")


def train_labelled(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Any, g: torch.Generator, device,
                   params: list[nn.Parameter] | None = None, frozen_backbone: bool = False, desc: str = "train") -> nn.Module:
    """Cross-entropy on (``x``, ``y``) for ``cfg.steps`` steps (Adam, ``cfg.lr``, random shifts when
    ``cfg.augment``); only ``params`` when given. ``frozen_backbone``: the whole net stays in eval
    mode (BatchNorm statistics frozen too), else BatchNorm follows ``cfg.bn_mode``."""
    from ipshield.models.classifiers import random_shift

    params = list(net.parameters()) if params is None else params
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    if frozen_backbone:
        net.eval()
    else:
        _set_bn(net, cfg.bn_mode)
    bs = min(cfg.batch_size, len(y))
    for _ in progress(range(cfg.steps), desc=desc):
        idx = torch.randperm(len(y), generator=g)[:bs]
        xb, yb = x[idx], y[idx]
        if getattr(cfg, "augment", False):
            xb = random_shift(xb, 2, g)
        loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return net


def finetune_attack(model: nn.Module, domain: Domain, config: FinetuneAttackConfig | Mapping[str, Any] | None = None,
                    *, strategy: str = "direct-all", acc_before: float | None = None, name: str | None = None,
                    **overrides: Any) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``k`` labelled images of ``domain`` with one of the
    :data:`FINETUNE_STRATEGIES` (default ``direct-all``: keep the final layer, train every weight);
    accuracy on its test split. ``overrides``: config fields as keywords (``k=100, steps=40``), on
    top of ``config``; ``acc_before``: the target's accuracy when already known (skips one evaluation);
    ``name``: the attack's name in the result (default ``finetune`` / ``finetune-<strategy>``)."""
    from ipshield.protect.restrict import train_tensors

    cfg = as_config(FinetuneAttackConfig, config, overrides)
    name = name or ("finetune" if strategy == "direct-all" else f"finetune-{strategy}")
    if strategy not in FINETUNE_STRATEGIES:
        raise ConfigError(f"unknown fine-tuning strategy '{strategy}'", f"choose one of: {', '.join(FINETUNE_STRATEGIES)}")
    check_target(name, "classifier", model)
    _check_domain(name, domain)
    check_k(name, cfg.k, domain)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if acc_before is None:
        acc_before = _eval(model, domain, cfg)
    x, y = train_tensors(domain, cfg.k, cfg.image_size, cfg.seed)
    attacked = copy.deepcopy(model).to(device)
    reinit, train_all = FINETUNE_STRATEGIES[strategy]
    head = _last_linear(attacked, name)
    if reinit:
        head.reset_parameters()
    train_labelled(attacked, x, y, cfg, g, device, params=None if train_all else list(head.parameters()),
                   frozen_backbone=not train_all, desc=f"{name} k={cfg.k}")
    return {"attack": name, "strategy": strategy, "domain": domain.name, "k": cfg.k, "steps": cfg.steps,
            "acc_before": acc_before, "acc_after": _eval(attacked, domain, cfg), "seconds": round(time.time() - t0, 1),
            "model": attacked}


def reset_weights(model: nn.Module) -> nn.Module:
    """``model`` with fresh random weights (every submodule's ``reset_parameters``, BatchNorm
    running statistics too): the same architecture, nothing learnt."""
    for m in model.modules():
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def scratch_attack(model: nn.Module, domain: Domain, config: FinetuneAttackConfig | Mapping[str, Any] | None = None, *,
                   train: Domain | None = None, n: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The honest reference of a labelled attack: ``model``'s architecture with fresh random weights,
    trained on the attacker's labelled images (``n`` of ``train``'s, default ``k`` of ``domain``'s)
    with the same step budget (``config``: a FinetuneAttackConfig); accuracy on ``domain``'s test
    split. Whatever an attack on the protected model reaches above this, the protected weights gave."""
    from ipshield.protect.restrict import train_tensors

    cfg = as_config(FinetuneAttackConfig, config, overrides)
    _check_domain("scratch", domain)
    train = domain if train is None else train
    n = cfg.k if n is None else n
    check_k("scratch", n, train)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    x, y = train_tensors(train, n, cfg.image_size, cfg.seed)
    net = reset_weights(copy.deepcopy(model)).to(device)
    train_labelled(net, x, y, cfg, g, device, desc=f"scratch n={n}")
    return {"attack": "scratch", "domain": domain.name, "train": train.name, "n": n, "steps": cfg.steps,
            "acc_after": _eval(net, domain, cfg), "seconds": round(time.time() - t0, 1), "model": net}


def _last_linear(model: nn.Module, name: str = "shot") -> nn.Linear:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise IPShieldError(f"attack '{name}' needs a classifier ending with a linear layer (its final classifier layer)",
                            "use an ipshield classifier (ipshield.models.classifiers)")
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


def shot_attack(model: nn.Module, domain: Domain, config: SHOTAttackConfig | Mapping[str, Any] | None = None,
                *, acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """SHOT-style source-free adaptation of a copy of ``model`` to the unlabelled train split of ``domain``.
    ``overrides``: config fields as keywords (``steps=10, n_train=300``), on top of ``config``."""
    from ipshield.protect.restrict import train_tensors

    cfg = as_config(SHOTAttackConfig, config, overrides)
    check_target("shot", "classifier", model)
    _check_domain("shot", domain)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if acc_before is None:
        acc_before = _eval(model, domain, cfg)
    x, _ = train_tensors(domain, cfg.n_train, cfg.image_size, cfg.seed)  # labels never used
    attacked = copy.deepcopy(model).to(device)
    head = _last_linear(attacked, "shot")
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
    return {"attack": "shot", "domain": domain.name, "n_train": int(len(x)), "steps": cfg.steps, "acc_before": acc_before,
            "acc_after": _eval(attacked, domain, cfg), "seconds": round(time.time() - t0, 1), "model": attacked}


@ATTACKS.register("finetune", config=FinetuneAttackConfig, target="classifier", budget="k",
                  description="fine-tune every weight on k labelled images of the unauthorized domain (= finetune-direct-all)")
def run_finetune(target: nn.Module, config: FinetuneAttackConfig | Mapping[str, Any] | None = None, *,
                 domain: Domain) -> dict[str, Any]:
    """``run(target, config, domain=)`` of the ``finetune`` entry (see :func:`finetune_attack`)."""
    return finetune_attack(target, domain, config)


def _register_strategy(strategy: str) -> None:
    reinit, train_all = FINETUNE_STRATEGIES[strategy]
    what = (("re-initialise the final classifier layer, then train " if reinit else "keep the final classifier layer, train ")
            + ("every weight" if train_all else "only that layer"))

    def run(target: nn.Module, config: FinetuneAttackConfig | Mapping[str, Any] | None = None, *,
            domain: Domain) -> dict[str, Any]:
        return finetune_attack(target, domain, config, strategy=strategy, name=f"finetune-{strategy}")

    run.__name__ = run.__qualname__ = f"run_finetune_{strategy.replace('-', '_')}"
    run.__doc__ = f"``run(target, config, domain=)`` of ``finetune-{strategy}``: {what} on k labelled unauthorized images."
    ATTACKS.register(f"finetune-{strategy}", config=FinetuneAttackConfig, target="classifier", budget="k",
                     description=f"NTLBench fine-tuning {strategy}: {what}, on k labelled images of the unauthorized domain")(run)
    globals()[run.__name__] = run


for _strategy in FINETUNE_STRATEGIES:
    _register_strategy(_strategy)


@ATTACKS.register("shot", config=SHOTAttackConfig, target="classifier", budget="n_train",
                  description="SHOT-style source-free adaptation on unlabelled images of the unauthorized domain")
def run_shot(target: nn.Module, config: SHOTAttackConfig | Mapping[str, Any] | None = None, *,
             domain: Domain) -> dict[str, Any]:
    """``run(target, config, domain=)`` of the ``shot`` entry (see :func:`shot_attack`)."""
    return shot_attack(target, domain, config)


def cost_to_break(model: nn.Module, domain: Domain, ks: tuple[int, ...] = (10, 100, 1000), shot: bool = True,
                  finetune: dict[str, Any] | None = None, shot_options: dict[str, Any] | None = None,
                  seed: int = 0, n_test: int | None = None) -> dict[str, Any]:
    """Unauthorized accuracy recovered by fine-tuning with each k and by SHOT (percent). A k larger
    than the domain's training images is skipped (``None``); a k below 1 is a ConfigError."""
    check_target("finetune", "classifier", model)
    _check_domain("finetune", domain)
    out: dict[str, Any] = {"domain": domain.name}
    for k in ks:
        cfg = FinetuneAttackConfig.build({"k": k, "seed": seed, "n_test": n_test, **(finetune or {})})
        if cfg.k > len(domain.train):
            out[f"finetune_k{k}"] = None
            continue
        r = finetune_attack(model, domain, cfg)
        out["acc_before"] = r["acc_before"]
        out[f"finetune_k{k}"] = r["acc_after"]
    if shot:
        r = shot_attack(model, domain, SHOTAttackConfig.build({"seed": seed, "n_test": n_test, **(shot_options or {})}))
        out["acc_before"] = r["acc_before"]
        out["shot"] = r["acc_after"]
    return out
