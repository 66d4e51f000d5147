"""The attack jobs: any entry of the ``ATTACKS`` registry on a target, with a run folder.

- :func:`attack`: ``attack(name, target=..., out=..., config=..., overrides=[...], **inputs)``
  resolves the spec, refuses a target of another kind and unknown or missing inputs, builds the
  config (extra keys and a budget of 0 are ConfigErrors), runs ``spec.run(target, config,
  **inputs)`` and, with ``out``, writes the run folder (``config.yaml``, ``metrics.json`` = the
  JSON-able part of the result, ``run.json``; an attacked classifier, or an attacked prompt that
  can save itself (``prompt-finetune``), goes to ``out/model``). The prompt attacks
  (``prompt-finetune``, ``prompt-coop``: ``ipshield.attacks.prompt``) take a CLIP prompt model
  (IP-CLIP, NTL-prompt) as the target and ``domain=``.
- :func:`cost_to_break`: the ``finetune`` attack at several budgets ``k`` and, optionally, ``shot``,
  on one unauthorized domain (``ipshield attack finetune``), with the honest references: the same
  architecture trained from scratch on the same k images with the same steps (``scratch_k<k>``,
  and the protection margin ``margin_k<k>`` = fine-tuned - from scratch) and, given the
  unprotected model (``reference=``), the same attacks on it (``unprotected_*``).
- the whole attack suite with its references: ``ipshield.attacks.robust`` (the benchmark's
  ``digits-robust`` suite; ``prompt_robust`` for a CLIP prompt model).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

from ipshield.config import resolve_config
from ipshield.errors import ConfigError, IPShieldError
from ipshield.registry import ATTACKS, AttackSpec
from ipshield.runs import open_run, run_guard

#: what the usual inputs of an attack are, for the error that names a missing one
_INPUT_HELP = {
    "domain": "the attacker's data: a Domain of ipshield.data.load_domains",
    "authorized": "the attacker's share of the authorized (source-domain) images: a Domain of ipshield.data.load_domains",
    "public": "public image-caption pairs: a ReferenceSample (ipshield.watermark.base.reference_from_synthetic)",
    "arch_dir": "the CLIP folder whose architecture and tokenizer the student uses",
}


def build_attack_config(spec: AttackSpec, config: Any = None, overrides: Sequence[str] | None = None,
                        seed: int | None = None):
    """The validated config of attack ``spec``: an instance is used as given (``overrides`` and
    ``seed`` applied on top), a mapping is read as data over the class defaults."""
    if spec.config is None:
        raise IPShieldError(f"attack '{spec.name}' has no config class", "register it with config=...")
    return resolve_config(spec.config, config, overrides, what=f"attack '{spec.name}'", seed=seed)


def check_inputs(spec: AttackSpec, inputs: Mapping[str, Any]) -> None:
    """Refuse inputs ``spec.run`` does not take and required ones that are missing."""
    params = list(inspect.signature(spec.run).parameters.values())[2:]  # after (target, config)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise IPShieldError(f"attack '{spec.name}' takes no input(s) {', '.join(unknown)}",
                            f"its inputs are: {', '.join(names) or 'none'}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in inputs
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if missing:
        raise IPShieldError(f"attack '{spec.name}' needs the input(s) {', '.join(missing)}",
                            "pass " + "; ".join(f"{m}= ({_INPUT_HELP[m]})" if m in _INPUT_HELP else f"{m}=..." for m in missing))


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return True  # a numpy / torch scalar
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_plain(x) for x in v.values())
    return False


def jsonable_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an attack's result that belongs in metrics.json (numbers, names; no models)."""
    return {str(k): v for k, v in result.items() if _plain(v)}


def attack(name: str, *, target: Any, out: str | Path | None = None, config: Any = None,
           overrides: Sequence[str] | None = None, seed: int | None = None, overwrite: bool = False,
           save_model: bool = True, **inputs: Any) -> dict[str, Any]:
    """Run the registered attack ``name`` on ``target`` and return its result (a dict with
    ``"attack"``, its budget, the numbers, and the attacked target under ``"model"``).

    ``config``: a config instance or a mapping over the class defaults, then ``overrides``
    (``key=value``) and ``seed``; ``inputs``: what the attack needs besides the target
    (``domain=`` for classifier attacks, ``public=`` for watermark attacks). With ``out``, the run
    folder gets ``metrics.json`` (the JSON-able part of the result) and, for an attacked classifier
    (``save_model``), ``model/``; a finished run there is refused unless ``overwrite``."""
    from ipshield.attacks.domain import check_target

    spec = ATTACKS.get(name)
    check_target(spec.name, spec.target, target)
    check_inputs(spec, inputs)
    cfg = build_attack_config(spec, config, overrides, seed)
    if out is None:
        return _as_result(spec, spec.run(target, cfg, **inputs))
    run = open_run(out, f"attack-{spec.name}", cfg, getattr(cfg, "seed", None), overwrite)
    with run_guard(run):
        result = _as_result(spec, spec.run(target, cfg, **inputs))
        metrics = {"attack": spec.name, "target": spec.target, "budget": spec.budget, **jsonable_result(result)}
        model = result.get("model")
        if save_model and hasattr(model, "save") and hasattr(model, "classes"):
            model.save(run.path / "model")
            metrics["model_dir"] = "model"
        run.save_metrics(metrics)
    run.finish()
    return result


def _as_result(spec: AttackSpec, result: Any) -> dict[str, Any]:
    if isinstance(result, Mapping):
        return dict(result)
    return {"attack": spec.name, "model": result}


def cost_to_break_configs(ks: Sequence[int], shot: bool, overrides: Sequence[str] | None = None,
                          shot_overrides: Sequence[str] | None = None,
                          config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fine-tuning and SHOT options of :func:`cost_to_break` (only the keys ``config`` and the
    overrides set), validated: unknown keys, bad values and a k below 1 are ConfigErrors, before any work."""
    from ipshield.attacks.domain import FinetuneAttackConfig, SHOTAttackConfig

    if not ks and not shot:
        raise IPShieldError("nothing to run: no k and no SHOT", "give --k 10,100,1000 or drop --no-shot")
    finetune = FinetuneAttackConfig.build(dict(config or {}), list(overrides or [])).model_dump(mode="json",
                                                                                                exclude_unset=True)
    if "k" in finetune:
        raise ConfigError("k is set by the list of budgets, not by an override", "use --k 10,100,1000 (ks=...)")
    for k in ks:
        FinetuneAttackConfig.build({**finetune, "k": k})
    shot_options = SHOTAttackConfig.build({}, list(shot_overrides or [])).model_dump(mode="json", exclude_unset=True)
    return finetune, shot_options


def cost_to_break(model: Any, domain: Any, *, ks: Sequence[int] = (10, 100, 1000), shot: bool = True,
                  out: str | Path | None = None, overrides: Sequence[str] | None = None,
                  shot_overrides: Sequence[str] | None = None, seed: int = 0, n_test: int | None = None,
                  config: Mapping[str, Any] | None = None, overwrite: bool = False, scratch: bool = True,
                  reference: Any = None) -> dict[str, Any]:
    """Unauthorized accuracy (percent) recovered from the classifier ``model`` on ``domain`` by the
    ``finetune`` attack with each ``k`` labelled images and (``shot``) by ``shot``; the finetune
    config from ``config`` (a mapping) and ``overrides``, SHOT's from ``shot_overrides`` (``key=value``). A k larger than the
    domain's training images is skipped (``None``, and listed under ``skipped``). With ``out``,
    a run folder (``metrics.json`` = the result). ``scratch``: add the from-scratch reference and
    the margin per k; ``reference``: the unprotected classifier, attacked the same way
    (``unprotected_finetune_k<k>``, ``unprotected_shot``)."""
    from ipshield.attacks.domain import check_target
    from ipshield.attacks.domain import cost_to_break as _cost_to_break

    ks = [int(k) for k in ks]
    finetune, shot_options = cost_to_break_configs(ks, shot, overrides, shot_overrides, config)
    check_target("finetune", "classifier", model)
    if reference is not None:
        check_target("finetune", "classifier", reference)
    config = {"ks": ks, "shot": shot, "seed": seed, "n_test": n_test, "finetune": finetune, "shot_options": shot_options,
              "scratch": scratch, "reference": reference is not None}

    def compute() -> dict[str, Any]:
        from ipshield.attacks.domain import FinetuneAttackConfig, scratch_attack

        r = _cost_to_break(model, domain, tuple(ks), shot=shot, finetune=finetune, shot_options=shot_options,
                           seed=seed, n_test=n_test)
        if reference is not None:
            u = _cost_to_break(reference, domain, tuple(ks), shot=shot, finetune=finetune, shot_options=shot_options,
                               seed=seed, n_test=n_test)
            r.update({f"unprotected_{k}": v for k, v in u.items() if k != "domain" and not isinstance(v, dict)})
        if scratch:
            for k in ks:
                if r.get(f"finetune_k{k}") is None:
                    continue
                cfg = FinetuneAttackConfig.build({**finetune, "k": k, "seed": seed, "n_test": n_test})
                r[f"scratch_k{k}"] = scratch_attack(model, domain, cfg)["acc_after"]
                r[f"margin_k{k}"] = r[f"finetune_k{k}"] - r[f"scratch_k{k}"]
            if shot:
                r["chance"] = 100.0 / max(1, len(domain.classes))
        skipped = [k for k in ks if r.get(f"finetune_k{k}") is None]
        if skipped:
            r["skipped"] = {"k": skipped, "reason": f"more than the {len(domain.train)} training images of '{domain.name}'"}
        return r

    if out is None:
        return compute()
    run = open_run(out, "attack-cost-to-break", config, seed, overwrite)
    with run_guard(run):
        result = compute()
        run.save_metrics({"attack": "cost-to-break", **result})
    run.finish()
    return result
