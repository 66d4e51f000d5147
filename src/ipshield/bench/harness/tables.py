"""The tables of a suite run: results.csv, summary.csv and results.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from ipshield.bench.harness.suite import SuiteConfig


def _mean(v: Any) -> float | None:
    if isinstance(v, dict):
        vals = [x for x in v.values() if x is not None]
        return sum(vals) / len(vals) if vals else None
    return v


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)

# ============================================================================ tables

#: (key, header, decimals, direction: True = higher is better, False = lower, None = neither)
ROW_METRICS: list[tuple[str, str, int, bool | None]] = [
    ("acc_a_before", "Acc_a before", 1, None),
    ("acc_a_after", "Acc_a after", 1, True),
    ("acc_u_before", "Acc_u before", 1, None),
    ("acc_u_after", "Acc_u after", 1, False),
    ("drop_a", "Drop_a", 1, False),
    ("drop_u", "Drop_u", 1, True),
    ("st_d", "ST-D", 3, False),
    ("gap", "Gap", 1, True),
    ("chance_normalised", "Acc_u/chance", 2, False),
    ("balanced_score", "Balanced", 3, True),
]


def metric_directions() -> dict[str, bool | None]:
    """Whether higher is better for each table column (True/False; None: neither), from
    ``ROW_METRICS`` and ``ipshield.metrics`` (each function's ``higher_is_better``)."""
    from ipshield import metrics as M

    d = {k: v for k, _h, _n, v in ROW_METRICS}
    d.update({"drop_a": M.drop_a.higher_is_better, "drop_u": M.drop_u.higher_is_better, "st_d": M.st_d.higher_is_better,
              "gap": M.gap.higher_is_better, "chance_normalised": M.chance_normalised.higher_is_better,
              "balanced_score": M.balanced_score.higher_is_better})
    d["acc_a_after"] = M.DIRECTIONS.get("acc_a_after", True)
    d["acc_u_after"] = M.DIRECTIONS.get("acc_u_after_mean", False)
    return d


def cell_row(cell: dict) -> dict:
    """One row of results.csv from a finished cell: the summary recomputed for this cell's pair."""
    from ipshield.metrics import summarize_restriction

    acc = cell["accuracy"]
    auth = cell["authorized"]
    unauth = cell["unauthorized"]
    if isinstance(unauth, str):
        unauth = [unauth]
    n_classes = int(cell.get("n_classes") or 10)
    s = summarize_restriction(acc["before"], acc["after"], auth, n_classes, list(unauth))
    pair = cell.get("pair") or [auth, ",".join(unauth)]
    row = {"method": cell["method"], "authorized": pair[0], "unauthorized": pair[1], "seed": cell.get("seed"),
           "acc_a_before": s["acc_a_before"], "acc_a_after": s["acc_a_after"],
           "acc_u_before": _mean(s.get("acc_u_before")), "acc_u_after": s.get("acc_u_after_mean"),
           "drop_a": s["drop_a"], "drop_u": s.get("drop_u_mean"), "st_d": s.get("st_d"), "gap": s.get("gap"),
           "chance_normalised": s.get("chance_normalised"), "balanced_score": s.get("balanced_score"),
           "reference": cell.get("reference", ""), "seconds": cell.get("seconds")}
    return row


def _std(vals: list[float]) -> float | None:
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def aggregate(rows: list[dict], by: Iterable[str] = ("method",)) -> list[dict]:
    """Mean and std over seeds of every metric, grouped by ``by``; the pairs inside a group are
    first averaged per seed (ST-D over the pairs where it is defined)."""
    by = tuple(by)
    groups: dict[tuple, dict[Any, list[dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), {}).setdefault(r.get("seed"), []).append(r)
    out = []
    for gkey, per_seed in groups.items():
        agg: dict[str, Any] = dict(zip(by, gkey))
        agg["seeds"] = len(per_seed)
        agg["pairs"] = len({(r["authorized"], r["unauthorized"]) for rs in per_seed.values() for r in rs})
        for key, *_ in ROW_METRICS:
            seed_means = []
            for rs in per_seed.values():
                vals = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
                if vals:
                    seed_means.append(sum(vals) / len(vals))
            agg[key] = sum(seed_means) / len(seed_means) if seed_means else None
            agg[key + "_std"] = _std(seed_means)
        out.append(agg)
    return out


def _pm(mean: Any, std: Any, nd: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{nd}f}" + (f" ± {std:.{nd}f}" if std is not None else "")


def _arrow(direction: bool | None) -> str:
    return " ↑" if direction is True else " ↓" if direction is False else ""


def markdown_tables(rows: list[dict], suite: SuiteConfig | None = None) -> str:
    dirs = metric_directions()
    head_cols = [f"{h}{_arrow(dirs.get(k))}" for k, h, _n, _d in ROW_METRICS]
    seeds = sorted({r.get("seed") for r in rows}, key=lambda s: (s is None, s))
    title = suite.name if suite else "benchmark"
    lines = [f"# Benchmark suite `{title}`", ""]
    if suite and suite.description:
        lines += [suite.description.strip(), ""]
    lines += [f"Seeds: {', '.join(str(s) for s in seeds)}. Accuracies in percent; Drop in points; mean ± std over seeds "
              "(std with n-1, shown when there are at least 2 seeds) of the per-seed mean over the pairs. "
              "↑ higher is better, ↓ lower is better. ST-D = Drop_a / Drop_u (MAP); Gap, Acc_u/chance and Balanced are "
              "ipshield's own balance metrics (docs/metrics.md), not a paper's. \"Before\" is each method's unprotected "
              "reference (zero-shot for CoOp, CoOp for IP-CLIP and NTL-prompt, the source model for MAP/NTL/CUTI).", "",
              "## Per method (mean over pairs)", "",
              "| method | pairs | " + " | ".join(head_cols) + " |", "|---|---:|" + "---:|" * len(ROW_METRICS)]
    for a in aggregate(rows, ("method",)):
        lines.append(f"| {a['method']} | {a['pairs']} | " + " | ".join(_pm(a[k], a[k + '_std'], n) for k, _h, n, _d in ROW_METRICS) + " |")
    lines += ["", "## Per method and pair", "", "| method | authorized | unauthorized | " + " | ".join(head_cols) + " |",
              "|---|---|---|" + "---:|" * len(ROW_METRICS)]
    for a in aggregate(rows, ("method", "authorized", "unauthorized")):
        lines.append(f"| {a['method']} | {a['authorized']} | {a['unauthorized']} | " +
                     " | ".join(_pm(a[k], a[k + '_std'], n) for k, _h, n, _d in ROW_METRICS) + " |")
    return "\n".join(lines) + "\n"


def attack_rows(cells: list[dict]) -> list[dict]:
    """Cost-to-break rows (one per cell that ran the attacks)."""
    out = []
    for c in cells:
        att = c.get("attacks")
        if not att:
            continue
        pair = c.get("pair") or [c["authorized"], c["unauthorized"]]
        out.append({"method": c["method"], "authorized": pair[0], "unauthorized": pair[1], "seed": c.get("seed"), **att})
    return out


def write_tables(out: Path, cells: list[dict], suite: SuiteConfig | None = None) -> list[dict]:
    import csv

    rows = [cell_row(c) for c in cells]
    cols = ["method", "authorized", "unauthorized", "seed", *[k for k, *_ in ROW_METRICS], "reference", "seconds"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
    agg = aggregate(rows, ("method",))
    scols = ["method", "seeds", "pairs"] + [x for k, *_ in ROW_METRICS for x in (k, k + "_std")]
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=scols, extrasaction="ignore")
        w.writeheader()
        for r in agg:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in scols})
    md = markdown_tables(rows, suite) if rows else f"# Benchmark suite `{suite.name if suite else ''}`\n\nNo finished cells yet.\n"
    att = attack_rows(cells)
    if att:
        ks = sorted({int(k.split("_k")[1]) for r in att for k in r if k.startswith("finetune_k")})
        md += ("\n## Cost to break (unauthorized accuracy recovered by each attack, %)\n\n"
               "| method | authorized | unauthorized | seed | Acc_u protected | " + " | ".join(f"fine-tune k={k}" for k in ks) +
               " | SHOT |\n|---|---|---|---:|---:|" + "---:|" * (len(ks) + 1) + "\n")
        for r in att:
            md += (f"| {r['method']} | {r['authorized']} | {r['unauthorized']} | {r.get('seed')} | {_f(r.get('acc_u_protected'))} | " +
                   " | ".join(_f(r.get(f"finetune_k{k}")) for k in ks) + f" | {_f(r.get('shot'))} |\n")
    (out / "results.md").write_text(md)
    return rows


# ============================================================================ the prompt attacks' robust tables

#: the folder of a suite run that holds the robust tables of its prompt attacks
PROMPT_ROBUST_DIR = "prompt-robust"
PROMPT_ROBUST_FILES = ("robust.json", "robust.md", "robust.csv", "robust-labels.csv", "robust.html")

PROMPT_ABOUT = ("CLIP prompt protections under the prompt attacks (ipshield.attacks.prompt), unauthorized test "
                "accuracy (%). unprotected: the suite's CoOp trained on the authorized domain, under the same attack "
                "and budget; scratch: CoOp learned from a random context on the same k labelled unauthorized images "
                "with the same steps; margin = protected attacked - scratch (at or below 0: the protected prompt "
                "leaves the attacker no better off than learning a prompt from nothing); zero_shot (robust.csv): the "
                "frozen backbone with the class-name prompt, no labels.")


def prompt_robust_results(cells: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The grid rows (one per attacked cell), long rows and labels-to-match rows of the prompt
    attacks, from the finished cells (``prompt_robust`` of :func:`~ipshield.bench.harness.cells.prompt_attack_metrics`)."""
    grid_rows, long_rows, label_rows = [], [], []
    for c in cells:
        pr = c.get("prompt_robust") or {}
        if not pr.get("rows"):
            continue
        pair = c.get("pair") or [c["authorized"], c["unauthorized"]]
        grid_rows.append({"method": c["method"], "authorized": pair[0], "unauthorized": pair[1], "seed": c.get("seed"),
                          **(c.get("attacks") or {})})
        long_rows += pr["rows"]
        label_rows += pr.get("labels", [])
    return grid_rows, long_rows, label_rows


def write_prompt_robust(out: Path, cells: list[dict], suite: SuiteConfig | None = None) -> Path | None:
    """``prompt-robust/``: robust.json, robust.md, robust.csv and robust-labels.csv of the suite's
    prompt attacks (the writers and columns of the digits benchmark's attack suite; robust.html is
    drawn by the report layer, ``write_robust_reports``). Without prompt rows, an earlier run's
    files there are removed (the tables follow the suite). Returns the robust.json path or None."""
    from ipshield.attacks.robust import prompt_attacks
    from ipshield.bench.digits import LABEL_COLUMNS, ROBUST_COLUMNS, _write_csv, robust_markdown
    from ipshield.registry import ATTACKS
    from ipshield.runs import write_json

    folder = out / PROMPT_ROBUST_DIR
    grid_rows, long_rows, label_rows = prompt_robust_results(cells)
    pa = suite.prompt_attacks if suite is not None else None
    if not long_rows:
        if folder.is_dir():
            for name in PROMPT_ROBUST_FILES:
                (folder / name).unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()
        return None
    attacks = list(pa.attacks) if pa else list(dict.fromkeys(r["attack"] for r in long_rows))
    seeds = sorted({r.get("seed") for r in long_rows}, key=lambda x: (x is None, x))
    ks = list(pa.ks) if pa else sorted({r["k"] for r in long_rows if r.get("k") is not None})
    opts = dict(pa.options) if pa else {}
    steps = {a: getattr(ATTACKS.get(a).make_config(dict(opts.get(a, {}))), "steps", None)
             for a in attacks if a in prompt_attacks()}
    meta = {"target": "prompt", "seed": seeds[0] if len(seeds) == 1 else ", ".join(str(s) for s in seeds),
            "seeds": seeds, "ks": ks, "attacks": attacks, "steps": steps, "n_test": pa.n_test if pa else None,
            "reference": "coop", "about": PROMPT_ABOUT}
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "robust.csv", long_rows, [*ROBUST_COLUMNS, "zero_shot"])
    _write_csv(folder / "robust-labels.csv", label_rows, LABEL_COLUMNS)
    # the digits benchmark's page, with the intro of the prompt references instead of the classifiers'
    (folder / "robust.md").write_text(robust_markdown(long_rows, label_rows,
                                                      {**meta, "title": "Prompt attacks and honest references"}))
    write_json(folder / "robust.json", {"meta": meta, "grid": grid_rows, "rows": long_rows, "labels": label_rows})
    return folder / "robust.json"
