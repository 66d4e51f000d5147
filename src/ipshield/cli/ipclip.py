"""`ipshield protect ip-clip`, `ipshield protect ntl-prompt`, `ipshield evaluate`, `ipshield predict`,
`ipshield ablation ip-clip` (IP-CLIP and its prompt baselines on a frozen CLIP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, protect_app
from ipshield.cli.common import (ConfigOpt, DomainsOpt, ModelOpt, RootOpt, SetOpt, SourceOpt, load_source, match_domain,
                                 resolve_model, split_names)

ablation_app = typer.Typer(help="What each component of a method contributes, on the same data.", no_args_is_help=True)
app.add_typer(ablation_app, name="ablation")

ScenarioOpt = typer.Option("target-specified", "--scenario",
                           help="target-specified | ownership | target-free | authorization")
UnauthOpt = typer.Option(None, "--unauthorized", help="comma-separated unauthorized domains (target-specified)")
NoCoopOpt = typer.Option(False, "--no-coop", help="skip the CoOp reference (zero-shot only as 'before')")
CoopSetOpt = typer.Option(None, "--coop-set", help="CoOp reference config override key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")


def _prepare(model, source, root, domains, authorized, unauthorized, device):
    from ipshield.errors import IPShieldError

    unauth = split_names(unauthorized) or []
    doms = load_source(source, root, domains, [authorized, *unauth])
    auth = match_domain(authorized, doms)
    unauth = [match_domain(u, doms) for u in unauth]
    if auth in unauth:
        raise IPShieldError(f"domain '{auth}' is given as both --authorized and --unauthorized",
                            "name a different unauthorized domain (or use --scenario target-free / ownership)")
    from ipshield.utils import resolve_device

    adapter = resolve_model(model, device=str(resolve_device(device)))
    return doms, auth, unauth, adapter


def _print_result(m: dict, out: Path) -> None:
    from ipshield.report.tables import print_accuracy_table

    table = {f"{k} (before)": v for k, v in m["references"].items()}
    table[f"{m['method']} (after)"] = m["accuracy"]["after"]
    print_accuracy_table(table, m["authorized"], f"{m['method']} · {m['scenario']} · accuracy (%)")
    s = m["summary"]
    keys = ["drop_a", "acc_u_after_mean", "drop_u_mean", "st_d", "gap", "chance_normalised", "balanced_score"]
    typer.echo("summary vs " + m["reference"] + ": " + ", ".join(
        f"{k}={s[k]:.3f}" if isinstance(s.get(k), float) else f"{k}={s.get(k)}" for k in keys if k in s))
    typer.echo(f"run folder: {out}")


@protect_app.command("ip-clip")
def protect_ipclip(
    authorized: str = typer.Option(..., "--authorized", help="the domain the model keeps working on"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    unauthorized: Optional[str] = UnauthOpt,
    scenario: str = ScenarioOpt,
    model: Optional[Path] = ModelOpt,
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    no_coop: bool = NoCoopOpt,
    coop_set: Optional[list[str]] = CoopSetOpt,
    device: str = DeviceOpt,
):
    """IP-CLIP: restrict a frozen CLIP to the authorized domain with a learned IP prompt generator.
    Writes config, metrics.json (before = zero-shot and CoOp, after = IP-CLIP, every domain) and
    prompt_generator.safetensors + prompt_generator.json."""
    from ipshield.protect.coop import CoOpConfig
    from ipshield.protect.ipclip import IPCLIPConfig
    from ipshield.protect.ipclip_run import run_ipclip

    cfg = IPCLIPConfig.from_yaml(config, [f"scenario={scenario}", f"device={device}", *(set_ or [])]).check()
    doms, auth, unauth, adapter = _prepare(model, source, root, domains, authorized, unauthorized, device)
    coop_cfg = CoOpConfig.build({"device": device}, coop_set)
    m = run_ipclip(adapter, doms, auth, unauth, out, cfg, coop_cfg, with_coop=not no_coop)
    _print_result(m, out)


@protect_app.command("ntl-prompt")
def protect_ntl_prompt(
    authorized: str = typer.Option(..., "--authorized", help="the domain the model keeps working on"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    unauthorized: Optional[str] = UnauthOpt,
    scenario: str = ScenarioOpt,
    model: Optional[Path] = ModelOpt,
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    no_coop: bool = NoCoopOpt,
    coop_set: Optional[list[str]] = CoopSetOpt,
    device: str = DeviceOpt,
):
    """Baseline: CoOp-style prompt trained with the NTL objective on the same frozen CLIP."""
    from ipshield.protect.coop import CoOpConfig
    from ipshield.protect.ipclip_run import run_ntl_prompt
    from ipshield.protect.ntl_prompt import NTLPromptConfig

    cfg = NTLPromptConfig.from_yaml(config, [f"scenario={scenario}", f"device={device}", *(set_ or [])])
    doms, auth, unauth, adapter = _prepare(model, source, root, domains, authorized, unauthorized, device)
    coop_cfg = CoOpConfig.build({"device": device}, coop_set)
    m = run_ntl_prompt(adapter, doms, auth, unauth, out, cfg, coop_cfg, with_coop=not no_coop)
    _print_result(m, out)


def _run_adapter(run: Path, model: Optional[Path], device: str):
    from ipshield.protect.ipclip_run import run_kind, saved_model_path
    from ipshield.utils import resolve_device

    run_kind(run)  # a clear error for a folder that is not a run
    if model is None and saved_model_path(run) and Path(saved_model_path(run)).is_dir():
        model = Path(saved_model_path(run))
    return resolve_model(model, device=str(resolve_device(device)))


@app.command("evaluate")
def evaluate(
    run: Path = typer.Option(..., "--run", help="run folder of `ipshield protect ip-clip` (or ntl-prompt, coop)"),
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP checkpoint (default: the one the run was trained on)"),
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="write the accuracies as JSON here"),
    device: str = DeviceOpt,
):
    """Reload a saved prompt (generator) and report its accuracy on any domains."""
    from ipshield.protect.ipclip_run import evaluate_run
    from ipshield.report.tables import print_accuracy_table

    adapter = _run_adapter(run, model, device)
    doms = load_source(source, root, domains)
    acc = evaluate_run(run, adapter, doms)
    print_accuracy_table({"accuracy (%)": acc}, None, f"{run}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run": str(run), "source": source, "accuracy": acc}, indent=2) + "\n")


@app.command("predict")
def predict(
    run: Path = typer.Option(..., "--run", help="run folder of `ipshield protect ip-clip` (or ntl-prompt, coop)"),
    images: Path = typer.Option(..., "--images", help="folder of image files (searched recursively)"),
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP checkpoint (default: the one the run was trained on)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the predictions as CSV here"),
    device: str = DeviceOpt,
):
    """Predict the class of every image in a folder with a saved run."""
    import csv

    from ipshield.protect.ipclip_run import predict_folder

    adapter = _run_adapter(run, model, device)
    rows = predict_folder(run, images, adapter)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "class", "index", "probability"])
            w.writeheader()
            w.writerows(rows)
    for r in rows:
        typer.echo(f"{r['file']}\t{r['class']}\t{r['probability']:.3f}")


@ablation_app.command("ip-clip")
def ablation_ipclip(
    authorized: str = typer.Option(..., "--authorized", help="the domain the model keeps working on"),
    out: Path = typer.Option(..., "--out", help="folder for ablation.json and ablation.md"),
    unauthorized: Optional[str] = UnauthOpt,
    scenario: str = ScenarioOpt,
    model: Optional[Path] = ModelOpt,
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    variants: Optional[str] = typer.Option(None, "--variants", help="comma-separated variants (default: all)"),
    no_coop: bool = NoCoopOpt,
    coop_set: Optional[list[str]] = CoopSetOpt,
    device: str = DeviceOpt,
):
    """Train IP-CLIP with each component removed (style tokens, content tokens, banks/branch, each
    loss term) on the same data and seed; print and save the table."""
    from ipshield.protect.coop import CoOpConfig
    from ipshield.protect.ipclip import IPCLIPConfig
    from ipshield.protect.ipclip_run import ABLATIONS, ablation, ablation_markdown
    from ipshield.runs import RunDir

    cfg = IPCLIPConfig.from_yaml(config, [f"scenario={scenario}", f"device={device}", *(set_ or [])]).check()
    names = None
    if variants:
        names = [v.strip() for v in variants.split(",") if v.strip()]
    doms, auth, unauth, adapter = _prepare(model, source, root, domains, authorized, unauthorized, device)
    run = RunDir(out, "ablation-ip-clip", cfg, seed=cfg.seed)
    res = ablation(adapter, doms, auth, unauth, cfg, names, with_coop=not no_coop,
                   coop_config=CoOpConfig.build({"device": device}, coop_set),
                   on_row=lambda r: typer.echo(f"  {r['variant']}: " + ", ".join(f"{k}={v:.1f}" for k, v in r["accuracy"].items())))
    table = ablation_markdown(res)
    run.save_metrics(res, "ablation.json")
    (run.path / "ablation.md").write_text(table)
    run.finish()
    typer.echo(table)
    typer.echo(f"variants: {', '.join(ABLATIONS)}")
