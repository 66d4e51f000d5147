"""IP-CLIP's training data per scenario: the scenario transforms (grid watermark, strong
augmentation, the authorization mix), ``TrainStream`` and the authorized / unauthorized streams
(with an optional validation hold-out) of each scenario."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ipshield.data.domain import Domain, ImageSplit, check_same_classes
from ipshield.errors import ConfigError, DataError
from ipshield.protect.ipclip.config import SCENARIOS, WATERMARK_SUFFIX
from ipshield.protect.training import train_augment


# ---------------------------------------------------------------------------- training data per scenario
ImageFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _watermark(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    from ipshield.data.transforms import grid_watermark

    return grid_watermark(x, stride=stride)


def watermark_fn(stride: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
    """The scenario's watermark as a one-argument transform (``stride`` 2 is the spec's pattern)."""
    return _watermark if stride == 2 else (lambda x: _watermark(x, stride))


def _strong(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from ipshield.data.transforms import strong_augment

    return strong_augment(x, g)


def _authorization_mix(x: torch.Tensor, g: torch.Generator, stride: int = 2) -> torch.Tensor:
    """[ref] unauthorized mix of the applicability-authorization scenario: 40% watermark +
    augment, 20% clean, 40% augment only (augment = the strong augmentation)."""
    r = torch.rand(x.shape[0], generator=g)
    aug = _strong(x, g)
    wm_aug = _strong(_watermark(x, stride), g)
    out = x.clone()
    out[r < 0.4] = wm_aug[r < 0.4]
    sel = r >= 0.6
    out[sel] = aug[sel]
    return out


@dataclass
class TrainStream:
    """Training images of one side (authorized or unauthorized): images [N, 3, H, W] in [0, 1] at
    the data's resolution, labels, and the scenario's transform (watermark, strong augment ...),
    applied after the random crop so the pattern keeps the data's pixel grid, as at test time."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    transform: ImageFn | None = None
    random_transform: bool = False

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor, g: torch.Generator, augment: bool) -> torch.Tensor:
        x = self.images[idx]
        if augment:
            x = train_augment(x, x.shape[-1], g)
        if self.transform is not None:
            x = self.transform(x, g)
        return x


def build_streams(authorized: Domain, unauthorized: Sequence[Domain], scenario: str, max_train: int | None,
                  seed: int, size: int = 224, watermark_stride: int = 2) -> tuple[TrainStream, TrainStream]:
    """The authorized and unauthorized training streams of a scenario (checks the domains).
    ``size``: the resolution file-based splits are read at (in-memory splits keep theirs);
    ``watermark_stride``: the grid watermark's stride (2 = the spec's pattern)."""
    a, u, _, _ = build_streams_with_validation(authorized, unauthorized, scenario, max_train, seed, size,
                                               watermark_stride)
    return a, u


def holdout_split(split: ImageSplit, max_train: int | None, seed: int, val_size: int = 0, val_fraction: float = 0.2
                  ) -> tuple[ImageSplit, ImageSplit | None]:
    """(training subset, validation split or None) of a domain's TRAINING split [ours].

    The training subset is what ``subsample(split, max_train, seed)`` keeps. With ``val_size`` > 0
    the validation images are ``val_size`` of the training images outside that subset when there
    are enough (the training subset is then unchanged); otherwise ``val_fraction`` of the subset is
    held out and the rest is trained on. The test split is never touched."""
    from ipshield.protect.training import subsample_indices

    keep = subsample_indices(len(split), max_train, seed)
    if val_size <= 0:
        return (split if len(keep) == len(split) else split.subset(keep)), None
    rng = np.random.default_rng(seed + 104729)
    rest = np.setdiff1d(np.arange(len(split)), keep)
    if len(rest) >= val_size:
        val = np.sort(rng.choice(rest, val_size, replace=False))
        return (split if len(keep) == len(split) else split.subset(keep)), split.subset(val)
    n_val = min(len(keep) - 1, max(1, int(round(val_fraction * len(keep)))))
    if n_val < 1:
        raise DataError(f"too few training images ({len(split)}) to hold out a validation split",
                        "turn select_best off or give more training images")
    perm = rng.permutation(keep)
    return split.subset(np.sort(perm[n_val:])), split.subset(np.sort(perm[:n_val]))


def build_streams_with_validation(authorized: Domain, unauthorized: Sequence[Domain], scenario: str,
                                  max_train: int | None, seed: int, size: int = 224, watermark_stride: int = 2,
                                  val_size: int = 0, val_fraction: float = 0.2
                                  ) -> tuple[TrainStream, TrainStream, TrainStream | None, list[TrainStream]]:
    """``build_streams`` plus, with ``val_size`` > 0, validation streams held out of the training
    images (``holdout_split``): the authorized one and one per unauthorized test condition (each
    unauthorized domain in target-specified; the watermarked / strongly augmented / mixed
    authorized validation images in the other scenarios)."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario '{scenario}'", f"choose one of: {', '.join(SCENARIOS)}")
    unauthorized = list(unauthorized)
    for d in unauthorized:
        if d.name.lower() == authorized.name.lower():
            raise DataError(f"domain '{d.name}' is given as both authorized and unauthorized",
                            "name a different unauthorized domain (or use --scenario target-free / ownership)")
    if unauthorized:
        check_same_classes([authorized, *unauthorized])
    if len(authorized.train) == 0:
        raise DataError(f"authorized domain '{authorized.name}' has no training images", "check the data source")

    def tensors(split: ImageSplit, size: int | None = None):
        tr, va = holdout_split(split, max_train, seed, val_size, val_fraction)
        out = (tr.to_tensor(size), torch.from_numpy(tr.labels))
        val = (va.to_tensor(size), torch.from_numpy(va.labels)) if va is not None else None
        return out, val

    (xa, ya), va = tensors(authorized.train, size if not authorized.train.in_memory else None)
    wm = lambda x, g: _watermark(x, watermark_stride)  # noqa: E731
    if scenario == "target-specified":
        if not unauthorized:
            raise DataError("the target-specified scenario needs at least one unauthorized domain",
                            "give --unauthorized D2 (or use --scenario target-free)")
        parts = [tensors(d.train, xa.shape[-1]) for d in unauthorized]
        xu = torch.cat([p[0][0] for p in parts])
        yu = torch.cat([p[0][1] for p in parts])
        name = "+".join(d.name for d in unauthorized)
        val_u = [TrainStream(d.name, *p[1]) for d, p in zip(unauthorized, parts) if p[1] is not None]
        return (TrainStream(authorized.name, xa, ya), TrainStream(name, xu, yu),
                TrainStream(authorized.name, *va) if va else None, val_u)
    val_a = TrainStream(authorized.name, *va) if va else None
    if scenario == "ownership":
        return (TrainStream(authorized.name, xa, ya), TrainStream(authorized.name + WATERMARK_SUFFIX, xa, ya, wm),
                val_a, [TrainStream(authorized.name + WATERMARK_SUFFIX, *va, wm)] if va else [])
    if scenario == "target-free":
        strong = authorized.name + "+strong-augment"
        return (TrainStream(authorized.name, xa, ya), TrainStream(strong, xa, ya, _strong, random_transform=True),
                val_a, [TrainStream(strong, *va, _strong, random_transform=True)] if va else [])
    # authorization: only watermarked inputs are served
    mix = lambda x, g: _authorization_mix(x, g, watermark_stride)  # noqa: E731
    return (TrainStream(authorized.name + WATERMARK_SUFFIX, xa, ya, wm),
            TrainStream(authorized.name + "+mix", xa, ya, mix, random_transform=True),
            TrainStream(authorized.name + WATERMARK_SUFFIX, *va, wm) if va else None,
            [TrainStream(authorized.name + "+mix", *va, mix, random_transform=True)] if va else [])
