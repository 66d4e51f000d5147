"""``ipshield protect METHOD``: one command per registered protection method and reference, built
from the ``METHODS`` registry (the same names and options as ``ipshield.api.protect``), and
``ipshield train-source``. Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, protect_app
from ipshield.cli.common import (ClassNamesOpt, ConfigOpt, DomainsOpt, RootOpt, SetOpt, load_source, match_domain, source_help,
                                 split_names)
from ipshield.registry import METHODS, SCENARIOS, MethodSpec

OverwriteOpt = typer.Option(False, "--overwrite", help="replace a finished run already in --out")


def _print_classifier(metrics: dict) -> None:
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


def _print_clip(m: dict) -> None:
    from ipshield.report.tables import print_accuracy_table

    if m["method"] == "zero-shot":
        print_accuracy_table({"zero-shot": m["accuracy"]["after"]}, m.get("authorized"), "zero-shot accuracy (%)")
        return
    if "references" not in m:
        before = "zero-shot" if m.get("reference", "zero-shot") == "zero-shot" else m["reference"]
        print_accuracy_table({before: m["accuracy"]["before"], "CoOp" if m["method"] == "coop" else m["method"]:
                              m["accuracy"]["after"]}, m["authorized"], "accuracy (%)")
        return
    table = {f"{k} (before)": v for k, v in m["references"].items()}
    table[f"{m['method']} (after)"] = m["accuracy"]["after"]
    print_accuracy_table(table, m["authorized"], f"{m['method']} · {m['scenario']} · accuracy (%)")
    s = m["summary"]
    keys = ["drop_a", "acc_u_after_mean", "drop_u_mean", "st_d", "gap", "chance_normalised", "balanced_score"]
    typer.echo("summary vs " + m["reference"] + ": " + ", ".join(
        f"{k}={s[k]:.3f}" if isinstance(s.get(k), float) else f"{k}={s.get(k)}" for k in keys if k in s))


def run_protect(spec: MethodSpec, *, authorized: Optional[str], unauthorized: Optional[str], out: Path,
                scenario: Optional[str], model: Optional[Path], source: Optional[str], root: Optional[Path],
                domains: Optional[str], config: Optional[Path], overrides: Optional[list[str]], seed: Optional[int],
                device: Optional[str], overwrite: bool, no_coop: bool = False, coop_set: Optional[list[str]] = None,
                class_names: Optional[str] = None) -> dict:
    """What every ``ipshield protect METHOD`` command does: load the domains, call ``jobs.protect``, print."""
    from ipshield import jobs
    from ipshield.config import read_yaml

    data = read_yaml(config)
    if scenario is not None:
        spec.check_scenario(scenario)  # a clear error before any data is loaded
    unauth = split_names(unauthorized) or []
    if spec.model == "clip":
        doms = load_source(source or "synthetic", root, domains, [n for n in [authorized, *unauth] if n],
                           class_names=class_names)
    else:
        wanted = [n for n in [authorized, *unauth, *(split_names(domains) or [])] if n]
        doms = load_source(source or "digits", root, ",".join(dict.fromkeys(wanted)) if wanted else None,
                           class_names=class_names)
    auth = match_domain(authorized, doms) if authorized else None
    unauth = [match_domain(u, doms) for u in unauth]
    options = {}
    clip = None
    if spec.model == "clip":
        from ipshield.cli.common import resolve_model
        from ipshield.utils import resolve_device

        dev = device or "auto"
        clip = resolve_model(model, device=str(resolve_device(dev)))
        if not spec.reference:  # a protection is measured against zero-shot and CoOp
            from ipshield.protect.coop import CoOpConfig

            options = {"with_coop": not no_coop, "coop_config": CoOpConfig.build({"device": dev}, coop_set)}
        if spec.name == "zero-shot":
            options["model_path"] = str(model) if model else None
    m = jobs.protect(spec.name, domains=doms, authorized=auth, unauthorized=unauth, out=out,
                     model=clip if spec.model == "clip" else model, config=data, overrides=overrides, scenario=scenario,
                     seed=seed, device=device, options=options, overwrite=overwrite)
    (_print_clip if spec.model == "clip" else _print_classifier)(m)
    typer.echo(f"run folder: {out}")
    return m


def _make_command(spec: MethodSpec):
    is_clip = spec.model == "clip"
    scen = f"{' | '.join(spec.scenarios)} (default {spec.scenarios[0]})" if spec.scenarios else "none (a reference)"
    needs_auth = bool(spec.data) or bool(spec.scenarios)

    def command(
        authorized: Optional[str] = typer.Option(None, "--authorized", help="the domain the model keeps working on"
                                                 + ("" if needs_auth else " (optional)")),
        out: Path = typer.Option(..., "--out", help="run folder (a finished one is refused without --overwrite)"),
        unauthorized: Optional[str] = typer.Option(None, "--unauthorized",
                                                   help="comma-separated unauthorized domains (target-specified)"),
        scenario: Optional[str] = typer.Option(None, "--scenario", help=f"scenario: {scen}"),
        model: Optional[Path] = typer.Option(
            None, "--model", "--source-model",
            help="CLIP folder (default: the small CLIP pretrained by ipshield)" if is_clip else
            "source classifier folder (from `ipshield train-source`; default: train vgg_small on the authorized "
            "domain into OUT/source)"),
        source: Optional[str] = typer.Option(None, "--source", help=source_help("synthetic" if is_clip else "digits")),
        root: Optional[Path] = RootOpt,
        domains: Optional[str] = DomainsOpt,
        class_names: Optional[str] = ClassNamesOpt,
        config: Optional[Path] = ConfigOpt,
        overrides: Optional[list[str]] = SetOpt,
        seed: Optional[int] = typer.Option(None, "--seed", help="random seed (overrides the config)"),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (default: the config's)"),
        overwrite: bool = OverwriteOpt,
        no_coop: bool = typer.Option(False, "--no-coop", help="CLIP methods: skip the CoOp reference (zero-shot only as "
                                                              "'before')", hidden=not is_clip or spec.reference),
        coop_set: Optional[list[str]] = typer.Option(None, "--coop-set", help="CLIP methods: CoOp reference override "
                                                     "key=value (repeatable)", hidden=not is_clip or spec.reference),
    ) -> None:
        run_protect(spec, authorized=authorized, unauthorized=unauthorized, out=out, scenario=scenario, model=model,
                    source=source, root=root, domains=domains, config=config, overrides=overrides, seed=seed,
                    device=device, overwrite=overwrite, no_coop=no_coop, coop_set=coop_set,
                    class_names=class_names)

    command.__doc__ = (f"{spec.description or spec.name}. Scenarios: {scen}. "
                       f"Config: {spec.config.__name__ if spec.config else '-'} (--set key=value).")
    return command


def sync_commands() -> None:
    """A ``protect`` command for every registered method that has none yet (the CLI calls this
    before it runs, so a method registered after this module was imported is reachable too)."""
    have = {c.name for c in protect_app.registered_commands}
    for spec in METHODS.specs():
        if spec.name not in have:
            protect_app.command(spec.name)(_make_command(spec))


sync_commands()


@protect_app.command("map")
def protect_map(
    authorized: str = typer.Option(..., "--authorized", help="the domain the model keeps working on"),
    out: Path = typer.Option(..., "--out", help="run folder (a finished one is refused without --overwrite)"),
    setting: str = typer.Option("sa", "--setting", help="sa (source-available) | sf (source-free) | df (data-free): "
                                                        "the same as `protect sa-map|sf-map|df-map`"),
    unauthorized: Optional[str] = typer.Option(None, "--unauthorized", help="comma-separated unauthorized domains"),
    scenario: Optional[str] = typer.Option(None, "--scenario", help="target-specified (default) | ownership"),
    model: Optional[Path] = typer.Option(None, "--model", "--source-model", help="source classifier folder"),
    source: Optional[str] = typer.Option(None, "--source", help=source_help("digits")),
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = DomainsOpt,
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """MAP mask pruning in one of its settings (the registered sa-map, sf-map, df-map)."""
    from ipshield.errors import ConfigError
    from ipshield.protect.map import SETTINGS

    if setting not in SETTINGS:
        raise ConfigError(f"unknown MAP setting '{setting}'", "choose sa, sf or df")
    run_protect(METHODS.get(SETTINGS[setting]), authorized=authorized, unauthorized=unauthorized, out=out,
                scenario=scenario, model=model, source=source, root=root, domains=domains, config=config,
                overrides=overrides, seed=seed, device=device, overwrite=overwrite)


@app.command("train-source")
def train_source_cmd(
    domain: str = typer.Option(..., "--domain", help="domain to train on (any domain the data source offers)"),
    out: Path = typer.Option(..., "--out", help="folder of the trained classifier"),
    arch: str = typer.Option("vgg_small", "--arch", help="classifier architecture: vgg_small, vgg_tiny, resnet_small"),
    source: str = typer.Option("digits", "--source", help=source_help("digits")),
    root: Optional[Path] = RootOpt,
    epochs: int = typer.Option(4, "--epochs", min=1),
    n_train: Optional[int] = typer.Option(None, "--n-train", min=1, help="training images (balanced subset; default all)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a source classifier (VGG-style CNN with BatchNorm by default) on one domain."""
    from ipshield.models.classifiers import SourceTrainConfig, train_source

    domains = load_source(source, root, domain)
    name = match_domain(domain, domains)
    cfg = SourceTrainConfig.build({"arch": arch, "epochs": epochs, "n_train": n_train, "seed": seed})
    model = train_source(arch, domains[name], config=cfg, out=out)
    typer.echo(f"trained {model.arch} on {name}: test accuracy {model.train_info['test_accuracy']:.1f}% -> {out}")


__all__ = ["run_protect", "SCENARIOS"]
