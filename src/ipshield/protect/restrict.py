"""Shared machinery of the methods that restrict a whole image classifier to its authorized
domain (MAP, NTL, CUTI-domain): configs, the ownership-verification scenario, data tensors,
losses (KL to a reference, multi-kernel MMD), evaluation and the run folder.

Every method module registers its job function in ``METHODS`` (``MethodSpec``, docs/dev/CONTRACTS.md);
``restriction_job`` turns a method's ``run(config, source_model, authorized, unauthorized, out)``
into that ``run(job, config)``. It returns the metrics dict (the jobs layer writes ``metrics.json``)
and saves the protected model (an ordinary ``Classifier`` folder: ``model.safetensors`` +
``classifier.json``) into the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ipshield.config import BaseConfig
from ipshield.data.domain import Domain, ImageSplit, check_same_classes
from ipshield.errors import DataError, IPShieldError
from ipshield.registry import OWNERSHIP_SUFFIX

#: the scenarios of the classifier methods (names of ``ipshield.registry.SCENARIOS``)
RESTRICTION_SCENARIOS = ("target-specified", "ownership", "target-free")
#: the opacities ``watermark_opacity="auto"`` chooses from
OPACITY_LADDER = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


class RestrictionConfig(BaseConfig):
    """Options common to MAP, NTL and CUTI-domain."""

    #: "target-specified": restrict to the authorized domain against the given unauthorized domains;
    #: "ownership": the unauthorized domain is the authorized one with the grid watermark
    #: (watermarked inputs must collapse, clean ones keep their accuracy; SF/DF-MAP put the
    #: watermark on their pseudo-source images instead, so they still never see real data);
    #: "target-free": generated neighbourhood data stand in for the unauthorized domains (NTL,
    #: CUTI-domain; the given unauthorized domains are only evaluated)
    scenario: Literal["target-specified", "ownership", "target-free"] = "target-specified"
    #: training images used per domain (balanced subset; None = all)
    n_train: int | None = 3000
    #: test images evaluated per domain (None = all)
    n_test: int | None = None
    image_size: int = 32
    batch_size: int = 32
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0
    #: auto | cpu | cuda (the small classifiers train fast on the CPU, the default)
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    #: stride of the grid watermark of the ownership scenario
    watermark_stride: int = Field(2, ge=1)
    #: [ours] opacity of the grid (1 = the spec's pure white lines), or "auto": the largest of
    #: ``OPACITY_LADDER`` at which the *unprotected* source model keeps ``watermark_keep`` of its
    #: accuracy on authorized training images. On 32 px digits the pure white grid already breaks
    #: the unprotected classifiers (measured 9.5 / 23.1 / 19.6 % on MNIST / USPS / MNIST-M test
    #: images), so their collapse would prove nothing; "auto" picks 0.2 / 0.3 / 0.3 there
    watermark_opacity: float | Literal["auto"] = "auto"
    #: the fraction of its clean accuracy the unprotected model must keep under the "auto" opacity
    watermark_keep: float = Field(0.9, gt=0, le=1)

    @field_validator("scenario", mode="before")
    @classmethod
    def _old_scenario_name(cls, v: Any) -> Any:
        return "target-specified" if v == "domain" else v  # the name used before the vocabulary was unified

    @field_validator("watermark_opacity")
    @classmethod
    def _opacity(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 < float(v) <= 1.0:
            raise ValueError("watermark_opacity must be in (0, 1] or 'auto'")
        return v


class FinetuneRestrictionConfig(RestrictionConfig):
    """Options common to the methods that fine-tune the source model (NTL, CUTI-domain)."""

    #: generated neighbourhood data replaces the unauthorized domain
    target_free: bool = False
    #: [ours] 3e-4 rather than the protocol's 1e-4: a few hundred steps from the source model
    #: instead of 30 epochs from ImageNet features
    lr: float = 3e-4
    #: learning-rate decay per step
    lr_decay: float = 0.999
    #: weight of the unauthorized term
    alpha: float = 0.1

    @model_validator(mode="after")
    def _check_target_free(self) -> "FinetuneRestrictionConfig":
        if self.target_free and self.scenario == "ownership":
            raise ValueError("target_free generates stand-ins for unknown unauthorized domains, but in the ownership "
                             "scenario the unauthorized domain is the owner's own watermark: set target_free=false "
                             "(ntl, cuti) or scenario=target-specified")
        # the scenario and the flag say the same thing; either one sets both
        if self.scenario == "target-free" and not self.target_free:
            object.__setattr__(self, "target_free", True)
        elif self.target_free and self.scenario == "target-specified":
            object.__setattr__(self, "scenario", "target-free")
        return self


# --------------------------------------------------------------------------------------------- data


def ownership_watermark(x: torch.Tensor, stride: int = 2, opacity: float = 1.0) -> torch.Tensor:
    """The grid watermark of the ownership scenario on images ``x`` [B, 3, H, W] in [0, 1],
    blended at ``opacity`` (1 = the grid pixels set to white)."""
    from ipshield.data.transforms import grid_watermark

    marked = grid_watermark(x, stride=stride)
    return marked if opacity >= 1.0 else torch.lerp(x, marked, opacity)


def watermark_domain(domain: Domain, stride: int = 2, opacity: float = 1.0) -> Domain:
    """The ownership-verification domain: ``domain`` with the grid watermark on every image."""

    def mark(split: ImageSplit) -> ImageSplit:
        if not split.in_memory:
            x = split.to_tensor(32)
        else:
            x = split.to_tensor()
        y = ownership_watermark(x, stride, opacity)
        imgs = (y * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return ImageSplit(np.ascontiguousarray(imgs), split.labels.copy())

    return Domain(domain.name + OWNERSHIP_SUFFIX, list(domain.classes), mark(domain.train), mark(domain.test),
                  meta={"watermark": "grid", "stride": stride, "opacity": opacity, "of": domain.name})


@torch.no_grad()
def calibrate_watermark_opacity(model, x: torch.Tensor, y: torch.Tensor, stride: int = 2, keep: float = 0.9,
                                ladder: Sequence[float] = OPACITY_LADDER) -> tuple[float, dict[str, Any]]:
    """[ours] The largest grid opacity of ``ladder`` at which ``model`` keeps ``keep`` of its accuracy
    on the labelled images ``x`` (in [0, 1]): the watermark then leaves an unprotected model
    working, so only a protected model's collapse on it is evidence. Returns (opacity, the
    accuracies measured)."""
    model.eval()
    device = next(model.parameters()).device
    clean = tensor_accuracy(model, x, y, device)
    table = {str(a): round(tensor_accuracy(model, ownership_watermark(x, stride, a), y, device), 2) for a in sorted(ladder)}
    ok = [a for a in sorted(ladder) if table[str(a)] >= keep * clean]
    chosen = max(ok) if ok else min(ladder)
    return chosen, {"opacity": chosen, "clean_accuracy": round(clean, 2), "accuracy_by_opacity": table, "keep": keep,
                    "n_images": len(x), **({} if ok else {"note": "no opacity kept the accuracy: the faintest is used"})}


def resolve_scenario(config: RestrictionConfig, authorized: Domain, unauthorized: Sequence[Domain],
                     source_model=None) -> list[Domain]:
    """The unauthorized domains the method trains against (and is evaluated on). In the ownership
    scenario with ``watermark_opacity="auto"`` the opacity is calibrated on ``source_model`` (and
    recorded in the watermarked domain's ``meta``)."""
    if config.scenario == "ownership":
        opacity, calib = config.watermark_opacity, None
        if opacity == "auto":
            if source_model is None:
                raise IPShieldError("watermark_opacity='auto' needs the source model to calibrate on",
                                    "pass source_model, or give watermark_opacity a number in (0, 1]")
            x, y = train_tensors(authorized, 1000, config.image_size, config.seed + 5)
            opacity, calib = calibrate_watermark_opacity(source_model, x, y.long(), config.watermark_stride, config.watermark_keep)
        dom = watermark_domain(authorized, config.watermark_stride, float(opacity))
        if calib is not None:
            dom.meta["calibration"] = calib
        return [dom]
    if not unauthorized:
        raise DataError("no unauthorized domain given",
                        "name at least one unauthorized domain (--unauthorized), or use --scenario ownership")
    return list(unauthorized)


def check_classes(source_model, domains: Sequence[Domain]) -> None:
    classes = check_same_classes(list(domains))
    model_classes = getattr(source_model, "classes", None)
    if model_classes is not None and list(model_classes) != list(classes):
        raise DataError(
            f"the source model predicts classes {list(model_classes)} but the data has {list(classes)}",
            "use a source model trained on these classes (same names, same order), or data with the model's classes",
        )
    n_out = _num_outputs(source_model)
    if n_out is not None and n_out != len(classes):
        raise DataError(f"the source model has {n_out} outputs but the data has {len(classes)} classes",
                        "use a source model trained on these classes")


def _num_outputs(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


def train_tensors(domain: Domain, n: int | None, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced subset of ``domain.train`` as float [N, 3, S, S] in [0, 1] and labels."""
    from ipshield.models.classifiers import balanced_subset

    split = domain.train
    if n is not None and n < len(split):
        split = split.subset(balanced_subset(split.labels, n, seed))
    if len(split) == 0:
        raise DataError(f"domain '{domain.name}' has no training images", "check the data source")
    return split.to_tensor(size), torch.as_tensor(split.labels, dtype=torch.long)


def test_split(domain: Domain, n: int | None, seed: int = 0) -> ImageSplit:
    from ipshield.models.classifiers import balanced_subset

    if n is None or n >= len(domain.test):
        return domain.test
    return domain.test.subset(balanced_subset(domain.test.labels, n, seed))


class BatchStream:
    """Endless shuffled mini-batches of a tensor dataset (reshuffled every pass)."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.tensors = tensors
        self.n = len(tensors[0])
        self.bs = min(batch_size, self.n)
        self.g = generator
        self._perm = torch.randperm(self.n, generator=self.g)
        self._pos = 0

    def next(self) -> tuple[torch.Tensor, ...]:
        if self._pos + self.bs > self.n:
            self._perm = torch.randperm(self.n, generator=self.g)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.bs]
        self._pos += self.bs
        return tuple(t[idx] for t in self.tensors)


# --------------------------------------------------------------------------------------------- losses


def kl_to_reference(ref_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_ref || softmax(logits)) over the batch (nats)."""
    logp = F.log_softmax(logits, dim=-1)
    return (ref_probs * (torch.log(ref_probs.clamp_min(1e-8)) - logp)).sum(-1).mean()


def mmd_multi_kernel(a: torch.Tensor, b: torch.Tensor, n_kernels: int = 5, multiplier: float = 2.0) -> torch.Tensor:
    """Multi-kernel Gaussian MMD between two batches of (flattened) features; the bandwidths are
    centred on the mean pairwise squared distance of the joint batch."""
    a, b = a.flatten(1), b.flatten(1)
    z = torch.cat([a, b], 0)
    n = z.shape[0]
    d2 = torch.cdist(z, z).pow(2)
    bandwidth = d2.detach().sum() / max(1, n * n - n)
    bandwidth = bandwidth.clamp_min(1e-8) / (multiplier ** (n_kernels // 2))
    k = sum(torch.exp(-d2 / (bandwidth * multiplier ** i)) for i in range(n_kernels))
    na = a.shape[0]
    return k[:na, :na].mean() + k[na:, na:].mean() - 2 * k[:na, na:].mean()


# --------------------------------------------------------------------------------------------- evaluation and run folder


@torch.no_grad()
def tensor_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str = "cpu",
                    bs: int = 500) -> float:
    """Top-1 accuracy (percent) of ``model`` on labelled image tensors, in batches of ``bs``."""
    correct = sum(int((model(x[s:s + bs].to(device)).argmax(-1).cpu() == y[s:s + bs]).sum()) for s in range(0, len(x), bs))
    return 100.0 * correct / max(1, len(x))


def evaluate(model, domains: dict[str, Domain], n_test: int | None, seed: int = 0, size: int = 32) -> dict[str, float]:
    from ipshield.protect.base import accuracy

    return {name: accuracy(model, test_split(d, n_test, seed), size=size) for name, d in domains.items()}


def build_metrics(method: str, authorized: Domain, unauthorized: Sequence[Domain], before: dict[str, float],
                  after: dict[str, float], **extra: Any) -> dict[str, Any]:
    from ipshield.metrics import summarize_restriction

    unauth = [d.name for d in unauthorized]
    return {
        "method": method,
        "authorized": authorized.name,
        "unauthorized": unauth,
        "n_classes": len(authorized.classes),
        "accuracy": {"before": before, "after": after},
        "summary": summarize_restriction(before, after, authorized.name, len(authorized.classes), unauth),
        **extra,
    }


def prepare_run(config: RestrictionConfig, source_model, authorized: Domain,
                unauthorized: Sequence[Domain]) -> tuple[list[Domain], dict[str, float]]:
    """The start every classifier method shares: the scenario's unauthorized domains, a check of
    the classes, and the source model's accuracy on every domain ("before")."""
    check_classes(source_model, [authorized, *unauthorized])
    unauth = resolve_scenario(config, authorized, unauthorized, source_model)
    before = evaluate(source_model, {d.name: d for d in [authorized, *unauth]}, config.n_test, config.seed, config.image_size)
    return unauth, before


def finish_run(method: str, config: RestrictionConfig, source_model, protected, authorized: Domain,
               unauthorized: Sequence[Domain], out: str | Path | None, t0: float, extra_domains: Sequence[Domain] = (),
               before: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """Evaluate source and protected models, save the protected model into ``out`` (when set) and
    return the metrics (the jobs layer writes them, with config.yaml and run.json)."""
    domains = {d.name: d for d in [authorized, *unauthorized, *extra_domains]}
    if before is None:
        before = evaluate(source_model, domains, config.n_test, config.seed, config.image_size)
    after = evaluate(protected, domains, config.n_test, config.seed, config.image_size)
    if config.scenario == "ownership" and unauthorized:
        extra.setdefault("watermark", dict(unauthorized[0].meta))
    metrics = build_metrics(method, authorized, unauthorized, before, after, scenario=config.scenario,
                            seed=config.seed, seconds=round(time.time() - t0, 1), **extra)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        protected.save(Path(out), extra={"protected_by": method, "authorized": authorized.name,
                                         "unauthorized": [d.name for d in unauthorized]})
    return metrics


def restriction_job(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``run(config, source_model, authorized, unauthorized, out, **options)`` as a method's job
    function ``(job, config) -> metrics``; ``job.options`` may hold ``pseudo_source`` (SF/DF-MAP)."""

    def job_fn(job, config) -> dict[str, Any]:
        require_classifier(job.model)
        kw = {k: v for k, v in job.options.items() if k == "pseudo_source" and v is not None}
        return run(config, job.model, job.authorized_domain, job.unauthorized_domains, job.out, **kw)

    job_fn.__module__ = run.__module__
    job_fn.__name__ = job_fn.__qualname__ = f"{run.__module__.rsplit('.', 1)[-1]}_job"
    job_fn.__doc__ = run.__doc__
    return job_fn


def require_classifier(model) -> None:
    from ipshield.models.classifiers import Classifier

    if not isinstance(model, Classifier):
        raise IPShieldError(
            f"expected an ipshield Classifier, got {type(model).__name__}",
            "wrap the network: Classifier(net, classes) (or load one with load_classifier)",
        )


# --------------------------------------------------------------------------------------------- whole-model training helpers (NTL, CUTI)


def set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Put ``model`` in train mode, BatchNorm layers in ``bn_mode`` ("eval": frozen source running
    statistics; "train": batch statistics, running statistics updated)."""
    model.train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def staged_net(model, method: str):
    """The ``ClassifierNet`` (``stages`` + ``head``) inside a classifier; NTL's feature map and
    CUTI's per-stage restyling need the stage boundaries."""
    net = getattr(model, "net", model)
    if not (hasattr(net, "stages") and hasattr(net, "head")):
        raise IPShieldError(
            f"{method} needs a classifier split into feature stages (an ipshield ClassifierNet with .stages and .head); "
            f"got {type(net).__name__}",
            "build the source model with ipshield.models.classifiers (e.g. `ipshield train-source --arch vgg_small`)",
        )
    return net


def step_decay(optimizer: torch.optim.Optimizer, gamma: float) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
