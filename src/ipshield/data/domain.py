"""The domain type every method consumes.

A domain has a name, its ordered class names, and a train and a test split. A split holds either
images in memory (uint8 array [N, H, W, 3], RGB) or image file paths (loaded lazily with PIL),
plus int64 labels [N] indexing ``classes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ipshield.data.images import read_image
from ipshield.errors import DataError


@dataclass
class ImageSplit:
    images: np.ndarray | list[Path]
    labels: np.ndarray
    #: for lazily loaded splits: how many files were skipped as unreadable (see ``on_corrupt``)
    skipped: int = 0

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"split has {len(self.images)} images but {len(self.labels)} labels", "check the data source")
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
                raise DataError(
                    f"in-memory images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}",
                    "convert gray images to RGB and scale to 0..255",
                )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, np.ndarray)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [H, W, 3]."""
        if self.in_memory:
            return self.images[i]  # type: ignore[index]
        return read_image(self.images[i])  # type: ignore[index]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSplit":
        idx = np.asarray(indices, dtype=np.int64)
        imgs = self.images[idx] if self.in_memory else [self.images[i] for i in idx]  # type: ignore[index]
        return ImageSplit(imgs, self.labels[idx])

    def to_tensor(self, size: int | None = None) -> torch.Tensor:
        """All images as float [N, 3, S, S] in [0, 1]. With ``size``, every image goes through
        ``ipshield.data.transforms.resize_crop`` (shorter side to ``size``, bicubic, anti-aliased
        when shrinking; centre crop), the function ``CLIPAdapter.preprocess`` uses too: identical
        pixels give identical tensors whether they are held in memory or read from files. Without
        ``size`` the images keep their resolution (files must then all have the same size)."""
        from ipshield.data.transforms import resize_crop

        if self.in_memory:
            x = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).float().div_(255.0)
            return resize_crop(x, size) if size is not None else x
        if size is not None:
            out = torch.empty(len(self), 3, size, size)
            for i in range(len(self)):
                img = torch.from_numpy(self.load(i)).permute(2, 0, 1).float().div_(255.0)
                out[i] = resize_crop(img[None], size)[0]
            return out
        images = [self.load(i) for i in range(len(self))]
        shapes = sorted({im.shape[:2] for im in images})
        if len(shapes) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in shapes[:4]) + (" ..." if len(shapes) > 4 else "")
            raise DataError(f"the image files have different sizes ({shown})",
                            "pass size= to to_tensor (images are then resized and centre-cropped to it)")
        if not images:
            return torch.empty(0, 3, 0, 0)
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class Domain:
    name: str
    classes: list[str]
    train: ImageSplit
    test: ImageSplit
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, {self.num_classes} classes, train={len(self.train)}, test={len(self.test)})"


def check_same_classes(domains: Sequence[Domain]) -> list[str]:
    """All domains must have the same ordered class names; a clear error lists the differences."""
    if not domains:
        raise DataError("no domains given", "name at least one domain")
    ref = domains[0]
    problems = []
    for d in domains[1:]:
        if d.classes != ref.classes:
            missing = sorted(set(ref.classes) - set(d.classes))
            extra = sorted(set(d.classes) - set(ref.classes))
            if not missing and not extra:
                problems.append(f"'{d.name}' has the same classes as '{ref.name}' in another order")
            else:
                parts = []
                if missing:
                    parts.append(f"lacks {missing}")
                if extra:
                    parts.append(f"has extra {extra}")
                problems.append(f"'{d.name}' {' and '.join(parts)} compared with '{ref.name}'")
    if problems:
        raise DataError(
            "the domains do not share one set of classes: " + "; ".join(problems),
            "use domains with identical class folders (or restrict them to the common classes)",
        )
    return list(ref.classes)
