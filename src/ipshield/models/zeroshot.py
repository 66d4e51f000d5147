"""Zero-shot CLIP classification. Each class is represented by the text feature of its prompt(s);
an image goes to the class whose text feature is closest (cosine, scaled by CLIP's temperature).
With several templates the normalised text features of a class are averaged and re-normalised
(CLIP's prompt ensembling).

The registered ``zero-shot`` method, its config and its run folder live in the protection layer
(``protect/zeroshot.py``), which re-exports the names of this module.

Class names the CLIP cannot read are refused here, in the one place every CLIP command passes
before it trains or evaluates anything (``ipshield zero-shot``; ``ipshield protect`` of a CLIP
method, whose zero-shot reference is built first): :func:`check_class_names`. A class name whose
tokens are wholly or mostly the tokenizer's unknown token (a bare numeral for the small CLIP's
word-level vocabulary, ``back_pack`` for a vocabulary of digit words) gives every such class the
same text feature, and the accuracy falls silently to chance. The fix is a class-name map
(``--class-names 0=zero,1=one,...``, ``class_names=`` of the data sources). Setting
``IPSHIELD_ALLOW_UNKNOWN_CLASS_NAMES=1`` turns the refusal into a warning.
"""

from __future__ import annotations

import os
import warnings
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


#: set to 1 to be warned, not refused, when class names are unknown to the CLIP's tokenizer
ALLOW_UNKNOWN_ENV = "IPSHIELD_ALLOW_UNKNOWN_CLASS_NAMES"

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty").split()


def unreadable_class_names(adapter, classes: Sequence[str]) -> dict[str, list[str]]:
    """``{class name: its unknown pieces}`` for every class whose name (``_`` read as a space, as
    in the prompts) the adapter's tokenizer maps wholly or mostly (more than half of its tokens) to
    its unknown token. Empty for tokenizers that read any text (CLIP's byte-level BPE)."""
    ask = getattr(adapter, "unknown_tokens", None)
    if ask is None:
        return {}
    out = {}
    for c in classes:
        n, unknown = ask(str(c).replace("_", " "))
        if n and 2 * len(unknown) > n:
            out[str(c)] = unknown
    return out


def class_names_fix(names: Sequence[str]) -> str:
    """The suggested ``--class-names`` value for ``names`` (number words for bare numerals)."""
    pairs = []
    for c in names:
        s = str(c).strip()
        word = _NUMBER_WORDS[int(s)] if s.isdigit() and int(s) < len(_NUMBER_WORDS) else "WORD"
        pairs.append(f"{s}={word}")
    return ",".join(pairs)


def check_class_names(adapter, classes: Sequence[str]) -> None:
    """Refuse (``DataError``) class names the CLIP's tokenizer cannot read (see
    :func:`unreadable_class_names`), naming them and the fix; a loud warning instead when
    ``IPSHIELD_ALLOW_UNKNOWN_CLASS_NAMES=1``."""
    bad = unreadable_class_names(adapter, classes)
    if not bad:
        return
    shown = ", ".join(repr(c) for c in list(bad)[:12]) + (" ..." if len(bad) > 12 else "")
    numerals = all(c.strip().isdigit() for c in bad)
    model = getattr(adapter, "path", None)
    problem = (f"{len(bad)} of {len(classes)} class names are unknown words to the CLIP's tokenizer"
               f"{f' ({model})' if model else ''}: {shown}"
               + (" (bare numerals: its vocabulary has no numerals)" if numerals else "")
               + "; the CLIP reads them as its unknown token, cannot tell these classes apart by name, and its "
                 "accuracy on them would be at chance")
    example = class_names_fix(list(bad)[:10] if numerals else list(bad)[:3])
    fix = (f"name the classes in words with a class-name map: --class-names {example}"
           + ("" if numerals else " (WORD: a word the model knows)")
           + " (or a YAML / JSON file FOLDER: NAME; class_names= in Python; or a class_names.yaml in the "
           f"folder dataset's root); set {ALLOW_UNKNOWN_ENV}=1 to run anyway")
    if os.environ.get(ALLOW_UNKNOWN_ENV, "").strip() in ("1", "true", "yes"):
        warnings.warn(f"{problem}. Fix: {fix}", UserWarning, stacklevel=3)
        return
    raise DataError(problem, fix)


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
        check_class_names(adapter, self.classes)
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


__all__ = ["DEFAULT_TEMPLATE", "ZeroShotTemplates", "fill_template", "ZeroShotClassifier", "evaluate_zero_shot",
           "ALLOW_UNKNOWN_ENV", "unreadable_class_names", "class_names_fix", "check_class_names"]
