"""The attack suite against domain restriction of classifiers, with honest references.

Every classifier attack of the ``ATTACKS`` registry is run under one name (the registry's) at its
budget; attacks whose budget is ``k`` (labelled unauthorized images: the four NTLBench fine-tuning
strategies) are run at every k of a grid. Result keys are ``<attack>`` and ``<attack>_k<k>``
(``finetune-initfc-all_k100``), the same names as the CLI (``ipshield attack NAME``), the API
(``jobs.attack(NAME, ...)``), the tables and the report.

References [definitions ours, following the issue]:

- *unprotected*: the unprotected (source) model under the same attack with the same budget;
- *scratch*: the same architecture with fresh random weights, trained on the same labelled images
  with the same step budget as the attack (:func:`ipshield.attacks.domain.scratch_attack`). Which
  images depends on what the attack's budget is: ``k`` -> the k labelled unauthorized images;
  ``fraction`` -> the same share of labelled *authorized* images (evaluated on the unauthorized
  domain: what those images alone teach); an unlabelled budget (``n_train``: SHOT, NRC) -> no
  labels to train on, so the reference is chance (100 / number of classes);
- *protection margin* = attacked protected accuracy - scratch accuracy (points): at or below 0 the
  protected weights leave the attacker no better off than starting over;
- *labels to match* (per k-attack): the labelled unauthorized images the attacker needs for the
  attacked protected model to reach the unprotected model's unauthorized accuracy (without attack,
  which the unprotected model gives for 0 labels): read off the k grid (0 labels = the protected
  model as given), interpolated linearly in log k between grid points (linearly in k from 0 to the
  first one); ``None`` when even the largest k falls short (reported as "> max k").

The prompt-model path (``prompt_*`` below; the attacks with ``target="prompt"``: ``prompt-finetune``,
``prompt-coop`` of :mod:`ipshield.attacks.prompt`, on IP-CLIP / NTL-prompt) gives the same grid keys,
the same rows (:func:`robust_rows`, :func:`labels_rows`) and so the same tables, with the references
of a prompt [definitions ours]:

- *scratch*: CoOp trained from a random context on the same k labelled unauthorized images with
  the same step budget (steps, batch size, lr) as the attack (``scratch_k<k>``);
- *zero-shot*: the frozen backbone with the class-name prompt, no labels (``zero-shot``; an extra
  ``zero_shot`` column of the rows);
- *unprotected*: CoOp trained on the authorized domain (the unprotected prompt-learned model),
  attacked the same way; its unauthorized accuracy before any attack is the target of *labels to
  match*.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ipshield.data.domain import Domain
from ipshield.errors import ConfigError
from ipshield.registry import ATTACKS

#: the suite's attacks, in table order
ROBUST_ATTACKS = ("finetune-initfc-all", "finetune-initfc-fc", "finetune-direct-fc", "finetune-direct-all",
                  "source-finetune", "transntl", "disguise", "shot", "nrc")
#: short labels for plots (the names stay the registry's everywhere else)
SHORT = {"finetune-initfc-all": "initFC-all", "finetune-initfc-fc": "initFC-FC", "finetune-direct-fc": "direct-FC",
         "finetune-direct-all": "direct-all", "source-finetune": "source FT", "transntl": "TransNTL",
         "disguise": "disguise", "shot": "SHOT", "nrc": "NRC"}


def classifier_attacks() -> list[str]:
    """Every registered attack on classifiers except ``finetune`` (the old name of ``finetune-direct-all``)."""
    return [s.name for s in ATTACKS.specs() if s.target == "classifier" and s.name != "finetune"]


def check_attacks(names: Sequence[str]) -> list[str]:
    known = classifier_attacks()
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown classifier attack(s) {bad} in the attack suite", f"choose among {', '.join(known)}")
    return list(names)


def uses_k(name: str) -> bool:
    return ATTACKS.get(name).budget == "k"


def needs_authorized(name: str) -> bool:
    import inspect

    return "authorized" in inspect.signature(ATTACKS.get(name).run).parameters


def reference_kind(name: str) -> str:
    """What the from-scratch reference of attack ``name`` trains on: "unauthorized" (k labelled
    unauthorized images), "authorized" (the same labelled share of the authorized images) or
    "chance" (an unlabelled budget)."""
    budget = ATTACKS.get(name).budget
    return {"k": "unauthorized", "fraction": "authorized"}.get(budget, "chance")


def result_key(name: str, k: int | None = None) -> str:
    return f"{name}_k{k}" if k is not None else name


def grid_keys(attacks: Sequence[str], ks: Sequence[int]) -> list[tuple[str, int | None]]:
    return [(a, k) for a in attacks for k in (ks if uses_k(a) else [None])]


def attack_config(name: str, options: Mapping[str, Any], seed: int, n_test: int | None, k: int | None = None):
    data = {**dict(options), "seed": seed, "n_test": n_test}
    if k is not None:
        data["k"] = k
    return ATTACKS.get(name).make_config(data)


def run_one(name: str, model, unauthorized: Domain, authorized: Domain | None, config, acc_before: float | None = None) -> dict:
    """Attack ``name`` on ``model`` with ``config`` (the result dict). The built-in attacks skip the
    evaluation before the attack when ``acc_before`` is known; any other registered classifier
    attack runs through its spec."""
    from ipshield.attacks import disguise, domain, sourcedata, sourcefree

    if name.startswith("finetune-") and name[len("finetune-"):] in domain.FINETUNE_STRATEGIES:
        return domain.finetune_attack(model, unauthorized, config, strategy=name[len("finetune-"):], name=name,
                                      acc_before=acc_before)
    if name == "shot":
        return domain.shot_attack(model, unauthorized, config, acc_before=acc_before)
    if name == "nrc":
        return sourcefree.nrc_attack(model, unauthorized, config, acc_before=acc_before)
    own = {"source-finetune": sourcedata.source_finetune_attack, "transntl": sourcedata.transntl_attack,
           "disguise": disguise.disguise_attack}
    if name in own:
        return own[name](model, unauthorized, authorized, config, acc_before=acc_before)
    spec = ATTACKS.get(name)
    inputs: dict[str, Any] = {"domain": unauthorized}
    if needs_authorized(name):
        inputs["authorized"] = authorized
    return dict(spec.run(model, config, **inputs))


def _run_grid(cells, unauthorized: Domain, configure, execute, acc_before: float | None, log) -> dict[str, Any]:
    """The one loop of every attack grid: for each (attack, k) of ``cells`` the config
    (``configure(name, k)``) and the result (``execute(name, config, acc_before)``); a k larger than
    the domain's training images gives None (listed under ``skipped``)."""
    out: dict[str, Any] = {}
    skipped = []
    for name, k in cells:
        if k is not None and k > len(unauthorized.train):
            out[result_key(name, k)] = None
            skipped.append(result_key(name, k))
            continue
        r = execute(name, configure(name, k), acc_before)
        acc_before = r.get("acc_before", acc_before)
        out[result_key(name, k)] = r["acc_after"]
        if "queries" in r:
            out[f"{name}_queries"] = r["queries"]
        if log:
            log(f"  {result_key(name, k)}: {r['acc_after']:.1f} ({r.get('seconds', 0):.0f}s)")
    out["acc_before"] = acc_before
    if skipped:
        out["skipped"] = skipped
    return out


def attack_grid(model, unauthorized: Domain, authorized: Domain | None, attacks: Sequence[str], ks: Sequence[int],
                options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0, n_test: int | None = None,
                acc_before: float | None = None, log=None) -> dict[str, Any]:
    """Unauthorized accuracy after every attack (and every k of the k-attacks): ``{result_key: acc}``;
    a k larger than the domain's training images gives None (listed under ``skipped``)."""
    options = options or {}
    return _run_grid(grid_keys(check_attacks(attacks), ks), unauthorized,
                     lambda name, k: attack_config(name, options.get(name, {}), seed, n_test, k),
                     lambda name, cfg, before: run_one(name, model, unauthorized, authorized, cfg, before),
                     acc_before, log)


def scratch_grid(model, unauthorized: Domain, authorized: Domain | None, attacks: Sequence[str], ks: Sequence[int],
                 options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0, n_test: int | None = None,
                 which: str = "all") -> dict[str, Any]:
    """The from-scratch references of the grid: ``{"scratch_k<k>": acc}`` (k labelled unauthorized
    images, the step budget of the first k-attack), ``{"scratch_<attack>": acc}`` for the attacks on
    labelled authorized images and ``"chance"``. ``which``: "unauthorized" / "authorized" / "all"
    (the first depends only on the unauthorized domain, so a benchmark computes it once per domain)."""
    from ipshield.attacks.domain import scratch_attack
    from ipshield.attacks.sourcedata import fraction_count

    options = options or {}
    attacks = check_attacks(attacks)
    out: dict[str, Any] = {"chance": 100.0 / max(1, len(unauthorized.classes))}
    k_attacks = [a for a in attacks if reference_kind(a) == "unauthorized"]
    if k_attacks and which in ("all", "unauthorized"):
        base = dict(options.get(k_attacks[0], {}))
        for k in ks:
            if k > len(unauthorized.train):
                out[f"scratch_k{k}"] = None
                continue
            cfg = attack_config(k_attacks[0], base, seed, n_test, k)
            out[f"scratch_k{k}"] = scratch_attack(model, unauthorized, cfg)["acc_after"]
    if which in ("all", "authorized"):
        for a in attacks:
            if reference_kind(a) != "authorized" or authorized is None:
                continue
            cfg = ATTACKS.get(a).make_config({**dict(options.get(a, {})), "seed": seed, "n_test": n_test})
            n = fraction_count(a, cfg.fraction, authorized)
            steps = int(getattr(cfg, "steps", 80))
            ft = {"k": n, "steps": steps, "seed": seed, "n_test": n_test}
            out[f"scratch_{a}"] = scratch_attack(model, unauthorized, ft, train=authorized, n=n)["acc_after"]
    return out


def scratch_of(name: str, k: int | None, refs: Mapping[str, Any]) -> float | None:
    """The from-scratch reference of attack ``name`` at ``k`` in ``refs`` (see :func:`scratch_grid`)."""
    kind = reference_kind(name)
    if kind == "unauthorized":
        return refs.get(f"scratch_k{k}")
    if kind == "authorized":
        return refs.get(f"scratch_{name}")
    return refs.get("chance")


def protection_margin(attacked: float | None, scratch: float | None) -> float | None:
    """Attacked protected accuracy - from-scratch accuracy (points); <= 0: no better than starting over."""
    if attacked is None or scratch is None:
        return None
    return float(attacked) - float(scratch)


def labels_to_reach(ks: Sequence[int], accs: Sequence[float | None], target: float, acc0: float | None = None) -> float | None:
    """Labelled images needed for the curve (``ks``, ``accs``; ``acc0`` at 0 labels) to reach
    ``target``: 0 when ``acc0`` already does; the first crossing, interpolated linearly in log k
    between grid points (linearly in k between 0 and the first); None when no k reaches it."""
    pts = sorted((int(k), float(a)) for k, a in zip(ks, accs) if a is not None and math.isfinite(float(a)))
    if acc0 is not None and acc0 >= target:
        return 0.0
    prev = (0, float(acc0)) if acc0 is not None else None
    for k, a in pts:
        if a >= target:
            if prev is None or a == prev[1]:
                return float(k)
            t = (target - prev[1]) / (a - prev[1])
            if prev[0] <= 0:
                return float(prev[0] + t * (k - prev[0]))
            return float(10 ** (math.log10(prev[0]) + t * (math.log10(k) - math.log10(prev[0]))))
        prev = (k, a)
    return None


def robust_rows(row: Mapping[str, Any], source: Mapping[str, Any] | None, refs: Mapping[str, Any],
                attacks: Sequence[str], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Long rows (one per attack and k) of one protected model on one pair: ``row`` holds its grid
    (plus method, authorized, unauthorized, seed, acc_u_protected, acc_u_source), ``source`` the
    unprotected model's grid on the same pair, ``refs`` the from-scratch references."""
    out = []
    for name, k in grid_keys(attacks, ks):
        key = result_key(name, k)
        attacked = row.get(key)
        scratch = scratch_of(name, k, refs)
        unprot = (source or {}).get(key)
        out.append({"method": row["method"], "authorized": row["authorized"], "unauthorized": row["unauthorized"],
                    "seed": row.get("seed"), "attack": name, "k": k, "budget": ATTACKS.get(name).budget,
                    "reference": reference_kind(name), "acc_u_protected": row.get("acc_u_protected"),
                    "acc_u_source": row.get("acc_u_source"), "attacked": attacked, "unprotected": unprot,
                    "scratch": scratch, "margin": protection_margin(attacked, scratch),
                    "vs_unprotected": protection_margin(attacked, unprot)})
        if "zero-shot" in refs:  # the prompt-model path: the backbone with no labels
            out[-1]["zero_shot"] = refs["zero-shot"]
    return out


def labels_rows(row: Mapping[str, Any], attacks: Sequence[str], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Per k-attack: the labels the attacker needs to match the unprotected model (see the module doc)."""
    out = []
    target = row.get("acc_u_source")
    for name in attacks:
        if not uses_k(name) or target is None:
            continue
        need = labels_to_reach(ks, [row.get(result_key(name, k)) for k in ks], float(target), row.get("acc_u_protected"))
        out.append({"method": row["method"], "authorized": row["authorized"], "unauthorized": row["unauthorized"],
                    "seed": row.get("seed"), "attack": name, "target": target, "labels_to_match": need,
                    "labels_text": format_labels(need, ks)})
    return out


def format_labels(need: float | None, ks: Sequence[int]) -> str:
    if need is None:
        return f"> {max(ks)}" if ks else "n/a"
    return "0" if need == 0 else f"{need:.0f}"


# ============================================================================ the prompt-model path
def prompt_attacks() -> list[str]:
    """Every registered attack on CLIP prompt models (``target="prompt"``), the built-in ones first in
    table order (``ipshield.attacks.prompt.PROMPT_ATTACKS``)."""
    from ipshield.attacks.prompt import PROMPT_ATTACKS

    names = [s.name for s in ATTACKS.specs() if s.target == "prompt"]
    return [n for n in PROMPT_ATTACKS if n in names] + [n for n in names if n not in PROMPT_ATTACKS]


def check_prompt_attacks(names: Sequence[str]) -> list[str]:
    known = prompt_attacks()
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown prompt attack(s) {bad}", f"choose among {', '.join(known)}")
    return list(names)


def _prompt_config(name: str, options: Mapping[str, Any], seed: int, n_test: int | None, k: int | None):
    data = {**dict(options), "seed": seed, "n_test": n_test}
    if k is not None:
        data["k"] = k
    if "references" in (ATTACKS.get(name).config.model_fields if ATTACKS.get(name).config else {}):
        data["references"] = False  # the grid's references are computed once, by prompt_scratch_grid
    return ATTACKS.get(name).make_config(data)


def prompt_attack_grid(model, unauthorized: Domain, attacks: Sequence[str], ks: Sequence[int],
                       options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0, n_test: int | None = None,
                       acc_before: float | None = None, log=None) -> dict[str, Any]:
    """:func:`attack_grid` for a CLIP prompt model (IP-CLIP, NTL-prompt, CoOp): ``{result_key: acc}``
    and ``acc_before``; a k larger than the domain's training images gives None (under ``skipped``)."""
    from ipshield.attacks import prompt

    own = {"prompt-finetune": prompt.prompt_finetune_attack, "prompt-coop": prompt.prompt_coop_attack}
    options = options or {}

    def execute(name: str, cfg, before: float | None) -> dict:
        if name in own:
            return own[name](model, unauthorized, cfg, acc_before=before)
        return dict(ATTACKS.get(name).run(model, cfg, domain=unauthorized))

    return _run_grid(grid_keys(check_prompt_attacks(attacks), ks), unauthorized,
                     lambda name, k: _prompt_config(name, options.get(name, {}), seed, n_test, k), execute,
                     acc_before, log)


def prompt_scratch_grid(adapter, unauthorized: Domain, attacks: Sequence[str], ks: Sequence[int],
                        options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
                        n_test: int | None = None) -> dict[str, Any]:
    """The references of a prompt grid: ``chance``, ``zero-shot`` (the backbone, no labels) and
    ``scratch_k<k>`` (CoOp from scratch on the k images, the step budget of the first k-attack)."""
    from ipshield.attacks.prompt import scratch_prompt, zero_shot_reference

    options = options or {}
    attacks = check_prompt_attacks(attacks)
    out: dict[str, Any] = {"chance": 100.0 / max(1, len(unauthorized.classes)),
                           "zero-shot": zero_shot_reference(adapter, unauthorized, n_test, seed)}
    k_attacks = [a for a in attacks if uses_k(a)]
    if k_attacks:
        for k in ks:
            if k > len(unauthorized.train):
                out[f"scratch_k{k}"] = None
                continue
            cfg = _prompt_config(k_attacks[0], options.get(k_attacks[0], {}), seed, n_test, k)
            out[f"scratch_k{k}"] = scratch_prompt(adapter, unauthorized, cfg)["acc_after"]
    return out


def prompt_robust(model, unauthorized: Domain, *, attacks: Sequence[str] | None = None, ks: Sequence[int] = (10,),
                  authorized: Domain | None = None, reference=None, coop_options: Mapping[str, Any] | None = None,
                  options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0, n_test: int | None = None,
                  method: str = "protected", log=None, unprotected: Mapping[str, Any] | None = None,
                  refs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The attack suite on one protected CLIP prompt model with its references and the rows of the
    robust tables: ``{"grid", "unprotected" (or None), "refs", "rows", "labels"}``.

    ``reference``: the unprotected prompt model (CoOp trained on the authorized domain); without
    it and with ``authorized`` one is trained (``CoOpConfig`` + ``coop_options``, on the CLIP's
    device). Each is attacked the same way; with neither, the unprotected columns are None.
    ``unprotected`` / ``refs``: the ``"unprotected"`` / ``"refs"`` of an earlier call with the same
    attacks, ks, options, seed, n_test, unauthorized domain and reference, reused instead of
    recomputed (a benchmark attacks several protections of one pair against one reference)."""
    attacks = check_prompt_attacks(list(attacks) if attacks is not None else prompt_attacks())
    adapter = model.adapter
    grid = prompt_attack_grid(model, unauthorized, attacks, ks, options, seed, n_test, log=log)
    if unprotected is not None:
        source = dict(unprotected)
    else:
        if reference is None and authorized is not None:
            from ipshield.protect.coop import CoOpConfig, train_coop

            cfg = CoOpConfig.build({"device": adapter.device.type, "seed": seed, **dict(coop_options or {})})
            reference = train_coop(adapter, authorized, cfg, verbose=False)
        source = prompt_attack_grid(reference, unauthorized, attacks, ks, options, seed, n_test) \
            if reference is not None else None
    refs = dict(refs) if refs is not None else prompt_scratch_grid(adapter, unauthorized, attacks, ks, options, seed, n_test)
    row = {**grid, "method": method, "authorized": authorized.name if authorized is not None else None,
           "unauthorized": unauthorized.name, "seed": seed, "acc_u_protected": grid["acc_before"],
           "acc_u_source": source["acc_before"] if source else None}
    return {"grid": grid, "unprotected": source, "refs": refs, "rows": robust_rows(row, source, refs, attacks, ks),
            "labels": labels_rows(row, attacks, ks)}
