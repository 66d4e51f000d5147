"""Plots people would rather look at than read. matplotlib with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_bars(acc: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "",
                  authorized: str | None = None, chance: float | None = None) -> Path:
    """Grouped bars: one group per domain, one bar per model (e.g. zero-shot, CoOp, IP-CLIP)."""
    models = list(acc)
    domains = list(next(iter(acc.values())))
    x = np.arange(len(domains))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(domains) * max(1, len(models)) / 2, 3.6))
    for i, m in enumerate(models):
        vals = [acc[m].get(d, np.nan) for d in domains]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=m)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    labels = [f"{d}\n(authorized)" if d == authorized else d for d in domains]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(models) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
