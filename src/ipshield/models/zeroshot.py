"""Zero-shot CLIP classification. Each class is represented by the text feature of its prompt(s);
an image goes to the class whose text feature is closest (cosine, scaled by CLIP's temperature).
With several templates the normalised text features of a class are averaged and re-normalised
(CLIP's prompt ensembling).

The registered ``zero-shot`` method, its config and its run folder live in the protection layer
(``protect/zeroshot.py``), which re-exports the names of this module.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from pydantic import ConfigDict, Field, field_validator

from ipshield.config import BaseConfig
from ipshield.data.domain import Domain, check_same_classes
from ipshield.errors import DataError
from ipshield.models.evaluation import accuracy_by_domain

#: the prompt of zero-shot CLIP in the baselines spec
DEFAULT_TEMPLATE = "a photo of a {}."


class ZeroShotTemplates(BaseConfig):
    """The prompt templates of zero-shot CLIP (``{}`` or ``{class}`` marks the class name).

    The protection layer's ``ZeroShotConfig`` extends it; validation errors are titled with
    that config's name, as they were before the templates moved here."""

    model_config = ConfigDict(title="ZeroShotConfig")

    templates: list[str] = Field(default_factory=lambda: [DEFAULT_TEMPLATE])

    @field_validator("templates")
    @classmethod
    def _has_placeholder(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one template")
        for t in v:
            if "{}" not in t and "{class}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' (or '{{class}}') where the class name goes")
        return v


def fill_template(template: str, name: str) -> str:
    return template.replace("{class}", name) if "{class}" in template else template.format(name)


class ZeroShotClassifier(torch.nn.Module):
    """``predict_logits(images in [0, 1]) -> [B, n_classes]`` from a CLIP adapter and class names."""

    def __init__(self, adapter, classes: Sequence[str], templates: Sequence[str] | None = None):
        super().__init__()
        if not classes:
            raise DataError("zero-shot classification needs at least one class name", "pass the domain's classes")
        self.adapter = adapter
        self.classes = list(classes)
        self.templates = list(templates) if templates else [DEFAULT_TEMPLATE]
        ZeroShotTemplates(templates=self.templates)  # validates the placeholders
        self.register_buffer("text_features", self._class_features(), persistent=False)

    @torch.no_grad()
    def _class_features(self) -> torch.Tensor:
        prompts = [fill_template(t, c.replace("_", " ")) for c in self.classes for t in self.templates]
        feats = self.adapter.encode_text(prompts, normalize=True).float()
        feats = feats.view(len(self.classes), len(self.templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(feats, dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter.encode_image(self.adapter.preprocess(images), normalize=True).float()

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.image_features(images)
        scale = self.adapter.logit_scale.exp().float()
        return scale * feats @ self.text_features.to(feats.device).t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images)


def evaluate_zero_shot(adapter, domains: Mapping[str, Domain], templates: Sequence[str] | None = None,
                       batch_size: int = 256) -> dict[str, float]:
    """Zero-shot top-1 accuracy (percent) on each domain's test split, keyed by domain name.

    ``templates`` default to ``[DEFAULT_TEMPLATE]``; ``batch_size`` images are scored at once."""
    if not domains:
        raise DataError("no domains to evaluate", "name at least one domain")
    templates = ZeroShotTemplates(templates=list(templates) if templates else [DEFAULT_TEMPLATE]).templates
    classes = check_same_classes(list(domains.values()))
    clf = ZeroShotClassifier(adapter, classes, templates)
    # images loaded from files need a common size to be batched; in-memory ones keep theirs
    size = None if all(d.test.in_memory for d in domains.values()) else int(adapter.image_size)
    return accuracy_by_domain(clf, domains, batch_size=batch_size, size=size)


__all__ = ["DEFAULT_TEMPLATE", "ZeroShotTemplates", "fill_template", "ZeroShotClassifier", "evaluate_zero_shot"]
