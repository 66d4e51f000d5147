"""A PNG grid of sample images: one row per domain, each image titled with its class name."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ipshield.data.domain import Domain, ImageSplit
from ipshield.errors import DataError


def _pick_indices(split: ImageSplit, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices covering as many classes as possible (round-robin over classes)."""
    labels = split.labels
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out: list[int] = []
    depth = 0
    while len(out) < min(k, len(labels)):
        for idx in by_class:
            if depth < len(idx) and len(out) < k:
                out.append(int(idx[depth]))
        depth += 1
    return np.array(out, dtype=np.int64)


def _as_display(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] resized (nearest) to a square ``size`` for display."""
    h, w = img.shape[:2]
    ys = (np.arange(size) * h / size).astype(int)
    xs = (np.arange(size) * w / size).astype(int)
    return img[ys][:, xs]


def preview_grid(domains: Mapping[str, Domain], path: str | Path, per_domain: int = 10, seed: int = 0,
                 split: str = "test", cell: int = 64) -> Path:
    """Write a PNG grid (one row per domain, ``per_domain`` samples each, labelled with the domain
    and class names) to ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not domains:
        raise DataError("no domains to preview", "name at least one domain")
    if per_domain < 1:
        raise DataError(f"per_domain must be >= 1 (got {per_domain})", "pass a positive number of samples")
    rng = np.random.default_rng(seed)
    rows = []
    for name, dom in domains.items():
        sp = getattr(dom, split)
        if len(sp) == 0:
            sp = dom.train if split == "test" else dom.test
        if len(sp) == 0:
            raise DataError(f"domain '{name}' has no images", "check the data source")
        idx = _pick_indices(sp, per_domain, rng)
        rows.append((name, [(_as_display(sp.load(int(i)), cell), dom.classes[int(sp.labels[i])]) for i in idx]))

    ncols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.15 * ncols + 1.2, 1.35 * len(rows)), squeeze=False)
    for r, (name, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(items):
                img, cls = items[c]
                ax.imshow(img, interpolation="nearest")
                ax.set_title(str(cls)[:14], fontsize=7, pad=2)
        axes[r][0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center", labelpad=6)
    fig.tight_layout(pad=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
