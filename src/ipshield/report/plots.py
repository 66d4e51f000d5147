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


# ============================================================================ the attack suite (robust.html)
def _mean_or_nan(vals) -> float:
    vals = [float(v) for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _short(attack: str) -> str:
    from ipshield.attacks.robust import SHORT

    return SHORT.get(attack, attack)


def accuracy_vs_k(rows: list[dict], path: str | Path | None = None):
    """Unauthorized accuracy against the attacker's k labelled images, one panel per k-attack (the
    fine-tuning strategies): one line per protected method (mean over pairs), the unprotected
    model under the same attack (black, dashed) and the same architecture trained from scratch on
    the same k images (grey, dotted). ``rows``: the long rows of ``ipshield.attacks.robust.robust_rows``.
    Returns the figure, or saves it to ``path`` (and returns the path)."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows if r.get("k") is not None))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if not m.startswith("source")]
    if not attacks:
        return None
    ks = sorted({int(r["k"]) for r in rows if r.get("k") is not None})
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.4 * len(attacks) + 1.6, 3.4), squeeze=False, sharey=True)
    for ax, a in zip(axes.flat, attacks):
        sel = [r for r in rows if r["attack"] == a]
        for i, m in enumerate(methods):
            ax.plot(ks, [_mean_or_nan(r["attacked"] for r in sel if r["method"] == m and r["k"] == k) for k in ks],
                    "o-", color=f"C{i % 10}", label=m, ms=4)
        ax.plot(ks, [_mean_or_nan(r["unprotected"] for r in sel if r["k"] == k) for k in ks], "s--", color="k",
                label="unprotected, same attack", ms=4)
        ax.plot(ks, [_mean_or_nan(r["scratch"] for r in sel if r["k"] == k) for k in ks], "^:", color="0.45",
                label="from scratch, same k and steps", ms=4)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("labelled unauthorized images k")
        ax.set_title(f"{a} ({_short(a)})", fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("unauthorized accuracy (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def radar_charts(rows: list[dict], path: str | Path | None = None, k: int | None = None):
    """One radar chart per method over the attacks: attacked unauthorized accuracy of the protected
    model (filled), of the unprotected model under the same attack (dashed) and the from-scratch
    reference (dotted); k-attacks at ``k`` (default: the middle of the grid). Mean over pairs."""
    ks = sorted({int(r["k"]) for r in rows if r.get("k") is not None})
    if k is None and ks:
        k = ks[len(ks) // 2]
    axes_keys = [(a, kk) for a, kk in dict.fromkeys((r["attack"], r["k"]) for r in rows) if kk is None or kk == k]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if not m.startswith("source")]
    if len(axes_keys) < 3 or not methods:
        return None
    angles = np.linspace(0, 2 * np.pi, len(axes_keys), endpoint=False).tolist()
    ncol = min(3, len(methods))
    nrow = int(np.ceil(len(methods) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.0 * nrow), subplot_kw={"polar": True}, squeeze=False)

    def series(m: str | None, col: str) -> list[float]:
        vals = []
        for a, kk in axes_keys:
            sel = [r for r in rows if r["attack"] == a and r["k"] == kk and (m is None or r["method"] == m)]
            vals.append(_mean_or_nan(r[col] for r in sel))
        return vals + vals[:1]

    ang = angles + angles[:1]
    for i, (ax, m) in enumerate(zip(axes.flat, methods)):
        prot = series(m, "attacked")
        ax.plot(ang, prot, "-", color=f"C{i % 10}", label=f"{m} (protected, attacked)")
        ax.fill(ang, np.nan_to_num(prot), color=f"C{i % 10}", alpha=0.2)
        ax.plot(ang, series(m, "unprotected"), "--", color="k", lw=1, label="unprotected, same attack")
        ax.plot(ang, series(m, "scratch"), ":", color="0.4", lw=1.2, label="from scratch / chance")
        ax.set_xticks(angles, [_short(a) + (f"\nk={kk}" if kk is not None else "") for a, kk in axes_keys], fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_yticks([25, 50, 75], ["25", "50", "75"], fontsize=6)
        ax.set_title(m, fontsize=10, pad=14)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, ["protected model, attacked", *labels[1:]], loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def _save(fig, path: str | Path | None):
    if path is None:
        return fig
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_png_base64(fig) -> str:
    """The figure as base64 PNG (for self-contained HTML); closes it."""
    import base64
    import io

    if fig is None:
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
