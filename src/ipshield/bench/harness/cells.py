"""The cells of a suite (one method on one pair with one seed) and the cell runners that compute them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ipshield.bench.harness.embedding import embedding_profiles, pca_2d
from ipshield.bench.harness.suite import MethodEntry, SuiteConfig
from ipshield.config import BaseConfig
from ipshield.errors import ConfigError

CellRunner = Callable[["Cell"], dict]

#: name -> cell runner. Register with :func:`register_cell`.
CELL_RUNNERS: dict[str, CellRunner] = {}
#: runners that use the CLIP adapter (the rest use image classifiers)
CLIP_RUNNERS: set[str] = set()


def runner_for(name: str) -> tuple[CellRunner, bool] | None:
    """The cell runner of ``name`` and whether it uses the CLIP: a benchmark-only runner of
    :data:`CELL_RUNNERS` (``source``, ``zero-shot``, ``coop``, ...) first, else any method of the
    ``METHODS`` registry (CLIP methods through :func:`method_cell`, classifier methods through the
    digits benchmark). None when ``name`` is neither."""
    if name in CELL_RUNNERS:
        return CELL_RUNNERS[name], name in CLIP_RUNNERS
    from ipshield.registry import METHODS

    if name in METHODS:
        spec = METHODS.get(name)
        return (method_cell, True) if spec.model == "clip" else (_digits_cell, False)
    return None


def runner_names() -> list[str]:
    from ipshield.registry import METHODS

    return sorted(set(CELL_RUNNERS) | set(METHODS.names()))


def register_cell(name: str, clip: bool = False) -> Callable[[CellRunner], CellRunner]:
    """Register ``fn(cell) -> metrics dict`` as the cell runner ``name`` (re-registering replaces)."""

    def deco(fn: CellRunner) -> CellRunner:
        CELL_RUNNERS[name] = fn
        if clip:
            CLIP_RUNNERS.add(name)
        else:
            CLIP_RUNNERS.discard(name)
        return fn

    return deco


# ============================================================================ cells


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


@dataclass
class Cell:
    """What a cell runner receives: one method on one pair with one seed."""

    method: str
    runner: str
    config: dict[str, Any]
    authorized: str
    unauthorized: str
    seed: int
    out: Path
    ctx: "SuiteContext"
    embedding_map: bool = False
    key: str = ""
    #: the definition hash of the suite's prompt attacks when this cell's trained prompt is attacked
    #: (see :func:`prompt_attack_hash`); None: not attacked
    attack_hash: str | None = None

    def method_config(self, cls: type[BaseConfig], **defaults: Any) -> Any:
        """The method's config class built from ``defaults`` < the suite's overrides < the seed."""
        data = {**defaults, **self.config}
        if "seed" in cls.model_fields:
            data["seed"] = self.seed
        if "device" in cls.model_fields and "device" not in self.config:
            data["device"] = self.ctx.suite.device
        return cls.build(data)


class SuiteContext:
    """Resources shared by the cells of one suite run, created on first use."""

    def __init__(self, suite: SuiteConfig, out: Path, log: Callable[[str], None] = print, verbose: bool = False):
        self.suite = suite
        self.out = out
        self.log = log
        self.verbose = verbose
        self._domains = None
        self._adapter = None
        self._coop: dict[tuple, Any] = {}
        self._digits: dict[int, Any] = {}
        self._prompt_refs: dict[Path, dict] = {}

    @property
    def domains(self):
        if self._domains is None:
            from ipshield.data.sources import load_domains

            self._domains = load_domains(self.suite.source, self.suite.domain_list(), **self.suite.data)
            missing = [d for d in self.suite.domain_list() if d not in self._domains]
            if missing:
                raise ConfigError(f"the source '{self.suite.source}' has no domain(s) {missing}",
                                  f"its domains here: {', '.join(self._domains)}")
        return self._domains

    @property
    def adapter(self):
        if self._adapter is None:
            from ipshield.models.clip import load_clip
            from ipshield.utils import resolve_device

            if self.suite.model:
                path = Path(self.suite.model).expanduser()
            else:
                from ipshield.models.tiny_clip import small_clip

                path = small_clip(self.suite.clip_preset, show_progress=self.verbose)
            self._adapter = load_clip(path, device=str(resolve_device(self.suite.device)))
        return self._adapter

    def coop_config(self, seed: int):
        """CoOp's config for the references: the suite's ``coop`` method config when it has one."""
        from ipshield.protect.coop import CoOpConfig

        overrides: dict[str, Any] = {}
        for m in self.suite.methods:
            if m.runner_name == "coop":
                overrides = dict(m.config)
                break
        return CoOpConfig.build({**overrides, "seed": seed, "device": overrides.get("device", self.suite.device)})

    def coop(self, authorized: str, seed: int):
        """The CoOp prompt trained on ``authorized`` with ``seed`` (trained once, saved under shared/)."""
        from ipshield.protect.coop import CoOpModel, train_coop

        cfg = self.coop_config(seed)
        key = (authorized, seed, json.dumps(cfg.to_dict(), sort_keys=True))
        if key in self._coop:
            return self._coop[key]
        digest = hashlib.sha1(key[2].encode()).hexdigest()[:8]
        folder = self.out / "shared" / "coop" / f"{_slug(authorized)}-s{seed}-{digest}"
        if (folder / "prompt.json").is_file():
            model = CoOpModel.load(folder, self.adapter)
            model.eval()
        else:
            model = train_coop(self.adapter, self.domains[authorized], cfg, verbose=self.verbose)
            model.save(folder)
        self._coop[key] = model
        return model

    def _prompt_refs_path(self, authorized: str, unauthorized: str, seed: int) -> Path:
        pa = self.suite.prompt_attacks
        key = json.dumps({"coop": self.coop_config(seed).to_dict(), "attacks": pa.to_dict() if pa else None,
                          "model": self.suite.model, "preset": self.suite.clip_preset, "source": self.suite.source,
                          "data": self.suite.data}, sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        return self.out / "shared" / "prompt-refs" / f"{_slug(authorized)}__{_slug(unauthorized)}__s{seed}-{digest}.json"

    def prompt_references(self, authorized: str, unauthorized: str, seed: int) -> dict | None:
        """The references of the prompt attacks on one pair and seed (the suite's CoOp under the same
        attacks, and the zero-shot / from-scratch references: ``{"unprotected", "refs"}``), once
        computed by an attacked cell (saved under shared/prompt-refs/); None before."""
        path = self._prompt_refs_path(authorized, unauthorized, seed)
        if path not in self._prompt_refs and path.is_file():
            try:
                self._prompt_refs[path] = json.loads(path.read_text())
            except json.JSONDecodeError:
                return None
        return self._prompt_refs.get(path)

    def save_prompt_references(self, authorized: str, unauthorized: str, seed: int, unprotected: dict | None,
                               refs: dict) -> None:
        from ipshield.runs import write_json

        path = self._prompt_refs_path(authorized, unauthorized, seed)
        data = {"authorized": authorized, "unauthorized": unauthorized, "seed": seed, "unprotected": unprotected,
                "refs": refs}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
        self._prompt_refs[path] = data

    def digits_bench(self, seed: int):
        """The ``DigitsBench`` of this seed (sources, pseudo-source data and its cells are cached)."""
        if seed not in self._digits:
            from ipshield.bench.digits import DigitsBench, DigitsBenchConfig, classifier_methods

            ALL_METHODS = classifier_methods()

            opts = dict(self.suite.digits)
            root = opts.pop("root", None) or self.suite.data.get("root")
            # the classifier methods read the suite's data source unless ``digits:`` names its own
            opts.setdefault("source", self.suite.source)
            opts.setdefault("data", {k: v for k, v in self.suite.data.items() if k != "root"})
            # a renamed entry (its own name, a classifier method as runner) is a variant of the bench
            entries = [m for m in self.suite.methods if m.runner_name in ALL_METHODS]
            methods = [m.name for m in entries]
            variants = {**opts.pop("variants", {}), **{m.name: m.runner_name for m in entries if m.name != m.runner_name}}
            method_options = dict(opts.pop("method_options", {}))
            for m in entries:
                if m.config:
                    method_options[m.name] = {**method_options.get(m.name, {}), **m.config}
            cfg = DigitsBenchConfig.build({**opts, "pairs": [list(p) for p in self.suite.pair_list()],
                                           "methods": methods or ["sa-map"], "seed": seed, "method_options": method_options,
                                           "variants": variants})
            self._digits[seed] = DigitsBench(self.out / "shared" / f"digits-s{seed}", cfg, root=root, log=self.log)
        return self._digits[seed]


def cell_key(method: str, authorized: str, unauthorized: str, seed: int) -> str:
    return f"{_slug(method)}__{_slug(authorized)}__{_slug(unauthorized)}__s{seed}"


def cell_hash(suite: SuiteConfig, entry: MethodEntry) -> str:
    """What a cell's result depends on besides its pair and seed: the suite's say, and the library's
    defaults of the method's config (a changed default makes the cell stale, as a changed option
    does)."""
    from ipshield.registry import METHODS

    runner = entry.runner_name
    parts: dict[str, Any] = {"runner": runner, "config": entry.config, "source": suite.source, "data": suite.data}
    if runner in METHODS:
        parts["defaults"] = METHODS.get(runner).make_config({}).to_dict()
    found = runner_for(runner)
    if found is not None and found[1]:
        parts.update(model=suite.model, preset=suite.clip_preset, domains=suite.domain_list())
        if runner not in ("zero-shot", "coop"):
            parts["coop"] = next((m.config for m in suite.methods if m.runner_name == "coop"), {})
    else:
        parts["digits"] = suite.digits
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def attacked_runner(runner: str) -> bool:
    """Whether the suite's prompt attacks run on the cells of ``runner``: the CLIP prompt methods of
    the METHODS registry that run through :func:`method_cell` (ip-clip, ntl-prompt, ...); not
    zero-shot (no prompt) nor the CoOp cell (the unprotected reference of every attacked cell)."""
    found = runner_for(runner)
    return found is not None and found[0] is method_cell


def prompt_attack_hash(suite: SuiteConfig, entry: MethodEntry) -> str | None:
    """What a cell's prompt-attack results depend on besides its :func:`cell_hash` (None: the cell is
    not attacked). Kept apart from the cell hash so that adding, changing or removing
    ``prompt_attacks`` re-runs only the attacks, on the saved trained prompt, and never changes the
    hash of any cell."""
    if suite.prompt_attacks is None or not attacked_runner(entry.runner_name):
        return None
    return hashlib.sha1(json.dumps(suite.prompt_attacks.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def plan_cells(suite: SuiteConfig, out: Path, ctx: SuiteContext) -> list[tuple[Cell, str]]:
    """Every cell of the suite with its definition hash, in run order (seed, pair, method)."""
    unknown = sorted({m.runner_name for m in suite.methods if runner_for(m.runner_name) is None})
    if unknown:
        raise ConfigError(f"suite '{suite.name}': unknown method runner(s) {unknown}",
                          f"choose among {', '.join(runner_names())} (set 'runner:' for a renamed method)")
    if suite.prompt_attacks is not None and not any(attacked_runner(m.runner_name) for m in suite.methods):
        raise ConfigError(f"suite '{suite.name}': prompt_attacks, but no method to attack",
                          "add a CLIP prompt method (ip-clip, ntl-prompt) to the methods, or remove prompt_attacks "
                          "(zero-shot and the CoOp reference are not attacked)")
    emb = suite.embedding_map
    if emb is None:
        emb = next((m.name for m in suite.methods if runner_for(m.runner_name)[1] and m.runner_name != "zero-shot"), None)
    cells = []
    first_pair = suite.pair_list()[0]
    for seed in suite.seeds:
        for a, u in suite.pair_list():
            for m in suite.methods:
                key = cell_key(m.name, a, u, seed)
                cell = Cell(method=m.name, runner=m.runner_name, config=dict(m.config), authorized=a, unauthorized=u,
                            seed=seed, out=out / "cells" / key, ctx=ctx, key=key,
                            embedding_map=(m.name == emb and (a, u) == first_pair and seed == suite.seeds[0]),
                            attack_hash=prompt_attack_hash(suite, m))
                cells.append((cell, cell_hash(suite, m)))
    return cells


# ============================================================================ built-in cell runners


def _eval_domains(cell: Cell) -> dict:
    doms = cell.ctx.domains
    return {name: doms[name] for name in cell.ctx.suite.domain_list()}


def _n_embed(cell: Cell) -> int:
    return cell.ctx.suite.embedding_points


def _size(cell: Cell, doms: dict) -> int | None:
    """Images read from files need a common size to be batched; in-memory ones keep theirs."""
    return None if all(d.test.in_memory for d in doms.values()) else int(cell.ctx.adapter.image_size)


@register_cell("zero-shot", clip=True)
def zero_shot_cell(cell: Cell) -> dict:
    """Zero-shot CLIP: nothing trained; before = after (the unprotected reference)."""
    from ipshield.protect.base import accuracy_by_domain
    from ipshield.protect.zeroshot import ZeroShotClassifier, ZeroShotConfig

    cfg = cell.method_config(ZeroShotConfig)
    doms = _eval_domains(cell)
    classes = doms[cell.authorized].classes
    acc = accuracy_by_domain(ZeroShotClassifier(cell.ctx.adapter, classes, cfg.templates), doms, batch_size=cfg.batch_size,
                              size=_size(cell, doms))
    return {"method": "zero-shot", "authorized": cell.authorized, "unauthorized": [cell.unauthorized], "n_classes": len(classes),
            "accuracy": {"before": acc, "after": acc}, "reference": "zero-shot",
            "summary": _summary(acc, acc, cell.authorized, [cell.unauthorized], len(classes))}


def _summary(before, after, auth, unauth, n_classes):
    from ipshield.metrics import summarize_restriction

    return summarize_restriction(before, after, auth, n_classes, unauth)


@register_cell("coop", clip=True)
def coop_cell(cell: Cell) -> dict:
    """CoOp trained on the authorized domain (unprotected); before = zero-shot."""
    from ipshield.protect.base import accuracy_by_domain
    from ipshield.protect.zeroshot import ZeroShotClassifier

    doms = _eval_domains(cell)
    classes = doms[cell.authorized].classes
    zs = ZeroShotClassifier(cell.ctx.adapter, classes)
    model = cell.ctx.coop(cell.authorized, cell.seed)
    before = accuracy_by_domain(zs, doms, size=_size(cell, doms))
    after = accuracy_by_domain(model, doms, size=_size(cell, doms))
    metrics = {"method": "coop", "authorized": cell.authorized, "unauthorized": [cell.unauthorized], "n_classes": len(classes),
               "accuracy": {"before": before, "after": after}, "reference": "zero-shot",
               "summary": _summary(before, after, cell.authorized, [cell.unauthorized], len(classes))}
    if cell.embedding_map:
        metrics["embedding_map"] = save_embedding_map(cell, zs, model, "zero-shot", "coop")
    return metrics


def method_cell(cell: Cell) -> dict:
    """Any registered CLIP method (ip-clip, ntl-prompt, ...) through ``jobs.protect``, with the
    suite's cached CoOp as the reference; the cell's pair is summarised."""
    from ipshield import jobs
    from ipshield.registry import METHODS

    spec = METHODS.get(cell.runner)
    doms = _eval_domains(cell)
    cfg = cell.method_config(spec.config)
    coop = cell.ctx.coop(cell.authorized, cell.seed)
    scenario = spec.check_scenario(getattr(cfg, "scenario", None))
    options: dict[str, Any] = {"coop": coop}
    metrics = jobs.protect(spec.name, domains=doms, authorized=cell.authorized,
                           unauthorized=[cell.unauthorized] if scenario == "target-specified" else [],
                           out=cell.out, model=cell.ctx.adapter, config=cfg, options=options, overwrite=True,
                           verbose=cell.ctx.verbose)
    if scenario == "target-specified":  # summarise exactly this cell's pair
        metrics["unauthorized"] = [cell.unauthorized]
    for k in ("timing", "selection"):
        metrics.pop(k, None)
    if cell.embedding_map and "trained_model" in options:
        metrics["embedding_map"] = save_embedding_map(cell, coop, options["trained_model"], "coop", spec.name)
    if cell.attack_hash is not None:
        metrics.update(prompt_attack_metrics(cell, options.get("trained_model")))
    return metrics


# ============================================================================ the prompt attacks of a cell

#: the keys of a cell's JSON that the prompt attacks write
PROMPT_ATTACK_KEYS = ("attacks", "prompt_robust", "prompt_attacks_hash", "prompt_attacks_seconds")


def _saved_prompt(cell: Cell):
    """The trained prompt of a finished method cell, reloaded from its run folder (None when missing)."""
    from ipshield.errors import IPShieldError
    from ipshield.protect.ipclip_run import load_run

    try:
        return load_run(cell.out, cell.ctx.adapter)
    except IPShieldError:
        return None


def prompt_attack_metrics(cell: Cell, model=None) -> dict:
    """The suite's prompt attacks on ``model`` (the cell's trained prompt; None: reloaded from the
    cell folder) through :func:`ipshield.attacks.robust.prompt_robust`, with the suite's CoOp on the
    authorized domain as the unprotected reference (its grid and the zero-shot / from-scratch
    references are computed once per pair and seed, under shared/prompt-refs/). Returns the cell
    keys: ``attacks`` (the grid figures, as ``_attack_dict`` gives for the classifier cells),
    ``prompt_robust`` (the rows and labels of the robust tables), ``prompt_attacks_hash``."""
    import time

    from ipshield.attacks.robust import prompt_robust
    from ipshield.protect.ipclip import SwitchableIPCLIP

    t0 = time.time()
    pa = cell.ctx.suite.prompt_attacks
    out: dict[str, Any] = {"prompt_attacks_hash": cell.attack_hash}
    if model is None:
        model = _saved_prompt(cell)
    if model is None or isinstance(model, SwitchableIPCLIP):
        why = ("no trained prompt to attack (the method gave none and its run folder holds none)" if model is None else
               "a switchable IP-CLIP (authorization on demand) is restricted by its deployment gate alone, which a "
               "thief holding the weights drops: the prompt attacks do not apply")
        out["prompt_robust"] = {"skipped": why}
        return out
    doms = cell.ctx.domains
    cached = cell.ctx.prompt_references(cell.authorized, cell.unauthorized, cell.seed)
    r = prompt_robust(model, doms[cell.unauthorized], attacks=list(pa.attacks), ks=list(pa.ks),
                      authorized=doms[cell.authorized],
                      reference=cell.ctx.coop(cell.authorized, cell.seed),
                      options=pa.options, seed=cell.seed, n_test=pa.n_test, method=cell.method,
                      unprotected=cached["unprotected"] if cached else None, refs=cached["refs"] if cached else None)
    if not cached or cached.get("unprotected") is None:
        cell.ctx.save_prompt_references(cell.authorized, cell.unauthorized, cell.seed, r["unprotected"], r["refs"])
    grid, unprot, refs = r["grid"], r["unprotected"], r["refs"]
    att: dict[str, Any] = {"acc_u_source": unprot.get("acc_before") if unprot else None,
                           "acc_u_protected": grid.get("acc_before")}
    att.update({k: v for k, v in grid.items() if k != "acc_before"})
    if "prompt-finetune" in pa.attacks:
        # [ours] the "fine-tune k" column of the cost-to-break tables: prompt-finetune, the
        # finetune-direct-all of a prompt model (re-learn everything the protection learned)
        for k in pa.ks:
            att[f"finetune_k{k}"] = grid.get(f"prompt-finetune_k{k}")
    att.update(refs)
    for k in pa.ks:
        if att.get(f"finetune_k{k}") is not None and refs.get(f"scratch_k{k}") is not None:
            att[f"margin_k{k}"] = att[f"finetune_k{k}"] - refs[f"scratch_k{k}"]
    out["attacks"] = att
    out["prompt_robust"] = {"rows": r["rows"], "labels": r["labels"], "unprotected": unprot, "refs": refs}
    out["prompt_attacks_seconds"] = round(time.time() - t0, 1)
    return out


def update_prompt_attacks(cell: Cell, done: dict) -> dict | None:
    """A finished cell (its ``cell_hash`` current) whose prompt attacks are not those of the suite:
    its attack keys removed (the suite has none for it) or recomputed on its saved trained prompt
    (no retraining). None when the trained prompt cannot be reloaded (then the cell is recomputed)."""
    res = {k: v for k, v in done.items() if k not in PROMPT_ATTACK_KEYS}
    if cell.attack_hash is None:
        return res
    model = _saved_prompt(cell)
    if model is None:
        return None
    from ipshield.utils import seed_everything

    seed_everything(cell.seed)
    res.update(prompt_attack_metrics(cell, model))
    return res


def _digits_cell(cell: Cell) -> dict:
    bench = cell.ctx.digits_bench(cell.seed)
    row = bench.protect_cell(cell.method, cell.authorized, cell.unauthorized)
    key = Path(row["model_dir"]).name
    full = json.loads((bench.out / "cells" / f"{key}.json").read_text())
    full.pop("history", None)
    before, after = full["accuracy"]["before"], full["accuracy"]["after"]
    n = int(full.get("n_classes") or 10)
    metrics = {**full, "authorized": cell.authorized, "unauthorized": [cell.unauthorized],
               "summary": _summary(before, after, cell.authorized, [cell.unauthorized], n), "reference": "source",
               "model_dir": str((bench.out / row["model_dir"]).relative_to(cell.ctx.out))}
    if row.get("sparsity") is not None:
        metrics["sparsity_pct"] = row["sparsity"]
    if bench.cfg.attacks:
        a = bench.attack_cell(cell.method, cell.authorized, cell.unauthorized, row["model_dir"], row["acc_u_before"], row["acc_u_after"])
        metrics["attacks"] = _attack_dict(a, bench)
    return metrics


def _attack_dict(a: dict, bench) -> dict:
    # every attack's figure (the classic cost to break, and with the robust suite each attack, its
    # from-scratch reference and margin); the row's identity is the cell's own
    out = {k: v for k, v in a.items() if k not in ("method", "authorized", "unauthorized", "seconds", "seed", "cell")}
    out["attack_steps"] = bench.cfg.attack_steps
    out["shot_steps"] = bench.cfg.shot_steps
    return out


@register_cell("source")
def source_cell(cell: Cell) -> dict:
    """The unprotected source classifier of the digits bench (before = after), with the attacks on it
    (the reference of the cost-to-break curves)."""
    from ipshield.protect.restrict import evaluate

    bench = cell.ctx.digits_bench(cell.seed)
    model = bench.source(cell.authorized)
    doms = bench.domains
    acc = evaluate(model, {d: doms[d] for d in (cell.authorized, cell.unauthorized)}, bench.cfg.n_test, bench.cfg.seed, 32)
    n = len(doms[cell.authorized].classes)
    metrics = {"method": "source", "authorized": cell.authorized, "unauthorized": [cell.unauthorized], "n_classes": n,
               "accuracy": {"before": acc, "after": acc}, "reference": "source",
               "summary": _summary(acc, acc, cell.authorized, [cell.unauthorized], n)}
    if bench.cfg.attacks:
        u = acc[cell.unauthorized]
        a = bench.attack_cell("source (unprotected)", cell.authorized, cell.unauthorized, None, u, u)
        metrics["attacks"] = _attack_dict(a, bench)
    return metrics


def save_embedding_map(cell: Cell, before_model, after_model, before_name: str, after_name: str) -> dict:
    """Compute the 2-D PCA of authorized vs unauthorized test images before and after protection,
    save ``embedding.npz`` in the cell folder; returns its description (stored in the cell JSON)."""
    import numpy as np

    from ipshield.protect.training import subsample

    doms = cell.ctx.domains
    n = _n_embed(cell)
    xs, dom_idx, labels = [], [], []
    for i, name in enumerate((cell.authorized, cell.unauthorized)):
        split = subsample(doms[name].test, n, cell.seed)
        xs.append(split.to_tensor(None if split.in_memory else int(cell.ctx.adapter.image_size)))
        dom_idx += [i] * len(split)
        labels += list(np.asarray(split.labels))
    import torch

    images = torch.cat(xs)
    before = pca_2d(embedding_profiles(before_model, images))
    after = pca_2d(embedding_profiles(after_model, images))
    path = cell.out / "embedding.npz"
    np.savez_compressed(path, before=before, after=after, domain=np.asarray(dom_idx, dtype=np.int8),
                        label=np.asarray(labels, dtype=np.int16))
    return {"file": str(path.relative_to(cell.ctx.out)), "domains": [cell.authorized, cell.unauthorized],
            "before_name": before_name, "after_name": after_name, "representation": "normalised class-logit profile, 2-D PCA"}
