"""IP-CLIP's evaluation: the test sets of a scenario, the accuracy of a model on each and [ours] the
authorization verdict's AUROC / TAR / FAR on each."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

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


# ---------------------------------------------------------------------------- [ours] the verdict on test sets
@torch.no_grad()
def verdict_margins(head, split: ImageSplit, adapter, transform: Callable | None = None,
                    authorized: Sequence[str] | None = None, batch_size: int = 256) -> np.ndarray:
    """The head's margin (score - threshold; >= 0: authorized) of every image of ``split``."""
    from ipshield.protect.ipclip.model import visual_stats

    eps = float(head.meta.get("stat_eps", 1e-6))
    amp = bool(head.meta.get("amp", False))
    size = None if split.in_memory else adapter.image_size
    out = []
    for s in range(0, len(split), batch_size):
        x = split.subset(range(s, min(len(split), s + batch_size))).to_tensor(size).to(adapter.device)
        if transform is not None:
            x = transform(x)
        out.append(head.margin(visual_stats(adapter, x, eps, amp).to("cpu"), authorized).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def verdict_on_sets(head, sets: dict[str, tuple[ImageSplit, Callable | None]], adapter,
                    authorized: Sequence[str] | None = None,
                    reference: dict[str, tuple[ImageSplit, Callable | None]] | None = None) -> dict:
    """Per test set: share accepted at the saved threshold and, against the authorized test
    set(s), the verdict's AUROC, true-authorization rate (TAR: authorized images accepted) and
    false-authorization rate (FAR: that set's images accepted). ``reference``: authorized test
    sets used for the AUROC / TAR without being reported as evaluated sets."""
    from ipshield.protect.ipclip.verdict import auroc

    auth = head.check_authorized(authorized)
    margins = {n: verdict_margins(head, split, adapter, tf, auth) for n, (split, tf) in sets.items()}
    ref = {n: verdict_margins(head, split, adapter, tf, auth) for n, (split, tf) in (reference or {}).items()
           if n not in sets}
    pos_sets = [n for n in auth if n in margins or n in ref]
    pos = np.concatenate([margins[n] if n in margins else ref[n] for n in pos_sets]) if pos_sets else None
    tar = float((pos >= 0).mean() * 100) if pos is not None and len(pos) else None
    report: dict = {"available": True, "authorized": auth, "feature": head.feature, "score": head.score_kind,
                    "threshold": head.threshold(auth), "accept": head.accept, "tar": tar, "sets": {}}
    if pos is None:
        report["note"] = (f"the authorized test set ({', '.join(auth)}) is not among the evaluated domains: "
                          "AUROC and TAR need it (add it to --domains)")
    for n, m in margins.items():
        accepted = float((m >= 0).mean() * 100) if len(m) else float("nan")
        if n in auth:
            report["sets"][n] = {"role": "authorized", "accepted": accepted, "tar": accepted, "far": None,
                                 "auroc": None, "n": int(len(m))}
        else:
            report["sets"][n] = {"role": "unauthorized", "accepted": accepted, "tar": tar, "far": accepted,
                                 "auroc": auroc(pos, m) if pos is not None else None, "n": int(len(m))}
    return report
