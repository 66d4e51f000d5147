"""Zero-shot CLIP: the unprotected reference that needs no training. Each class is represented by
the text feature of its prompt(s); an image goes to the class whose text feature is closest
(cosine, scaled by CLIP's temperature). With several templates the normalised text features of a
class are averaged and re-normalised (CLIP's prompt ensembling)."""

from __future__ import annotations

from typing import Mapping, Sequence

from pydantic import Field

from ipshield.data.domain import Domain
from ipshield.models.zeroshot import (DEFAULT_TEMPLATE, ZeroShotClassifier, ZeroShotTemplates, fill_template,  # noqa: F401
                                      evaluate_zero_shot as _evaluate_zero_shot)
from ipshield.registry import METHODS


class ZeroShotConfig(ZeroShotTemplates):
    """Zero-shot CLIP: the prompt templates (``{}`` or ``{class}`` marks the class name)."""

    batch_size: int = Field(256, ge=1)


def zero_shot_classifier(adapter, domain_or_classes: Domain | Sequence[str], config: ZeroShotConfig | None = None,
                         **_ignored) -> ZeroShotClassifier:
    """The zero-shot classifier of a domain's (or a list of) class names: nothing is trained.
    (``ipshield.api.zero_shot`` is the evaluation, as the ``ipshield zero-shot`` command.)"""
    config = config or ZeroShotConfig()
    classes = domain_or_classes.classes if isinstance(domain_or_classes, Domain) else list(domain_or_classes)
    return ZeroShotClassifier(adapter, classes, config.templates)


def evaluate_zero_shot(adapter, domains: Mapping[str, Domain], templates: Sequence[str] | None = None,
                       config: ZeroShotConfig | None = None) -> dict[str, float]:
    """Zero-shot top-1 accuracy (percent) on each domain's test split, keyed by domain name
    (``config`` wins over ``templates``; see ``ipshield.models.zeroshot.evaluate_zero_shot``)."""
    if config is None:
        return _evaluate_zero_shot(adapter, domains, templates)
    return _evaluate_zero_shot(adapter, domains, config.templates, config.batch_size)


@METHODS.register("zero-shot", config=ZeroShotConfig, model="clip", data=(), scenarios=(), reference=True,
                  description="unprotected reference: zero-shot CLIP from the class names")
def zero_shot_job(job, config: ZeroShotConfig) -> dict:
    """Evaluate zero-shot CLIP on every domain (nothing is trained; before = after). With an
    authorized domain the restriction summary is computed against it, as for every method."""
    acc = evaluate_zero_shot(job.model, job.domains, config=config)
    n_classes = len(next(iter(job.domains.values())).classes)
    metrics = {"method": "zero-shot", "authorized": job.authorized, "unauthorized": list(job.unauthorized),
               "n_classes": n_classes, "accuracy": {"before": acc, "after": acc},
               "summary": {"mean": sum(acc.values()) / len(acc)},
               "model": job.options.get("model_path"), "templates": config.templates}
    return metrics


__all__ = ["ZeroShotConfig", "ZeroShotClassifier", "zero_shot_classifier", "evaluate_zero_shot", "zero_shot_job",
           "DEFAULT_TEMPLATE"]
