"""`ipshield pretrain` (the project's small CLIP) and `ipshield zero-shot`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app
from ipshield.cli.common import (ClassNamesOpt, ConfigOpt, DomainsOpt, RootOpt, SetOpt, SourceOpt, TestFractionOpt,
                                 load_source)


@app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(..., "--out", help="run folder; the CLIP is written to OUT/clip"),
    preset: str = typer.Option("default", "--preset", help="default (the model every command uses) or test (quick)"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    overrides: Optional[list[str]] = typer.Argument(None, help="config overrides key=value, e.g. steps=500 "
                                                    "(the same as --set; kept for older scripts)"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="zero-shot accuracy per domain at the end"),
    use_cache: bool = typer.Option(True, "--cache/--no-cache",
                                   help="a plain preset (no --config, no overrides) is trained into the cache that "
                                        "small_clip() reuses (or reused from it) and copied to OUT/clip"),
):
    """Pretrain the small CLIP on captioned synthetic images (plus the real digits of $IPSHIELD_DIGITS in the default preset); writes OUT/clip (a Hugging Face CLIP folder) and OUT/metrics.json."""
    from ipshield.config import read_yaml
    from ipshield.errors import ConfigError
    from ipshield.models.tiny_clip import PRESETS, PretrainConfig
    from ipshield.runs import RunDir, run_guard

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'", f"choose one of: {', '.join(PRESETS)}")
    data = dict(PRESETS[preset])
    data.update(read_yaml(config))
    overrides = [*(set_ or []), *(overrides or [])]
    cfg = PretrainConfig.build(data, overrides)
    run = RunDir(out, "pretrain", cfg, seed=cfg.seed)
    with run_guard(run):
        _pretrain_into(run, cfg, preset, config, overrides, evaluate, use_cache)


def _pretrain_into(run, cfg, preset, config, overrides, evaluate, use_cache) -> None:
    from ipshield.models.tiny_clip import pretrain, summarize_pretraining
    from ipshield.report.tables import print_accuracy_table

    if use_cache and config is None and not overrides and evaluate:
        import shutil

        from ipshield.models.tiny_clip import small_clip, small_clip_path

        cached = small_clip_path(preset)
        if cached.is_dir():
            typer.echo(f"reusing the cached small CLIP {cached} (run with --no-cache to pretrain again)")
        cached = small_clip(preset)
        clip_dir = run.path / "clip"
        if clip_dir.exists():
            shutil.rmtree(clip_dir)
        shutil.copytree(cached, clip_dir)
    else:
        clip_dir = pretrain(cfg, run.path / "clip", evaluate=evaluate)
    metrics = summarize_pretraining(clip_dir, preset)
    run.save_metrics(metrics)
    run.finish(model=str(clip_dir))
    if metrics["accuracy"].get("after"):
        print_accuracy_table({"zero-shot": metrics["accuracy"]["after"]}, None, "zero-shot accuracy (%) of the small CLIP")
    p = metrics["pretraining"]
    typer.echo(f"pretrained {p['parameters']:,} parameters in {p['train_seconds']:.0f} s "
               f"({p['steps_per_second']:.2f} steps/s, {p['threads']} threads); total {p['total_seconds']:.0f} s")
    typer.echo(f"CLIP folder: {clip_dir}  (use it with --model {clip_dir})")


@app.command("zero-shot")
def zero_shot_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP folder (Hugging Face format); default: the small CLIP"),
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    test_fraction: Optional[float] = TestFractionOpt,
    class_names: Optional[str] = ClassNamesOpt,
    template: Optional[list[str]] = typer.Option(None, "--template", help="prompt template with {} for the class (repeatable: ensemble)"),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers) or open_clip"),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write a run folder with metrics.json"),
):
    """Zero-shot CLIP accuracy per domain ("a photo of a {class}." by default)."""
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import small_clip
    from ipshield.jobs import run_zero_shot
    from ipshield.protect.zeroshot import ZeroShotConfig, evaluate_zero_shot
    from ipshield.report.tables import print_accuracy_table

    cfg = ZeroShotConfig.build({"templates": list(template)} if template else {})
    doms = load_source(source, root, domains, class_names=class_names, test_fraction=test_fraction)
    path = model if model is not None else small_clip("default")
    from ipshield.utils import resolve_device

    adapter = load_clip(path, backend=backend, device=str(resolve_device(device)))
    if out is not None:
        acc = run_zero_shot(adapter, doms, out, cfg, model_path=str(path))["accuracy"]["after"]
    else:
        acc = evaluate_zero_shot(adapter, doms, config=cfg)
    print_accuracy_table({"zero-shot": acc}, None, f"zero-shot accuracy (%) of {Path(path).name}")
