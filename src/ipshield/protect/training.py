"""Training helpers shared by the prompt-learning methods (CoOp, IP-CLIP, NTL-prompt)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from ipshield.data.domain import ImageSplit


def split_tensor(split: ImageSplit, size: int | None = None) -> torch.Tensor:
    """All images of an in-memory split as float [N, 3, S, S] in [0, 1] (small data sets only)."""
    return split.to_tensor(size)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Shuffled index batches for one epoch."""
    perm = torch.randperm(n, generator=generator)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def train_augment(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.6-1) + no flip (digits are not mirror-symmetric): the CLIP
    methods' training transform at the model's input size."""
    from ipshield.data.transforms import random_resized_crop

    return random_resized_crop(x, size, scale=(0.6, 1.0), generator=generator)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0, stepped once per optimisation step."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def subsample_indices(n: int, max_n: int | None, seed: int) -> np.ndarray:
    """The (sorted) indices ``subsample`` keeps out of ``n`` images."""
    if max_n is None or n <= max_n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max_n, replace=False))


def subsample(split: ImageSplit, max_n: int | None, seed: int) -> ImageSplit:
    if max_n is None or len(split) <= max_n:
        return split
    return split.subset(subsample_indices(len(split), max_n, seed))
