"""`ipshield protect coop`, `ipshield demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, protect_app
from ipshield.cli.common import ConfigOpt, DomainsOpt, ModelOpt, RootOpt, SetOpt, SourceOpt, load_source, match_domain, resolve_model


@protect_app.command("coop")
def protect_coop(
    authorized: str = typer.Option(..., "--authorized", help="domain the prompt is learned on"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    model: Optional[Path] = ModelOpt,
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """CoOp prompt learning (the unprotected prompt-learned reference), evaluated on every domain."""
    from ipshield.protect.coop import CoOpConfig, run_coop
    from ipshield.report.tables import print_accuracy_table

    cfg = CoOpConfig.from_yaml(config, set_)
    doms = load_source(source, root, domains, [authorized])
    auth = match_domain(authorized, doms)
    adapter = resolve_model(model)
    m = run_coop(adapter, doms, auth, out, cfg)
    print_accuracy_table({"zero-shot": m["accuracy"]["before"], "CoOp": m["accuracy"]["after"]}, auth, "accuracy (%)")
    typer.echo(f"run folder: {out}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run folder"),
    authorized: str = typer.Option("clean", "--authorized", help="authorized domain of the embedded default"),
    preset: str = typer.Option("default", "--preset", help="small-CLIP preset (default, or test for a quick look)"),
    ipclip_epochs: int = typer.Option(30, "--ipclip-epochs", help="IP-CLIP training epochs"),
    ipclip_lr: float = typer.Option(0.005, "--ipclip-lr", help="IP-CLIP learning rate"),
    seed: int = typer.Option(0, "--seed"),
    watermark: bool = typer.Option(True, "--watermark/--no-watermark", help="also watermark, steal and verify the service"),
    steal_pairs: int = typer.Option(6000, "--steal-pairs", help="public image-caption pairs the thief sends"),
    steal_epochs: int = typer.Option(12, "--steal-epochs", help="the thief's training epochs"),
    innocent_steps: Optional[int] = typer.Option(None, "--innocent-steps", help="pretraining steps of the innocent model (default: half the preset's)"),
):
    """The main job on the embedded default: data, small CLIP, zero-shot, CoOp and IP-CLIP, per-domain
    table; then the embedding service is watermarked, stolen and verified."""
    from ipshield.demo import run_demo

    run_demo(out, authorized=authorized, preset=preset, seed=seed, ipclip_epochs=ipclip_epochs, ipclip_lr=ipclip_lr,
             watermark=watermark, steal_pairs=steal_pairs, steal_epochs=steal_epochs, innocent_steps=innocent_steps)
