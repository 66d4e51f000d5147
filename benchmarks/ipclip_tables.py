"""Markdown tables of IP-CLIP / NTL-prompt run folders (the tables of docs/ipclip.md).

    .venv/bin/python benchmarks/ipclip_tables.py runs/ipclip/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "undef."
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def run_table(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    refs = m.get("references", {})
    sets = list(m["accuracy"]["after"])
    cols = [*(f"{k}" for k in refs), m["method"]]
    lines = [f"**{run.name}** · {m['method']} · scenario {m['scenario']} · authorized `{m['authorized']}`"
             f" · unauthorized (trained against / summarised) {m['unauthorized']}", "",
             "| test set | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for s in sets:
        role = " (authorized)" if s == m["authorized"] else (" (unauthorized)" if s in m["unauthorized"] else
                                                             (" (never seen)" if s in m.get("unseen", []) else ""))
        vals = [refs[k].get(s) for k in refs] + [m["accuracy"]["after"].get(s)]
        lines.append(f"| {s}{role} | " + " | ".join(fmt(v) for v in vals) + " |")
    lines.append("")
    for key in ("summary", "summary_unseen"):
        if key not in m:
            continue
        s = m[key]
        label = "vs " + m["reference"] + (" (unauthorized domains)" if key == "summary" else " (never-seen domains)")
        lines.append(f"- {label}: Drop_a {fmt(s['drop_a'])}, mean Acc_u {fmt(s.get('acc_u_after_mean'))}, "
                     f"Drop_u {fmt(s.get('drop_u_mean'))}, ST-D {fmt(s.get('st_d'), 3)}, gap {fmt(s.get('gap'))}, "
                     f"chance-normalised {fmt(s.get('chance_normalised'), 2)}, retention {fmt(s.get('retention'), 3)}, "
                     f"suppression {fmt(s.get('suppression'), 3)}, balanced score {fmt(s.get('balanced_score'), 3)}")
    t = m.get("timing")
    if t:
        lines.append(f"- training: {fmt(t.get('total_s'))} s ({fmt(t.get('images_per_s'))} authorized images/s)")
    sel = m.get("selection")
    if sel:
        scores = ", ".join(f"{k.replace('val_acc_', '')} {fmt(v)}" for k, v in sel.get("scores", {}).items())
        lines.append(f"- model selection [ours]: epoch {sel.get('epoch')} of {len(m.get('history', []))} "
                     f"(validation held out of the training images: {scores}; bound {fmt(sel.get('bound'))}, "
                     f"{'met' if sel.get('qualified') else 'not met'})")
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> None:
    for p in paths:
        run = Path(p)
        if (run / "metrics.json").is_file():
            print(run_table(run))


if __name__ == "__main__":
    main(sys.argv[1:])
