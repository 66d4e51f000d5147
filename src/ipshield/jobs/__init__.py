"""The jobs layer: one function per job, the only code that writes run folders.

The CLI, the Python API (``ipshield.api``), the benchmarks and the demo call these functions;
each opens the run folder (``runs.open_run``: a finished run is refused unless ``overwrite``),
marks it ``failed`` / ``interrupted`` with the reason when the job does not finish
(``runs.run_guard``), and writes ``config.yaml``, ``metrics.json`` and ``run.json`` in one place.

- :func:`protect`: any registered protection method or reference (``ipshield protect METHOD``);
- :func:`evaluate`, :func:`predict`: a saved CLIP prompt run on any domains / an image folder;
- :mod:`ipshield.jobs.watermark`: watermark apply / calibrate / verify and the extraction attack;
- :mod:`ipshield.jobs.attack`: the attacks of the ``ATTACKS`` registry on a saved model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ipshield.config import resolve_config
from ipshield.errors import DataError, IPShieldError
from ipshield.job import Job
from ipshield.registry import METHODS, MethodSpec
from ipshield.runs import open_run, run_guard


def match_domain(name: str, domains: Mapping[str, Any]) -> str:
    """Case-insensitive match of a domain name; a clear error lists the choices."""
    for d in domains:
        if d.lower() == str(name).strip().lower():
            return d
    raise DataError(f"unknown domain '{name}'", f"choose one of: {', '.join(domains)}")


def build_config(spec: MethodSpec, config: Any = None, overrides: Sequence[str] | None = None,
                 scenario: str | None = None, seed: int | None = None, device: str | None = None):
    """The validated config of ``spec``: an instance is used as given (``overrides``, ``scenario``,
    ``seed`` and ``device`` applied on top), a mapping is read as data over the entry's defaults."""
    if spec.config is None:
        raise IPShieldError(f"protection method '{spec.name}' has no config class", "register it with config=...")
    extra = {"scenario": scenario, "seed": seed, "device": device}
    return resolve_config(spec.config, config, overrides, spec.defaults, what=f"'{spec.name}'", **extra)


def _default_model(spec: MethodSpec, domains: dict, authorized: str, out: Path | None, seed: int, verbose: bool):
    if spec.model == "clip":
        from ipshield.models.clip import load_clip
        from ipshield.models.tiny_clip import small_clip

        return load_clip(small_clip("default"))
    from ipshield.models.classifiers import train_source

    src_dir = out / "source" if out is not None else None
    if verbose:
        print(f"no source model given: training vgg_small on {authorized}" + (f" into {src_dir}" if src_dir else ""))
    return train_source("vgg_small", domains[authorized], out=src_dir, seed=seed)


def protect(method: str, *, domains: Mapping[str, Any], authorized: str | None = None,
            unauthorized: Sequence[str] = (), out: str | Path | None = None, model: Any = None, config: Any = None,
            overrides: Sequence[str] | None = None, scenario: str | None = None, seed: int | None = None,
            device: str | None = None, options: Mapping[str, Any] | None = None, overwrite: bool = False,
            verbose: bool = True) -> dict[str, Any]:
    """Run the registered method ``method`` and return its metrics (also in ``out/metrics.json``).

    ``model``: the CLIP adapter or the source ``Classifier`` (default: the small CLIP, or a
    ``vgg_small`` trained on the authorized domain into ``out/source``); ``config``: a config
    instance or a mapping over the entry's defaults, then ``overrides`` (``key=value``);
    ``scenario``: one of the method's scenarios (its first by default); ``options``: extras of
    ``Job.options``.
    """
    spec = METHODS.get(method)
    if scenario is None:  # the config's own scenario, else the method's first
        scenario = config.get("scenario") if isinstance(config, Mapping) else getattr(config, "scenario", None)
    scenario = spec.check_scenario(scenario)
    cfg = build_config(spec, config, overrides, scenario, seed, device)
    if getattr(cfg, "scenario", None) is not None:  # an override may have set it
        scenario = spec.check_scenario(cfg.scenario)
    domains = dict(domains)
    if not domains:
        raise DataError("no domains to run on", "name at least one domain (--domains)")
    needs_authorized = bool(spec.data) or bool(spec.scenarios)
    if authorized is None:
        if needs_authorized:
            raise DataError(f"'{spec.name}' needs an authorized domain", f"pass --authorized, one of: {', '.join(domains)}")
        auth = None
    else:
        auth = match_domain(authorized, domains)
    unauth = [match_domain(u, domains) for u in unauthorized]
    if auth is not None and auth in unauth:
        raise DataError(f"domain '{auth}' is given as both authorized and unauthorized",
                        "name a different unauthorized domain (or use --scenario target-free / ownership)")
    if scenario == "target-specified" and not unauth:
        raise DataError(f"the target-specified scenario of '{spec.name}' needs at least one unauthorized domain",
                        "pass --unauthorized NAME[,NAME]"
                        + (f", or use --scenario {' / '.join(s for s in spec.scenarios if s != 'target-specified')}"
                           if len(spec.scenarios) > 1 else ""))
    if scenario == "target-free" and not unauth and spec.model == "classifier":
        # nothing is trained on them: the other domains are where the protection is measured
        unauth = [d for d in domains if d != auth]
    out_path = Path(out) if out is not None else None
    run = None
    if out_path is not None:
        from ipshield.distributed import is_main

        if is_main():
            run = open_run(out_path, f"protect-{spec.name}", cfg, seed=getattr(cfg, "seed", None), overwrite=overwrite)
    if run is None:
        model = _resolve_model(spec, model, domains, auth, out_path, cfg, verbose)
        return _protect_body(spec, cfg, domains, auth, unauth, scenario, out_path, model, options, verbose)
    with run_guard(run):
        model = _resolve_model(spec, model, domains, auth, out_path, cfg, verbose)
        metrics = _protect_body(spec, cfg, domains, auth, unauth, scenario, out_path, model, options, verbose)
        run.save_metrics(metrics)
        extra = {}
        if spec.model == "clip" and getattr(model, "path", None):  # what `evaluate`/`predict` reload it on
            extra["model_path"] = str(Path(model.path).resolve())
        run.finish(method=spec.name, **extra)
    return metrics


def _resolve_model(spec, model, domains, auth, out_path, cfg, verbose):
    """The model a job runs on: the given one, loaded when it is a path, or the method's default."""
    if model is None:
        model = _default_model(spec, domains, auth, out_path, getattr(cfg, "seed", 0), verbose)
    elif spec.model == "classifier" and isinstance(model, (str, Path)):
        from ipshield.models.classifiers import load_classifier

        model = load_classifier(model, classes=domains[auth].classes)
    elif spec.model == "clip" and isinstance(model, (str, Path)):
        from ipshield.models.clip import load_clip

        model = load_clip(model)
    return model


def _protect_body(spec, cfg, domains, auth, unauth, scenario, out_path, model, options, verbose) -> dict[str, Any]:
    job = Job(model=model, domains=domains, authorized=auth, unauthorized=unauth, scenario=scenario, out=out_path,
              verbose=verbose, options=options if isinstance(options, dict) else dict(options or {}))
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    return spec.run(job, cfg)


# ---------------------------------------------------------------------------- saved prompt runs


def evaluate(run: str | Path, domains: Mapping[str, Any], model: Any = None, out: str | Path | None = None,
             authorize: Sequence[str] | str | None = None, reference: Mapping[str, Any] | None = None,
             details: bool = False) -> dict:
    """Accuracy of a saved CLIP prompt run (ip-clip, ntl-prompt, coop) on every given domain;
    with ``out``, also written as JSON ({"run", "accuracy", "verdict", "authorized"}).

    [ours] ``verdict``: per test set the share the run's authorization head accepts at its saved
    threshold, the AUROC against the authorized test set, TAR and FAR (``{"available": false,
    "note": ...}`` for a run without a head). ``authorize``: the authorized domains at deployment
    (a switchable run). ``reference``: domains whose test sets stand for the authorized test set
    when it is not among ``domains``. Returns the accuracies (as before), or with ``details`` the
    whole report."""
    import json

    from ipshield.protect.ipclip_run import evaluate_run_report

    auth = _names(authorize)
    adapter = model if model is not None and not isinstance(model, (str, Path)) else run_adapter(run, model)
    report = evaluate_run_report(run, adapter, dict(domains), auth, dict(reference or {}))
    report = {"run": str(run), "authorized": report["verdict"].get("authorized"), **report}
    if out is not None:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=2) + "\n")
    return report if details else report["accuracy"]


def predict(run: str | Path, images: str | Path, model: Any = None, out: str | Path | None = None,
            authorize: Sequence[str] | str | None = None) -> list[dict]:
    """The class (and probability) a saved CLIP prompt run predicts for every image under
    ``images``, with [ours] the authorization verdict and its score (score - threshold, >= 0:
    authorized; "unavailable" / empty for a run without a head); with ``out``, also written as
    CSV. ``authorize``: the authorized domains at deployment (a switchable run)."""
    import csv

    from ipshield.protect.ipclip_run import predict_folder

    adapter = model if model is not None and not isinstance(model, (str, Path)) else run_adapter(run, model)
    rows = predict_folder(run, images, adapter, authorize=_names(authorize))
    if out is not None:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "class", "index", "probability", "verdict", "score"])
            w.writeheader()
            w.writerows([{**r, "score": "" if r["score"] is None else r["score"]} for r in rows])
    return rows


def _names(names: Sequence[str] | str | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    out = [str(n).strip() for n in names if str(n).strip()]
    return out or None


def run_adapter(run: str | Path, model: str | Path | None = None, device: str = "auto"):
    """The CLIP a saved prompt run was trained on (recorded in the run), or ``model``."""
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import small_clip
    from ipshield.protect.ipclip_run import run_kind, saved_model_path
    from ipshield.utils import resolve_device

    run_kind(run)  # a clear error for a folder that is not a run
    if model is None and saved_model_path(run) and Path(saved_model_path(run)).is_dir():
        model = Path(saved_model_path(run))
    path = Path(model) if model is not None else small_clip("default")
    return load_clip(path, device=str(resolve_device(device)))


# ---------------------------------------------------------------------------- the former entry points
# (the names of the Python API before the jobs layer; each is one call of ``protect``)


def run_zero_shot(adapter, domains, out, config=None, model_path: str | None = None) -> dict:
    return protect("zero-shot", domains=domains, out=out, model=adapter, config=config,
                   options={"model_path": model_path})


def run_coop(adapter, domains, authorized: str, out, config=None, verbose: bool = True) -> dict:
    return protect("coop", domains=domains, authorized=authorized, out=out, model=adapter, config=config, verbose=verbose)


def _prompt_method(method: str, adapter, domains, authorized: str, unauthorized: Sequence[str], out, config,
                   coop_config, with_coop: bool, verbose: bool) -> dict:
    return protect(method, domains=domains, authorized=authorized,
                   unauthorized=unauthorized if _scenario(config) == "target-specified" else (),
                   out=out, model=adapter, config=config, verbose=verbose,
                   options={"coop_config": coop_config, "with_coop": with_coop})


def run_ipclip(adapter, domains, authorized: str, unauthorized: Sequence[str], out, config=None, coop_config=None,
               with_coop: bool = True, verbose: bool = True) -> dict:
    return _prompt_method("ip-clip", adapter, domains, authorized, unauthorized, out, config, coop_config, with_coop,
                          verbose)


def run_ntl_prompt(adapter, domains, authorized: str, unauthorized: Sequence[str], out, config=None, coop_config=None,
                   with_coop: bool = True, verbose: bool = True) -> dict:
    return _prompt_method("ntl-prompt", adapter, domains, authorized, unauthorized, out, config, coop_config, with_coop,
                          verbose)


def _scenario(config) -> str:
    return getattr(config, "scenario", None) or "target-specified"
