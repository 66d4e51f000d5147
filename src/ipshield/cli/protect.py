"""Commands that train source classifiers and protect them (MAP, NTL, CUTI-domain), and the
attacks on those protections. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, attack_app, protect_app
from ipshield.cli.common import ConfigOpt, RootOpt, SetOpt, load_source, match_domain, split_names

ArchOpt = typer.Option("vgg_small", "--arch", help="classifier architecture: vgg_small, vgg_tiny, resnet_small")
DigitsSourceOpt = typer.Option("digits", "--source", help="data source: digits (real MNIST/USPS/MNIST-M), synthetic, folder")
SourceModelOpt = typer.Option(None, "--source-model", help="source classifier folder (from `ipshield train-source`); "
                                                           "default: train one on the authorized domain into OUT/source")
AuthOpt = typer.Option(..., "--authorized", help="authorized (source) domain")
UnauthOpt = typer.Option(None, "--unauthorized", help="comma-separated unauthorized domains (not needed with --scenario ownership)")
ScenarioOpt = typer.Option("domain", "--scenario", help="domain | ownership (unauthorized = authorized + grid watermark)")
OutOpt = typer.Option(..., "--out", help="run folder")
SeedOpt = typer.Option(None, "--seed", help="random seed (overrides the config)")


def _print(metrics: dict) -> None:
    s = metrics["summary"]
    typer.echo(f"{metrics['method']}: authorized {metrics['authorized']} {s['acc_a_before']:.1f} -> {s['acc_a_after']:.1f} "
               f"(drop {s['drop_a']:+.1f})")
    for d, v in s.get("acc_u_after", {}).items():
        typer.echo(f"  unauthorized {d}: {s['acc_u_before'][d]:.1f} -> {v:.1f}")
    if "st_d" in s:
        typer.echo(f"  ST-D: {'undefined (no unauthorized drop)' if s['st_d'] is None else format(s['st_d'], '.4f')}")
    wm = metrics.get("watermark")
    if wm:
        cal = wm.get("calibration")
        typer.echo(f"  ownership watermark: grid, stride {wm['stride']}, opacity {wm['opacity']}"
                   + (f" (calibrated: the unprotected model keeps {cal['accuracy_by_opacity'][str(wm['opacity'])]:.1f} % of "
                      f"watermarked training images, {cal['clean_accuracy']:.1f} % clean)" if cal else ""))
    if metrics.get("skipped"):
        k = metrics["skipped"]
        typer.echo(f"  no mask trained: the source model is at {k['source_acc_u']:.1f} % on the unauthorized training images "
                   f"(chance {k['chance']:.1f} %), nothing to remove (set skip_at_chance=0 to mask anyway)")


@app.command("train-source")
def train_source_cmd(
    domain: str = typer.Option(..., "--domain", help="domain to train on"),
    out: Path = OutOpt,
    arch: str = ArchOpt,
    source: str = DigitsSourceOpt,
    root: Optional[Path] = RootOpt,
    epochs: int = typer.Option(4, "--epochs"),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="training images (balanced subset; default all)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a source classifier (VGG-style CNN with BatchNorm by default) on one domain."""
    from ipshield.models.classifiers import SourceTrainConfig, train_source

    domains = load_source(source, root, None, [domain])
    name = match_domain(domain, domains)
    cfg = SourceTrainConfig.build({"arch": arch, "epochs": epochs, "n_train": n_train, "seed": seed})
    model = train_source(arch, domains[name], config=cfg, out=out)
    typer.echo(f"trained {model.arch} on {name}: test accuracy {model.train_info['test_accuracy']:.1f}% -> {out}")


def _run_method(method: str, authorized: str, unauthorized: Optional[str], out: Path, source_model: Optional[Path],
                source: str, root: Optional[Path], scenario: str, config: Optional[Path], overrides: Optional[list[str]],
                seed: Optional[int], extra: dict) -> None:
    from ipshield.errors import IPShieldError
    from ipshield.models.classifiers import load_classifier, train_source
    from ipshield.registry import METHODS

    spec = METHODS.get(method)
    from ipshield.config import read_yaml

    data = read_yaml(config)
    data.update(extra)
    data["scenario"] = scenario
    if seed is not None:
        data["seed"] = seed
    cfg = spec.make_config(data, overrides)
    unauth_names = split_names(unauthorized) or []
    if scenario == "domain" and not unauth_names:
        raise IPShieldError("no unauthorized domain given", "pass --unauthorized NAME[,NAME] or --scenario ownership")
    domains = load_source(source, root, None, [authorized, *unauth_names])
    a = match_domain(authorized, domains)
    us = [domains[match_domain(u, domains)] for u in unauth_names]
    if source_model is None:
        src_dir = out / "source"
        typer.echo(f"no --source-model: training vgg_small on {a} into {src_dir}")
        model = train_source("vgg_small", domains[a], out=src_dir, seed=cfg.seed)
    else:
        model = load_classifier(source_model, classes=domains[a].classes)
    metrics = spec.run(cfg, model, domains[a], us, out)
    _print(metrics)
    typer.echo(f"run folder: {out}")


@protect_app.command("map")
def protect_map(
    authorized: str = AuthOpt,
    out: Path = OutOpt,
    setting: str = typer.Option("sa", "--setting", help="sa (source-available) | sf (source-free) | df (data-free)"),
    unauthorized: Optional[str] = UnauthOpt,
    source_model: Optional[Path] = SourceModelOpt,
    source: str = DigitsSourceOpt,
    root: Optional[Path] = RootOpt,
    scenario: str = ScenarioOpt,
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """MAP mask pruning: learn a binary mask over the frozen source weights, export a pruned model."""
    from ipshield.errors import IPShieldError

    if setting not in ("sa", "sf", "df"):
        raise IPShieldError(f"unknown MAP setting '{setting}'", "choose sa, sf or df")
    _run_method(f"{setting}-map", authorized, unauthorized, out, source_model, source, root, scenario, config, overrides, seed,
                {"setting": setting})


@protect_app.command("ntl")
def protect_ntl(
    authorized: str = AuthOpt,
    out: Path = OutOpt,
    unauthorized: Optional[str] = UnauthOpt,
    target_free: bool = typer.Option(False, "--target-free", help="generated neighbourhood data instead of unauthorized data"),
    source_model: Optional[Path] = SourceModelOpt,
    source: str = DigitsSourceOpt,
    root: Optional[Path] = RootOpt,
    scenario: str = ScenarioOpt,
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """NTL, non-transferable learning (target-specified or target-free)."""
    # target-free NTL trains without the unauthorized data; they are only evaluated
    _run_method("ntl-tf" if target_free else "ntl", authorized, unauthorized, out, source_model, source, root, scenario,
                config, overrides, seed, {"target_free": target_free})


@protect_app.command("cuti")
def protect_cuti(
    authorized: str = AuthOpt,
    out: Path = OutOpt,
    unauthorized: Optional[str] = UnauthOpt,
    style_convs: str = typer.Option("fixed", "--style-convs", help="fixed (drawn once) | resample (reference-compatible)"),
    source_model: Optional[Path] = SourceModelOpt,
    source: str = DigitsSourceOpt,
    root: Optional[Path] = RootOpt,
    scenario: str = ScenarioOpt,
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    seed: Optional[int] = SeedOpt,
) -> None:
    """CUTI-domain: restyled unauthorized features (isolation domain) pushed away from their labels."""
    _run_method("cuti", authorized, unauthorized, out, source_model, source, root, scenario, config, overrides, seed,
                {"style_convs": style_convs})


@attack_app.command("finetune")
def attack_finetune(
    model: Path = typer.Option(..., "--model", help="protected classifier folder (a protection run folder)"),
    domain: str = typer.Option(..., "--domain", help="unauthorized domain the attacker holds labelled images of"),
    k: str = typer.Option("10,100,1000", "--k", help="comma-separated numbers of labelled images"),
    shot: bool = typer.Option(True, "--shot/--no-shot", help="also run the SHOT-style source-free adaptation attack"),
    source: str = DigitsSourceOpt,
    root: Optional[Path] = RootOpt,
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the result as JSON here"),
) -> None:
    """Cost to break a domain restriction: accuracy recovered by fine-tuning with k labels (and SHOT)."""
    from ipshield.attacks.domain import cost_to_break
    from ipshield.models.classifiers import load_classifier

    domains = load_source(source, root, None, [domain])
    d = domains[match_domain(domain, domains)]
    clf = load_classifier(model, classes=d.classes)
    ks = tuple(int(x) for x in k.split(",") if x.strip())
    result = cost_to_break(clf, d, ks, shot=shot, seed=seed)
    for key, v in result.items():
        typer.echo(f"{key}: {v:.1f}" if isinstance(v, float) else f"{key}: {v}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
