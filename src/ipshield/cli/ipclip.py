"""`ipshield evaluate`, `ipshield predict`, `ipshield ablation ip-clip` (saved CLIP prompt runs; the
methods themselves are trained by the generic `ipshield protect METHOD`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app
from ipshield.cli.common import (ClassNamesOpt, ConfigOpt, DomainsOpt, ModelOpt, RootOpt, SetOpt, SourceOpt, load_source, match_domain,
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


AuthorizeOpt = typer.Option(None, "--authorize",
                             help="[ours] comma-separated domains authorized at deployment (a run trained with "
                                  "--set switchable=true; default: the run's authorized domain)")


def _reference_domains(run: Path, source: str, root, doms: dict, authorize: Optional[str],
                       class_names: Optional[str] = None) -> dict:
    """The authorized domain(s) of the verdict, loaded from the source when not among --domains
    (only their test sets are used, for the verdict's AUROC and TAR)."""
    from ipshield.protect.ipclip import WATERMARK_SUFFIX
    from ipshield.protect.ipclip_run import HEAD_META

    p = run / HEAD_META
    if not p.is_file():
        return {}
    import json

    auth = split_names(authorize) or json.loads(p.read_text()).get("authorized", [])
    have = {d.lower() for d in doms}
    want = [a.replace(WATERMARK_SUFFIX, "") for a in auth]
    want = [w for w in dict.fromkeys(want) if w.lower() not in have]
    if not want:
        return {}
    try:
        return load_source(source, root, ",".join(want), class_names=class_names)
    except Exception:  # not offered by this source: the verdict reports AUROC as unavailable
        return {}


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


@app.command("evaluate")
def evaluate(
    run: Path = typer.Option(..., "--run", help="run folder of `ipshield protect ip-clip` (or ntl-prompt, coop)"),
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP checkpoint (default: the one the run was trained on)"),
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    class_names: Optional[str] = ClassNamesOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="write the accuracies (and the verdict) as JSON here"),
    device: str = DeviceOpt,
    authorize: Optional[str] = AuthorizeOpt,
):
    """Reload a saved prompt (generator) and report its accuracy on any domains, with [ours] the
    authorization verdict per domain (AUROC against the authorized test set, TAR / FAR at the
    saved threshold)."""
    from ipshield import jobs
    from ipshield.report.tables import print_accuracy_table

    adapter = jobs.run_adapter(run, model, device)
    doms = load_source(source, root, domains, class_names=class_names)
    ref = _reference_domains(run, source, root, doms, authorize, class_names)
    rep = jobs.evaluate(run, doms, model=adapter, out=out, authorize=split_names(authorize), reference=ref,
                        details=True)
    print_accuracy_table({"accuracy (%)": rep["accuracy"]}, None, f"{run}")
    v = rep["verdict"]
    if not v.get("available"):
        typer.echo(f"note: {v['note']}")
        return
    typer.echo(f"verdict [ours]: authorized {', '.join(v['authorized'])}; score {v['score']} on {v['feature']}; "
               f"threshold accepts {v['accept'] * 100:.0f} % of held-out authorized training images")
    typer.echo(f"{'test set':<24} {'role':<12} {'accuracy':>8} {'AUROC':>7} {'TAR':>6} {'FAR':>6}")
    for name, r in v["sets"].items():
        typer.echo(f"{name:<24} {r['role']:<12} {rep['accuracy'][name]:>8.1f} {_fmt(r['auroc'], '.4f'):>7} "
                   f"{_fmt(r['tar']):>6} {_fmt(r['far']):>6}")
    if v.get("note"):
        typer.echo(f"note: {v['note']}")


@app.command("predict")
def predict(
    run: Path = typer.Option(..., "--run", help="run folder of `ipshield protect ip-clip` (or ntl-prompt, coop)"),
    images: Path = typer.Option(..., "--images", help="folder of image files (searched recursively)"),
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP checkpoint (default: the one the run was trained on)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the predictions as CSV here"),
    device: str = DeviceOpt,
    authorize: Optional[str] = AuthorizeOpt,
):
    """Predict the class of every image in a folder with a saved run, with [ours] the
    authorization verdict (authorized / unauthorized) and its score (>= 0: authorized)."""
    from ipshield import jobs

    rows = jobs.predict(run, images, model=jobs.run_adapter(run, model, device), out=out,
                        authorize=split_names(authorize))
    for r in rows:
        score = "" if r["score"] is None else f"{r['score']:.3f}"
        typer.echo(f"{r['file']}\t{r['class']}\t{r['probability']:.3f}\t{r['verdict']}\t{score}")
    if rows and rows[0]["verdict"] == "unavailable":
        from ipshield.protect.ipclip_run import verdict_note

        typer.echo(f"note: {verdict_note(run)}", err=True)


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
