"""Accuracy tables for the terminal (rich) and markdown."""

from __future__ import annotations

from typing import Mapping

from rich.console import Console
from rich.table import Table


def accuracy_table(acc: Mapping[str, Mapping[str, float]], authorized: str | None = None, title: str = "") -> Table:
    models = list(acc)
    domains = list(next(iter(acc.values())))
    t = Table(title=title or None)
    t.add_column("domain")
    for m in models:
        t.add_column(m, justify="right")
    for d in domains:
        name = f"{d} (authorized)" if d == authorized else d
        t.add_row(name, *[f"{acc[m].get(d, float('nan')):.1f}" for m in models])
    return t


def print_accuracy_table(acc, authorized=None, title="") -> None:
    Console().print(accuracy_table(acc, authorized, title))


def markdown_accuracy_table(acc: Mapping[str, Mapping[str, float]], authorized: str | None = None) -> str:
    models = list(acc)
    domains = list(next(iter(acc.values())))
    lines = ["| domain | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for d in domains:
        name = f"{d} (authorized)" if d == authorized else d
        lines.append(f"| {name} | " + " | ".join(f"{acc[m].get(d, float('nan')):.1f}" for m in models) + " |")
    return "\n".join(lines) + "\n"


# ============================================================================ the attack suite (robust.html)
def robust_summary(rows: list[dict]) -> list[dict]:
    """Per method, attack and k: the mean over pairs of the protected attacked accuracy, the
    unprotected model under the same attack, the from-scratch reference and the margin."""
    import numpy as np

    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        for a, k in dict.fromkeys((r["attack"], r["k"]) for r in rows):
            sel = [r for r in rows if r["method"] == m and r["attack"] == a and r["k"] == k]
            agg: dict = {"method": m, "attack": a, "k": k, "pairs": len(sel)}
            for c in ("acc_u_protected", "attacked", "unprotected", "scratch", "margin"):
                vals = [r[c] for r in sel if r.get(c) is not None]
                agg[c] = float(np.mean(vals)) if vals else None
            out.append(agg)
    return out


def _cell(v, nd: int = 1) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v))


def robust_html(data: dict) -> str:
    """The self-contained HTML page of the attack suite (``robust.json`` of the digits benchmark):
    accuracy against k with the from-scratch and unprotected lines, one radar chart per method,
    the margin table, the labels-to-match table."""
    import html as _html

    from ipshield.report.plots import accuracy_vs_k, figure_png_base64, radar_charts

    rows, labels, meta = data.get("rows", []), data.get("labels", []), data.get("meta", {})
    e = _html.escape
    title = "Prompt attacks and honest references" if meta.get("target") == "prompt" else "Attack suite and honest references"
    parts = [f"<h1>{title} (seed {e(str(meta.get('seed')))})</h1>"]
    if meta.get("about"):  # the page's own account of its references (the prompt attacks of a suite)
        parts.append(f"<p>{e(str(meta['about']))}</p>")
    else:
        parts.append(
             "<p>Unauthorized test accuracy (%) after each attack, named as in the registry, the CLI and the API. "
             "<b>unprotected</b>: the unprotected source model under the same attack and budget; <b>scratch</b>: the same "
             "architecture trained from random weights on the same labelled images with the same steps (k-attacks: the k "
             "unauthorized images; attacks on a share of authorized images: that share, labelled; unlabelled attacks: "
             "chance); <b>margin</b> = protected attacked - scratch: at or below 0 the protection leaves the attacker no "
             "better off than starting over.</p>")
    for title, fig in (("Accuracy against k", accuracy_vs_k(rows)), ("One radar chart per method", radar_charts(rows))):
        b64 = figure_png_base64(fig)
        if b64:
            parts.append(f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,{b64}">')
    head = "".join(f"<th>{h}</th>" for h in ("method", "attack", "k", "pairs", "no attack", "protected, attacked",
                                               "unprotected, same attack", "from scratch", "margin"))
    body = []
    for r in robust_summary(rows):
        neg = r["margin"] is not None and r["margin"] <= 0
        body.append("<tr>" + "".join(f"<td>{e(_cell(r[c]))}</td>" for c in ("method", "attack")) +
                    f"<td>{'' if r['k'] is None else r['k']}</td><td>{r['pairs']}</td>" +
                    "".join(f"<td>{_cell(r[c])}</td>" for c in ("acc_u_protected", "attacked", "unprotected", "scratch")) +
                    f"<td{' class=ok' if neg else ''}>{_cell(r['margin'])}</td></tr>")
    parts.append("<h2>Mean over pairs</h2><table><tr>" + head + "</tr>" + "".join(body) + "</table>")
    if labels:
        parts.append("<h2>Labels to match the unprotected model</h2><p>Labelled unauthorized images the attacker needs, with "
                     "each fine-tuning strategy, for the attacked protected model to reach the unprotected model's "
                     f"unauthorized accuracy (interpolated in log k on the grid {e(str(meta.get('ks')))}).</p><table><tr>" +
                     "".join(f"<th>{h}</th>" for h in ("method", "authorized", "unauthorized", "attack", "target %", "labels")) +
                     "</tr>" + "".join("<tr>" + "".join(f"<td>{e(_cell(r[c]))}</td>" for c in
                                                        ("method", "authorized", "unauthorized", "attack", "target", "labels_text"))
                                       + "</tr>" for r in labels) + "</table>")
    css = ("body{font-family:sans-serif;max-width:1200px;margin:0 auto;padding:20px}table{border-collapse:collapse;font-size:12px}"
           "td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#eef1f5}td.ok{color:#0a5b1e;font-weight:700}"
           "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>ipshield attack suite</title>"
            f"<style>{css}</style></head><body>{''.join(parts)}</body></html>\n")


def write_robust_report(folder, out=None):
    """``folder/robust.json`` (written by the digits benchmark with ``robust``) -> ``robust.html``."""
    import json
    from pathlib import Path

    from ipshield.errors import IPShieldError

    folder = Path(folder)
    src = folder / "robust.json"
    if not src.is_file():
        raise IPShieldError(f"{folder} holds no attack-suite results (robust.json)",
                            "run `ipshield bench run digits-robust` (or a digits benchmark with robust: [...]) first")
    out = Path(out) if out else folder / "robust.html"
    out.write_text(robust_html(json.loads(src.read_text())), encoding="utf-8")
    return out
