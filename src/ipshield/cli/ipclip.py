"""`ipshield evaluate`, `ipshield predict`, `ipshield ablation ip-clip` (saved CLIP prompt runs; the
methods themselves are trained by the generic `ipshield protect METHOD`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app
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
    from ipshield import jobs
    from ipshield.report.tables import print_accuracy_table

    adapter = jobs.run_adapter(run, model, device)
    doms = load_source(source, root, domains)
    acc = jobs.evaluate(run, doms, model=adapter, out=out)
    print_accuracy_table({"accuracy (%)": acc}, None, f"{run}")


@app.command("predict")
def predict(
    run: Path = typer.Option(..., "--run", help="run folder of `ipshield protect ip-clip` (or ntl-prompt, coop)"),
    images: Path = typer.Option(..., "--images", help="folder of image files (searched recursively)"),
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP checkpoint (default: the one the run was trained on)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the predictions as CSV here"),
    device: str = DeviceOpt,
):
    """Predict the class of every image in a folder with a saved run."""
    from ipshield import jobs

    rows = jobs.predict(run, images, model=jobs.run_adapter(run, model, device), out=out)
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
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished ablation already in --out"),
):
    """Train IP-CLIP with each component removed (style tokens, content tokens, banks/branch, each
    loss term) on the same data and seed; print and save the table."""
    from ipshield.protect.coop import CoOpConfig
    from ipshield.protect.ipclip import IPCLIPConfig
    from ipshield.protect.ipclip_run import ABLATIONS, ablation, ablation_markdown
    from ipshield.runs import open_run, run_guard

    cfg = IPCLIPConfig.from_yaml(config, [f"scenario={scenario}", f"device={device}", *(set_ or [])]).check()
    names = None
    if variants:
        names = [v.strip() for v in variants.split(",") if v.strip()]
    doms, auth, unauth, adapter = _prepare(model, source, root, domains, authorized, unauthorized, device)
    run = open_run(out, "ablation-ip-clip", cfg, seed=cfg.seed, overwrite=overwrite)
    with run_guard(run):
        res = ablation(adapter, doms, auth, unauth, cfg, names, with_coop=not no_coop,
                       coop_config=CoOpConfig.build({"device": device}, coop_set),
                       on_row=lambda r: typer.echo(f"  {r['variant']}: " + ", ".join(f"{k}={v:.1f}" for k, v in r["accuracy"].items())))
        table = ablation_markdown(res)
        run.save_metrics(res, "ablation.json")
        (run.path / "ablation.md").write_text(table)
        run.finish()
    typer.echo(table)
    typer.echo(f"variants: {', '.join(ABLATIONS)}")
