"""Evaluating an image classifier on a split: predicted classes and top-1 accuracy.

A classifier here is anything with ``predict_logits(images) -> [B, n_classes]`` (or a plain
callable doing the same). Images handed to it are float tensors [B, 3, H, W] in [0, 1] at the
dataset's resolution; each model does its own resizing and normalisation.

(Moved down from the protection layer's ``protect/base.py``, which re-exports every name.)
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from ipshield.data.domain import Domain, ImageSplit


class DomainClassifier(Protocol):
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor: ...


Transform = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: DomainClassifier | Callable[[torch.Tensor], torch.Tensor], split: ImageSplit, batch_size: int = 256,
            size: int | None = None, transform: Transform | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """Predicted class index for every image of ``split``. ``transform`` (e.g. the grid watermark)
    is applied to the [0, 1] images before the model sees them."""
    fn = model.predict_logits if hasattr(model, "predict_logits") else model
    if size is None and not split.in_memory:
        # files may differ in size: batch them at the model's input size when it has one (a CLIP
        # classifier), else at their own size (to_tensor says so clearly when the files differ)
        size = _model_image_size(model)
    preds = []
    for start in range(0, len(split), batch_size):
        x = split.subset(range(start, min(len(split), start + batch_size))).to_tensor(size).to(device)
        if transform is not None:
            x = transform(x)
        preds.append(fn(x).argmax(-1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def _model_image_size(model) -> int | None:
    """The input resolution a model declares (``image_size``, or its CLIP adapter's), if any."""
    for obj in (model, getattr(model, "adapter", None)):
        size = getattr(obj, "image_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def accuracy(model: DomainClassifier | Callable[[torch.Tensor], torch.Tensor], split: ImageSplit, **kw) -> float:
    """Top-1 accuracy in percent."""
    if len(split) == 0:
        return float("nan")
    pred = predict(model, split, **kw)
    return float((pred == split.labels).mean() * 100.0)


def accuracy_by_domain(model, domains: Mapping[str, Domain], **kw) -> dict[str, float]:
    """Test accuracy (percent) on each domain, keyed by domain name."""
    return {name: accuracy(model, d.test, **kw) for name, d in domains.items()}


__all__ = ["DomainClassifier", "Transform", "predict", "accuracy", "accuracy_by_domain"]
