"""IP-CLIP's evaluation: the test sets of a scenario and the accuracy of a model on each."""

from __future__ import annotations

from typing import Callable

from ipshield.data.domain import Domain, ImageSplit
from ipshield.protect.ipclip.config import WATERMARK_SUFFIX
from ipshield.protect.ipclip.data import watermark_fn


# ---------------------------------------------------------------------------- evaluation
def evaluation_sets(domains: dict[str, Domain], authorized: str, scenario: str, watermark_stride: int = 2
                    ) -> tuple[str, dict[str, tuple[ImageSplit, Callable | None]]]:
    """The test sets of a scenario: every domain clean, plus the authorized domain watermarked in
    the ownership and authorization scenarios. Returns (name of the authorized set, sets)."""
    sets: dict[str, tuple[ImageSplit, Callable | None]] = {name: (d.test, None) for name, d in domains.items()}
    if scenario in ("ownership", "authorization"):
        sets[authorized + WATERMARK_SUFFIX] = (domains[authorized].test, watermark_fn(watermark_stride))
    auth_name = authorized + WATERMARK_SUFFIX if scenario == "authorization" else authorized
    return auth_name, sets


def accuracy_on_sets(model, sets: dict[str, tuple[ImageSplit, Callable | None]], adapter) -> dict[str, float]:
    """Accuracy (percent) of ``model`` on each set; file-based splits are read at the CLIP's size."""
    from ipshield.protect.base import accuracy

    return {name: accuracy(model, split, transform=tf, size=None if split.in_memory else adapter.image_size,
                           batch_size=256, device=adapter.device)
            for name, (split, tf) in sets.items()}
