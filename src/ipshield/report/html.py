"""One self-contained HTML report of a benchmark (``ipshield report RUN_FOLDER``).

Everything is inside the file: CSS inline, plots as base64 PNG (matplotlib, Agg backend); no
script, no server, no external asset. It reads a folder written by the benchmark harness
(``ipshield bench run SUITE``: ``cells/*.json``) or by ``ipshield bench digits``
(``metrics.json`` with ``rows`` and ``attacks``), and optionally a ``bench watermark`` folder.

Sections (each only when the data is there):

1. per method: Acc_a / Acc_u before and after, Drop_a, Drop_u, ST-D and ipshield's balance metrics,
   mean ± std over seeds, arrows from each metric's ``higher_is_better``, the best value in bold;
2. accuracy before/after per pair (bars with the spread over seeds) and on every evaluated domain;
3. the metrics' spread over seeds (one point per seed);
4. cost to break: unauthorized accuracy recovered by fine-tuning with k labels and by SHOT;
5. watermark p-values against attack strength (``--watermark-run``);
6. the embedding map: 2-D PCA of authorized vs unauthorized images before and after protection;
7. the per-pair table.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ipshield.bench.watermark import SCHEMES as WM_SCHEMES
from ipshield.errors import IPShieldError

AUTH_COLOR = "#1f77b4"
UNAUTH_COLOR = "#d62728"


# ============================================================================ loading


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The rows, cells, attacks and embedding map of a harness or ``bench digits`` folder."""
    from ipshield.bench.harness import attack_rows, cell_row

    run = Path(run_dir)
    if not run.is_dir():
        raise IPShieldError(f"{run} is not a folder", "give the --out folder of `ipshield bench run` or `ipshield bench digits`")
    info = _read_json(run / "run.json") or {}
    cells_dir = run / "cells"
    data: dict[str, Any] = {"run": run, "info": info, "title": run.name, "suite": None, "cells": [], "rows": [],
                            "attacks": [], "embedding": None, "failed": []}
    if info.get("kind") == "bench-digits" or ((run / "metrics.json").is_file() and not (run / "suite.yaml").is_file()
                                                and "rows" in (_read_json(run / "metrics.json") or {})):
        m = _read_json(run / "metrics.json") or {}
        if "rows" not in m:
            raise IPShieldError(f"{run} holds a digits benchmark that has not finished yet", "rerun `ipshield bench digits` to finish it")
        data["title"] = f"digits benchmark ({run.name})"
        for r in m["rows"]:
            a, u = r["authorized"], r["unauthorized"]
            cell = {"method": r["method"], "authorized": a, "unauthorized": [u], "pair": [a, u], "seed": r.get("seed"),
                    "n_classes": 10, "seconds": r.get("seconds"), "reference": "source",
                    "accuracy": {"before": {a: r["acc_a_before"], u: r["acc_u_before"]},
                                 "after": {a: r["acc_a_after"], u: r["acc_u_after"]}}}
            data["cells"].append(cell)
        data["attacks"] = list(m.get("attacks", []))
    elif cells_dir.is_dir():
        import yaml

        if (run / "suite.yaml").is_file():
            data["suite"] = yaml.safe_load((run / "suite.yaml").read_text())
            data["title"] = f"suite {data['suite'].get('name', run.name)}"
        order = _suite_order(data["suite"])
        planned = _planned_keys(data["suite"])
        for p in sorted(cells_dir.glob("*.json")):
            c = _read_json(p)
            if c and "accuracy" in c and (planned is None or p.stem in planned):  # cells of another suite run here are left out
                data["cells"].append(c)
        data["cells"].sort(key=lambda c: order.get(c.get("method"), 999))
        data["attacks"] = attack_rows(data["cells"])
        data["failed"] = sorted(p.name[:-len(".error.txt")] for p in cells_dir.glob("*.error.txt"))
        for c in data["cells"]:
            emb = c.get("embedding_map")
            if emb and (run / emb["file"]).is_file():
                with np.load(run / emb["file"]) as z:
                    data["embedding"] = {**emb, **{k: z[k] for k in z.files}, "method": c["method"],
                                         "accuracy": c["accuracy"], "authorized_set": c["authorized"]}
                break
    else:
        raise IPShieldError(f"{run} holds no benchmark results (no cells/ folder, no digits metrics.json)",
                            "give the --out folder of `ipshield bench run` or `ipshield bench digits`")
    data["rows"] = [cell_row(c) for c in data["cells"]]
    return data


def _planned_keys(suite: dict | None) -> set[str] | None:
    """The cell keys of the suite saved in the folder (None when it cannot be read)."""
    from ipshield.bench.harness import SuiteConfig, cell_key

    if not suite:
        return None
    try:
        cfg = SuiteConfig.build(suite)
    except IPShieldError:
        return None
    return {cell_key(m.name, a, u, s) for s in cfg.seeds for a, u in cfg.pair_list() for m in cfg.methods}


def _suite_order(suite: dict | None) -> dict[str, int]:
    if not suite:
        return {}
    return {(m["name"] if isinstance(m, dict) else m): i for i, m in enumerate(suite.get("methods", []))}


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_watermark(folder: str | Path) -> dict:
    p = Path(folder) / "metrics.json"
    m = _read_json(p)
    if not m or not any(s in m for s in WM_SCHEMES):
        raise IPShieldError(f"{folder} is not a finished `ipshield bench watermark` folder (no metrics.json with results)",
                            "give the --out folder of `ipshield bench watermark` after it finished")
    return m


# ============================================================================ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _seed_means(rows: list[dict], key: str, **match: Any) -> list[float]:
    """Per seed: the mean of ``key`` over the matching rows (pairs)."""
    per: dict[Any, list[float]] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get(key) is not None and math.isfinite(r[key]):
            per.setdefault(r.get("seed"), []).append(r[key])
    return [float(np.mean(v)) for v in per.values()]


def _ms(vals: list[float]) -> tuple[float, float]:
    if not vals:
        return float("nan"), 0.0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_pairs(rows: list[dict], chance: float | None) -> str:
    """Per pair: Acc_a and Acc_u before/after for every method (error bars: std over seeds)."""
    plt = _plt()
    pairs = list(dict.fromkeys((r["authorized"], r["unauthorized"]) for r in rows))
    methods = _methods(rows)
    ncol = min(3, len(pairs))
    nrow = math.ceil(len(pairs) / ncol)
    w = max(4.2, 0.75 * len(methods) + 1.5)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, 3.3 * nrow), squeeze=False, sharey=True)
    series = [("acc_a_before", "Acc_a before", "#aec7e8"), ("acc_a_after", "Acc_a after", AUTH_COLOR),
              ("acc_u_before", "Acc_u before", "#ff9896"), ("acc_u_after", "Acc_u after", UNAUTH_COLOR)]
    x = np.arange(len(methods))
    width = 0.2
    for ax, (a, u) in zip(axes.flat, pairs):
        for j, (key, label, color) in enumerate(series):
            ms = [_ms(_seed_means(rows, key, method=m, authorized=a, unauthorized=u)) for m in methods]
            ax.bar(x + (j - 1.5) * width, [v[0] for v in ms], width, yerr=[v[1] for v in ms], color=color, label=label,
                   capsize=2, error_kw={"lw": 0.8})
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", lw=0.8, label="chance")
        ax.set_title(f"authorized {a} → unauthorized {u}", fontsize=9)
        ax.set_xticks(x, methods, fontsize=8, rotation=20 if len(methods) > 4 else 0)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _png(fig)


SPREAD_METRICS = [("drop_a", "Drop_a (points)"), ("drop_u", "Drop_u (points)"), ("st_d", "ST-D"),
                  ("gap", "Gap (points)"), ("balanced_score", "Balanced score")]


def plot_spread(rows: list[dict], directions: dict[str, bool | None]) -> str:
    """One panel per metric: every seed's value (mean over pairs) and mean ± std per method."""
    plt = _plt()
    methods = _methods(rows)
    metrics = [(k, t) for k, t in SPREAD_METRICS if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(2.6, 0.55 * len(methods) + 1.2) * len(metrics), 3.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (key, title) in zip(axes.flat, metrics):
        for i, m in enumerate(methods):
            vals = _seed_means(rows, key, method=m)
            if not vals:
                continue
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, color="0.45", zorder=3)
            mean, std = _ms(vals)
            ax.errorbar(i, mean, yerr=std, fmt="D", color=f"C{i % 10}", ms=6, capsize=4, zorder=4)
        arrow = {True: "↑ higher is better", False: "↓ lower is better"}.get(directions.get(key), "")
        ax.set_title(f"{title}\n{arrow}", fontsize=9)
        ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_cost_to_break(attacks: list[dict]) -> str:
    """Unauthorized accuracy (mean over pairs and seeds) after each attack, one line per method."""
    plt = _plt()
    ks = sorted({int(k.split("_k")[1]) for r in attacks for k in r if k.startswith("finetune_k")})
    steps = [("acc_u_protected", "no attack")] + [(f"finetune_k{k}", f"fine-tune\nk={k}") for k in ks] + [("shot", "SHOT\n(no labels)")]
    methods = list(dict.fromkeys(r["method"] for r in attacks))
    fig, ax = plt.subplots(figsize=(1.5 * len(steps) + 3, 3.8))
    for i, m in enumerate(methods):
        rs = [r for r in attacks if r["method"] == m]
        ys, es = [], []
        for key, _ in steps:
            v = [r[key] for r in rs if r.get(key) is not None]
            ys.append(np.mean(v) if v else np.nan)
            es.append(np.std(v) if len(v) > 1 else 0.0)
        unprotected = m.startswith("source")
        ax.errorbar(range(len(steps)), ys, yerr=es, marker="o", capsize=3, label=m, ls="--" if unprotected else "-",
                    color="k" if unprotected else f"C{i % 10}", alpha=0.9)
    ax.set_xticks(range(len(steps)), [s[1] for s in steps], fontsize=8)
    ax.set_ylabel("unauthorized accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("cost to break: accuracy the attacker recovers on the unauthorized domain (mean ± spread over pairs and seeds)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


#: axis labels of the watermark attacks (the ``ATTACKS`` names, as in ``bench watermark``'s tables)
WM_LABELS = {"wm-noise": "Gaussian noise (norm)", "wm-dim-removal": "dimension removal (directions)",
             "wm-prune": "pruning (fraction)", "wm-finetune": "fine-tuning (steps)",
             "wm-rotate": "rotation (fraction of dimensions)", "wm-permute": "permutation (fraction of coordinates)",
             "wm-signed-permute": "signed permutation (fraction of coordinates)"}


def plot_watermark(wm: dict) -> str:
    """-log10 p (combined) and the thief's zero-shot accuracy against attack strength, per scheme."""
    plt = _plt()
    schemes = [s for s in WM_SCHEMES if s in wm]
    kinds = []
    for s in schemes:
        for r in wm[s].get("attacks", []):
            if r.get("attack") not in kinds and r.get("attack") != "none" and _numeric(r.get("strength")):
                kinds.append(r["attack"])
    if not kinds:
        return ""
    alpha = (wm.get("config") or {}).get("alpha", 1e-6)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.3 * len(kinds), 3.4), squeeze=False)
    twins = []
    for ax, kind in zip(axes.flat, kinds):
        ax2 = ax.twinx()
        twins.append(ax2)
        for i, s in enumerate(schemes):
            rr = sorted((r for r in wm[s]["attacks"] if r.get("attack") == kind and _numeric(r.get("strength"))),
                        key=lambda r: float(r["strength"]))
            if not rr:
                continue
            xs = [float(r["strength"]) for r in rr]
            ps = [max(r["p_value"], 1e-300) if r.get("p_value") is not None else 1.0 for r in rr]
            ax.plot(xs, [-math.log10(p) for p in ps], "o-", color=f"C{i}", label=f"{s}: -log10 p")
            ax2.plot(xs, [r.get("zero_shot_mean", np.nan) for r in rr], "s:", color=f"C{i}", alpha=0.6, label=f"{s}: thief zero-shot")
        ax.axhline(-math.log10(alpha), color="k", ls="--", lw=0.8, label=f"alpha = {alpha:g}")
        ax.set_xlabel(WM_LABELS.get(kind, kind), fontsize=8)
        ax.set_ylabel("-log10 p (combined)", fontsize=8)
        ax2.set_ylabel("thief zero-shot (%)", fontsize=8)
        ax.set_title(kind, fontsize=9)
        ax.grid(alpha=0.3)
    h1, l1 = axes.flat[0].get_legend_handles_labels()
    h2, l2 = twins[0].get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="lower center", ncol=min(5, len(l1 + l2)), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _png(fig)


def _numeric(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def plot_embedding(emb: dict) -> str:
    plt = _plt()
    doms = emb["domains"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    acc = emb.get("accuracy", {})
    for ax, which in zip(axes, ("before", "after")):
        pts = np.asarray(emb[which])
        dom = np.asarray(emb["domain"])
        for i, (name, color) in enumerate(zip(doms, (AUTH_COLOR, UNAUTH_COLOR))):
            sel = dom == i
            a = (acc.get(which) or {}).get(name)
            label = f"{name} ({'authorized' if i == 0 else 'unauthorized'})" + (f", acc {a:.0f}%" if a is not None else "")
            ax.scatter(pts[sel, 0], pts[sel, 1], s=9, alpha=0.55, color=color, label=label, edgecolors="none")
        model_name = emb["before_name"] if which == "before" else emb["after_name"]
        ax.set_title(f"{which} protection ({model_name})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="best", markerscale=2)
    fig.tight_layout()
    return _png(fig)


# ============================================================================ html


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:24px 32px 60px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;border-bottom:2px solid #e3e6eb;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}p,li{font-size:14px;line-height:1.45}.meta{color:#5b6473;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0 12px;width:100%}
th,td{border:1px solid #dde1e7;padding:4px 6px;text-align:right;white-space:nowrap}th{white-space:normal}
th{background:#eef1f5;font-weight:600}td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fafbfc}
td.best{font-weight:700;color:#0a5b1e}.up{color:#0a7a2a}.down{color:#0a4f9e}
img{max-width:100%;height:auto;display:block;margin:6px 0 4px;border:1px solid #eceff3}
nav{font-size:13px;margin:10px 0 4px}nav a{margin-right:14px;color:#1f5fbf;text-decoration:none}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;font-size:13px}
.fail{background:#fdecea;border-left:4px solid #d62728;padding:6px 10px;font-size:13px}
.scroll{overflow-x:auto}code{background:#f0f2f5;padding:1px 4px;border-radius:3px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, nd: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def _arrow_html(d: bool | None) -> str:
    if d is True:
        return ' <span class="up" title="higher is better">↑</span>'
    if d is False:
        return ' <span class="down" title="lower is better">↓</span>'
    return ""


def _summary_table(agg: list[dict], first: list[tuple[str, str]], directions: dict[str, bool | None],
                   group: tuple[str, ...] = ()) -> str:
    """Mean ± std table; the best protected value of each column is in bold (within each ``group``,
    e.g. per pair). Unprotected references (zero-shot, source) are not candidates, except for Acc_a."""
    from ipshield.bench.harness import ROW_METRICS

    best: dict[tuple, Any] = {}
    groups = {tuple(a.get(k) for k in group) for a in agg}
    for g in groups:
        members = [a for a in agg if tuple(a.get(k) for k in group) == g]
        for key, _h, _n, _d in ROW_METRICS:
            d = directions.get(key)
            vals = [a[key] for a in members if a.get(key) is not None
                    and not (a["method"] in ("zero-shot", "source") and key != "acc_a_after")]
            if d is not None and len(vals) > 1 and max(vals) - min(vals) > 1e-9:  # no bold when all tie
                best[(g, key)] = max(vals) if d else min(vals)
    head = "".join(f'<th class="l">{_e(h)}</th>' for _k, h in first)
    head += "".join(f"<th>{_e(h)}{_arrow_html(directions.get(k))}</th>" for k, h, _n, _d in ROW_METRICS)
    body = []
    for a in agg:
        g = tuple(a.get(k) for k in group)
        tds = "".join(f'<td class="l">{_e(a.get(k))}</td>' for k, _h in first)
        for key, _h, nd, _d in ROW_METRICS:
            v, s = a.get(key), a.get(key + "_std")
            txt = _num(v, nd) + (f" ± {_num(s, nd)}" if s is not None else "")
            b = best.get((g, key))
            cls = ' class="best"' if b is not None and v is not None and abs(v - b) < 1e-12 else ""
            tds += f"<td{cls}>{txt}</td>"
        body.append(f"<tr>{tds}</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _domain_table(cells: list[dict]) -> str:
    """Accuracy before → after on every evaluated domain, per method and authorized domain
    (mean over the cells: pairs with that authorized domain, and seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    domains: list[str] = []
    for c in cells:
        a = (c.get("pair") or [c["authorized"]])[0]
        groups.setdefault((c["method"], a), []).append(c)
        for d in c["accuracy"]["after"]:
            if d not in domains:
                domains.append(d)
    head = '<th class="l">method</th><th class="l">authorized</th>' + "".join(f"<th>{_e(d)}</th>" for d in domains)
    body = []
    for (m, a), cs in groups.items():
        tds = f'<td class="l">{_e(m)}</td><td class="l">{_e(a)}</td>'
        for d in domains:
            b = [c["accuracy"]["before"].get(d) for c in cs if c["accuracy"]["before"].get(d) is not None]
            f = [c["accuracy"]["after"].get(d) for c in cs if c["accuracy"]["after"].get(d) is not None]
            if not f:
                tds += "<td>–</td>"
                continue
            style = ' style="font-weight:600"' if d == a else ""
            tds += f"<td{style}>{np.mean(b):.1f} → {np.mean(f):.1f}</td>" if b else f"<td{style}>{np.mean(f):.1f}</td>"
        body.append(f"<tr>{tds}</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _attack_table(attacks: list[dict]) -> str:
    ks = sorted({int(k.split("_k")[1]) for r in attacks for k in r if k.startswith("finetune_k")})
    cols = [("acc_u_protected", "Acc_u protected")] + [(f"finetune_k{k}", f"fine-tune k={k}") for k in ks] + [("shot", "SHOT")]
    head = "".join(f'<th class="l">{h}</th>' for h in ("method", "authorized", "unauthorized", "seed")) + "".join(f"<th>{_e(h)}</th>" for _k, h in cols)
    body = "".join("<tr>" + "".join(f'<td class="l">{_e(r.get(k))}</td>' for k in ("method", "authorized", "unauthorized", "seed")) +
                   "".join(f"<td>{_num(r.get(k), 1)}</td>" for k, _h in cols) + "</tr>" for r in attacks)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _watermark_table(wm: dict) -> str:
    rows = []
    for s in WM_SCHEMES:
        if s not in wm:
            continue
        r = wm[s]
        ext = r.get("extraction") or []
        main = ext[-1] if ext else {}
        ident = (r.get("identification") or {}).get("student", {})
        rows.append(f'<tr><td class="l">{s}</td><td>{_pval(main.get("p_value"))}</td><td class="l">{_e(main.get("verdict", "–"))}</td>'
                    f'<td>{_num(r.get("false_positive_rate"), 2)}</td><td>{len(r.get("innocents", []))}</td>'
                    f'<td class="l">{_e(ident.get("identified", "–"))} (true {_e(ident.get("true", "–"))})</td></tr>')
    return ('<table><tr><th class="l">scheme</th><th>p (main stolen student)</th><th class="l">verdict</th><th>false-positive rate</th>'
            '<th>innocent models</th><th class="l">leaking customer identified</th></tr>' + "".join(rows) + "</table>")


def _pval(p: Any) -> str:
    return "n/a" if p is None else f"{p:.2e}"


def render_html(data: dict[str, Any], watermark: dict | None = None, watermark_path: str | None = None) -> str:
    from ipshield.bench.harness import aggregate, metric_directions

    directions = metric_directions()
    rows, cells, attacks = data["rows"], data["cells"], data["attacks"]
    chance = None
    if cells:
        n = cells[0].get("n_classes") or 10
        chance = 100.0 / n
    seeds = sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    parts: list[str] = []
    toc: list[tuple[str, str]] = []

    def section(anchor: str, title: str, body: str) -> None:
        toc.append((anchor, title))
        parts.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>')

    suite = data.get("suite") or {}
    meta = [f"{len(cells)} cells", f"methods: {', '.join(_methods(rows)) or '–'}",
            f"pairs: {len({(r['authorized'], r['unauthorized']) for r in rows})}", f"seeds: {', '.join(map(str, seeds)) or '–'}"]
    if suite.get("source"):
        meta.insert(0, f"data: {suite['source']}")
    header = (f"<h1>ipshield benchmark report: {_e(data['title'])}</h1>"
              f'<p class="meta">{_e(" · ".join(meta))} · generated {time.strftime("%Y-%m-%d %H:%M")} from <code>{_e(data["run"])}</code></p>')
    if suite.get("description"):
        header += f"<p>{_e(suite['description'])}</p>"
    if data.get("failed"):
        header += f'<p class="fail">Failed cells (not in the tables; see <code>cells/&lt;key&gt;.error.txt</code>, rerun to retry): {_e(", ".join(data["failed"]))}</p>'

    if rows:
        agg = aggregate(rows, ("method",))
        body = ("<p>Accuracies in percent, drops in points; mean ± std over seeds (std shown with 2 or more seeds) of the "
                "per-seed mean over the pairs. The best protected value per column is in bold. ST-D = Drop_a / Drop_u is MAP's "
                "metric (n/a when Drop_u ≤ 0); Gap, Acc_u/chance and Balanced are ipshield's own balance metrics "
                "(docs/metrics.md), not a paper's. “Before” is each method's unprotected reference: zero-shot for CoOp, CoOp for "
                "IP-CLIP and NTL-prompt, the source classifier for MAP, NTL and CUTI-domain.</p>")
        body += _summary_table(agg, [("method", "method"), ("pairs", "pairs")], directions)
        section("summary", "Methods at a glance", body)
        body = _img(plot_pairs(rows, chance), "accuracy before and after per pair")
        body += "<h3>Every evaluated domain (before → after; authorized domain in bold)</h3>" + _domain_table(cells)
        section("accuracy", "Accuracy before and after protection", body)
        if any(r.get("seed") is not None for r in rows):
            body = ("<p>Each grey point is one seed (mean over the pairs); the diamond and bar are the mean ± std over seeds.</p>"
                    + _img(plot_spread(rows, directions), "metric spread over seeds"))
            section("spread", "Metrics and their spread over seeds", body)
    else:
        parts.append("<p class='note'>No finished cells yet.</p>")

    if attacks:
        body = ("<p>The attacker holds the protected model and tries to get the unauthorized domain back: fine-tuning all "
                "weights with k labelled unauthorized images, or SHOT-style source-free adaptation without labels. The lower "
                "the curve, the more it costs to break the protection; the dashed black line is the unprotected source "
                "model.</p>" + _img(plot_cost_to_break(attacks), "cost to break") + _attack_table(attacks))
        section("cost", "Cost to break", body)

    if watermark is not None:
        b64 = plot_watermark(watermark)
        body = (f"<p>From <code>{_e(watermark_path or '')}</code>: the stolen student's combined verification p-value "
                "(-log10, higher = stronger evidence) and the thief's zero-shot accuracy against the strength of each attack "
                "on the stolen embeddings; the dashed line is the decision level alpha.</p>" + _img(b64, "watermark p-values")
                + _watermark_table(watermark))
        section("watermark", "Watermark: p-values against attack strength", body)

    emb = data.get("embedding")
    if emb is not None:
        body = (f"<p>Cell <b>{_e(emb['method'])}</b>, {_e(emb['domains'][0])} (authorized) vs {_e(emb['domains'][1])} "
                f"(unauthorized), {len(emb['domain'])} test images. Representation [ours]: {_e(emb.get('representation', ''))}. "
                "The frozen image tower of a prompt method gives the same image features before and after, so what protection "
                "moves is where each image lands relative to the class text features; each panel is its own PCA.</p>"
                + _img(plot_embedding(emb), "embedding map"))
        section("embedding", "Embedding map", body)

    if data.get("robust_reports"):
        links = "".join(f'<li><a href="{_e(r)}">{_e(r)}</a></li>' for r in data["robust_reports"])
        section("attack-suite", "Attack suite",
                "<p>Every attack and k against each protection, with the unprotected model and training from scratch "
                "as references (accuracy against k, margins, radar charts): written next to this report.</p>"
                f"<ul>{links}</ul>")

    if rows:
        agg = aggregate(rows, ("authorized", "unauthorized", "method"))
        order = {m: i for i, m in enumerate(_methods(rows))}
        agg.sort(key=lambda a: (a["authorized"], a["unauthorized"], order.get(a["method"], 999)))
        body = "<p>Mean ± std over seeds; the best protected value of each pair is in bold.</p>" + _summary_table(
            agg, [("authorized", "authorized"), ("unauthorized", "unauthorized"), ("method", "method")], directions,
            group=("authorized", "unauthorized"))
        section("pairs", "Per pair and method", body)
    nav = "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in toc) + "</nav>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>ipshield report: {_e(data['title'])}</title>"
            f"<style>{CSS}</style></head><body><main>{header}{nav}{''.join(parts)}"
            "<p class=\"meta\" style=\"margin-top:40px\">Written by ipshield (<code>ipshield report</code>). Self-contained: no "
            "script, no external asset.</p></main></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, watermark_run: str | Path | None = None) -> Path:
    """Render ``run_dir`` (and the watermark folder if given) to one HTML file (default ``run_dir/report.html``)."""
    data = load_results(run_dir)
    wm = load_watermark(watermark_run) if watermark_run else None
    out = Path(out) if out else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    robust = write_robust_reports(run_dir)
    if robust:  # linked from the report, relative to where it is written
        data = {**data, "robust_reports": [os.path.relpath(p, out.parent) for p in robust]}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(render_html(data, wm, str(watermark_run) if watermark_run else None), encoding="utf-8")
    tmp.replace(out)
    return out


def write_robust_reports(run_dir: str | Path) -> list[Path]:
    """robust.html (accuracy against k with the references, radar charts) next to every attack-suite
    result (robust.json) of a benchmark folder: the folder itself, its shared cells and a suite's
    prompt attacks (``prompt-robust/``)."""
    from ipshield.report.tables import write_robust_report

    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "robust.json", *sorted(run_dir.glob("shared/*/robust.json")),
                         run_dir / "prompt-robust" / "robust.json"] if p.is_file()]
    return [write_robust_report(p.parent) for p in found]
