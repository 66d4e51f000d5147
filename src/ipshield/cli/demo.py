"""`ipshield demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app


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
