"""``ipshield attack NAME``: one command per registered attack on a classifier (``ATTACKS`` entries
whose target is "classifier") or on a CLIP prompt model (target "prompt": ``--run`` the protected
prompt's run folder, ``--model`` its CLIP), the same names and options as ``ipshield.jobs.attack.attack``.
``ipshield attack finetune`` is the cost to break a domain restriction (fine-tuning with each
``--k`` and SHOT, with the from-scratch reference and, given ``--reference``, the unprotected
model attacked the same way); attacks that use a share of the authorized images
(``source-finetune``, ``transntl``, ``disguise``) take ``--authorized NAME``; ``ipshield attack
extract`` (the watermark thief) is in ``cli/watermark.py``.
Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ipshield.cli import attack_app
from ipshield.cli.common import ConfigOpt, RootOpt, SetOpt, load_source, match_domain, source_help
from ipshield.registry import ATTACKS, AttackSpec

ModelOpt = typer.Option(..., "--model", help="the protected classifier folder (a protection run folder)")
DomainOpt = typer.Option(..., "--domain", help="the unauthorized domain the attacker holds images of (any domain "
                                               "of --source)")
SourceOpt = typer.Option("digits", "--source", help=source_help("digits"))
AttackDomainsOpt = typer.Option(None, "--domains", help="comma-separated domains of the source to load with --domain "
                                                        "(default: only --domain)")
AuthorizedOpt = typer.Option(None, "--authorized", help="the authorized (source) domain the attacker holds a share of "
                                                        "(any domain of --source; attacks that take authorized images)")
OutOpt = typer.Option(None, "--out", help="run folder (config.yaml, metrics.json, the attacked model); default: print only")
SeedOpt = typer.Option(None, "--seed", help="random seed (overrides the config)")
OverwriteOpt = typer.Option(False, "--overwrite", help="replace a finished run already in --out")


def _load_target(model: Path, domain: str, source: str, root: Optional[Path], domains: Optional[str],
                 authorized: Optional[str] = None):
    """The attacker's domain and the protected classifier (checked against the domain's classes);
    with ``authorized``, also that domain (else None)."""
    from ipshield.cli.common import split_names
    from ipshield.models.classifiers import load_classifier

    wanted = list(dict.fromkeys([domain, *([authorized] if authorized else []), *(split_names(domains) or [])]))
    doms = load_source(source, root, ",".join(wanted))
    d = doms[match_domain(domain, doms)]
    a = doms[match_domain(authorized, doms)] if authorized else None
    clf = load_classifier(model, classes=d.classes)
    if authorized is None:
        return clf, d
    return clf, d, a


def _echo_result(result: dict[str, Any]) -> None:
    from ipshield.jobs.attack import jsonable_result

    for key, v in jsonable_result(result).items():
        typer.echo(f"{key}: {v:.1f}" if isinstance(v, float) else f"{key}: {v}")


def _takes_authorized(spec: AttackSpec) -> bool:
    import inspect

    return "authorized" in inspect.signature(spec.run).parameters


def run_attack_command(spec: AttackSpec, *, model: Path, domain: str, source: str, root: Optional[Path],
                       domains: Optional[str], config: Optional[Path], overrides: Optional[list[str]],
                       out: Optional[Path], seed: Optional[int], overwrite: bool, authorized: Optional[str] = None) -> dict:
    """What every ``ipshield attack NAME`` command does: validate the config, load the domain (and
    the authorized one) and the classifier, call ``jobs.attack.attack``, print."""
    from ipshield.config import read_yaml
    from ipshield.errors import IPShieldError
    from ipshield.jobs.attack import attack, build_attack_config

    cfg = build_attack_config(spec, read_yaml(config), overrides, seed)  # a clear error before any data is loaded
    inputs = {}
    if _takes_authorized(spec):
        if not authorized:
            raise IPShieldError(f"attack '{spec.name}' needs the attacker's authorized (source-domain) images, and none "
                                "were given", "add --authorized NAME (a domain of --source; in Python: authorized=<Domain>)")
        clf, d, inputs["authorized"] = _load_target(model, domain, source, root, domains, authorized)
    else:
        if authorized:
            raise IPShieldError(f"attack '{spec.name}' takes no authorized images",
                                "drop --authorized (only source-finetune, transntl and disguise-like attacks take it)")
        clf, d = _load_target(model, domain, source, root, domains)
    result = attack(spec.name, target=clf, out=out, config=cfg, overwrite=overwrite, domain=d, **inputs)
    _echo_result(result)
    if out is not None:
        typer.echo(f"run folder: {out}")
    return result


def _make_command(spec: AttackSpec):
    def command(
        model: Path = ModelOpt,
        domain: str = DomainOpt,
        source: str = SourceOpt,
        root: Optional[Path] = RootOpt,
        domains: Optional[str] = AttackDomainsOpt,
        config: Optional[Path] = ConfigOpt,
        overrides: Optional[list[str]] = SetOpt,
        out: Optional[Path] = OutOpt,
        seed: Optional[int] = SeedOpt,
        overwrite: bool = OverwriteOpt,
        authorized: Optional[str] = AuthorizedOpt,
    ) -> None:
        run_attack_command(spec, model=model, domain=domain, source=source, root=root, domains=domains, config=config,
                           overrides=overrides, out=out, seed=seed, overwrite=overwrite, authorized=authorized)

    command.__doc__ = (f"{spec.description or spec.name}. Budget: {spec.budget}. "
                       f"Config: {spec.config.__name__ if spec.config else '-'} (--set key=value).")
    return command


for _spec in ATTACKS.specs():
    if _spec.target == "classifier" and _spec.name != "finetune":
        attack_app.command(_spec.name)(_make_command(_spec))


def run_prompt_attack_command(spec: AttackSpec, *, run: Path, model: Optional[Path], domain: str, source: str,
                              root: Optional[Path], domains: Optional[str], config: Optional[Path],
                              overrides: Optional[list[str]], out: Optional[Path], seed: Optional[int],
                              overwrite: bool, device: str = "auto") -> dict:
    """What every ``ipshield attack prompt-*`` command does: validate the config, load the domain,
    the run's CLIP and its prompt model, call ``jobs.attack.attack``, print."""
    from ipshield import jobs
    from ipshield.cli.common import split_names
    from ipshield.config import read_yaml
    from ipshield.jobs.attack import attack, build_attack_config
    from ipshield.protect.ipclip_run import load_run

    cfg = build_attack_config(spec, read_yaml(config), overrides, seed)  # a clear error before any data is loaded
    wanted = list(dict.fromkeys([domain, *(split_names(domains) or [])]))
    doms = load_source(source, root, ",".join(wanted))
    d = doms[match_domain(domain, doms)]
    target = load_run(run, jobs.run_adapter(run, model, device))
    result = attack(spec.name, target=target, out=out, config=cfg, overwrite=overwrite, domain=d)
    _echo_result(result)
    if out is not None:
        typer.echo(f"run folder: {out}")
    return result


def _make_prompt_command(spec: AttackSpec):
    def command(
        run: Path = typer.Option(..., "--run", help="the protected prompt's run folder (`ipshield protect ip-clip` "
                                                    "or ntl-prompt, coop)"),
        model: Optional[Path] = typer.Option(None, "--model", help="CLIP checkpoint (default: the one the run was "
                                                                   "trained on)"),
        domain: str = DomainOpt,
        source: str = SourceOpt,
        root: Optional[Path] = RootOpt,
        domains: Optional[str] = AttackDomainsOpt,
        config: Optional[Path] = ConfigOpt,
        overrides: Optional[list[str]] = SetOpt,
        out: Optional[Path] = OutOpt,
        seed: Optional[int] = SeedOpt,
        overwrite: bool = OverwriteOpt,
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (where the CLIP is loaded)"),
    ) -> None:
        run_prompt_attack_command(spec, run=run, model=model, domain=domain, source=source, root=root, domains=domains,
                                  config=config, overrides=overrides, out=out, seed=seed, overwrite=overwrite,
                                  device=device)

    command.__doc__ = (f"{spec.description or spec.name}. Budget: {spec.budget}. "
                       f"Config: {spec.config.__name__ if spec.config else '-'} (--set key=value).")
    return command


for _spec in ATTACKS.specs():
    if _spec.target == "prompt":
        attack_app.command(_spec.name)(_make_prompt_command(_spec))


@attack_app.command("finetune")
def attack_finetune(
    model: Path = ModelOpt,
    domain: str = typer.Option(..., "--domain", help="unauthorized domain the attacker holds labelled images of"),
    k: str = typer.Option("10,100,1000", "--k", help="comma-separated numbers of labelled images (the budgets)"),
    shot: bool = typer.Option(True, "--shot/--no-shot", help="also run the SHOT-style source-free adaptation attack"),
    source: str = SourceOpt,
    root: Optional[Path] = RootOpt,
    domains: Optional[str] = AttackDomainsOpt,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with the fine-tuning config (k aside)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="fine-tuning config override key=value "
                                                  "(repeatable; shot.KEY=value for SHOT's)"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    out: Optional[Path] = OutOpt,
    overwrite: bool = OverwriteOpt,
    scratch: bool = typer.Option(True, "--scratch/--no-scratch", help="add the honest reference: the same architecture "
                                 "trained from scratch on the same k images with the same steps, and the margin"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="the unprotected classifier folder (e.g. the "
                                             "source model): attacked the same way, as the other reference"),
) -> None:
    """Cost to break a domain restriction: accuracy recovered by fine-tuning (finetune = finetune-direct-all) with k
    labels (and SHOT), against the same architecture trained from scratch on the same k images."""
    from ipshield.config import read_yaml
    from ipshield.errors import ConfigError
    from ipshield.jobs.attack import cost_to_break, cost_to_break_configs

    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--k {k!r} is not a list of numbers", "e.g. --k 10,100,1000") from None
    finetune_set = [o for o in overrides or [] if not o.strip().startswith("shot.")]
    shot_set = [o.strip()[len("shot."):] for o in overrides or [] if o.strip().startswith("shot.")]
    data = read_yaml(config)
    cost_to_break_configs(ks, shot, finetune_set, shot_set, data)  # a clear error before any data is loaded
    clf, d = _load_target(model, domain, source, root, domains)
    ref = None
    if reference is not None:
        from ipshield.models.classifiers import load_classifier

        ref = load_classifier(reference, classes=d.classes)
    result = cost_to_break(clf, d, ks=ks, shot=shot, out=out, overrides=finetune_set, shot_overrides=shot_set,
                           seed=seed, config=data, overwrite=overwrite, scratch=scratch, reference=ref)
    skipped = result.pop("skipped", None)
    _echo_result(result)
    if skipped:
        typer.echo(f"skipped k={', '.join(map(str, skipped['k']))}: {skipped['reason']}")
    if out is not None:
        typer.echo(f"run folder: {out}")
