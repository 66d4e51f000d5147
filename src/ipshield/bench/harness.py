"""The benchmark harness: ``ipshield bench run SUITE`` (also ``ipshield bench SUITE``).

A *suite* (YAML, validated by :class:`SuiteConfig`; unknown keys are errors) names a data source,
authorized -> unauthorized domain pairs, methods with per-method config overrides, and seeds. The
harness runs every cell (method x pair x seed) once:

- each finished cell is written to ``cells/<key>.json`` the moment it finishes, so an interrupted
  run resumes where it stopped: a rerun of the same command loads finished cells instead of
  recomputing them. A cell whose definition changed (method config, data options, model) since it
  was computed is recomputed (its JSON holds a hash of that definition);
- methods are looked up in :data:`CELL_RUNNERS`, a registry of *cell runners*: functions
  ``runner(cell: Cell) -> dict`` returning metrics in the CONTRACTS ``metrics.json`` schema
  (``method, authorized, unauthorized, n_classes, accuracy{before, after}, summary, ...extra``);
- at the end (and on every rerun) it writes ``results.csv`` (one row per cell), ``summary.csv`` and
  ``results.md`` (per method: mean and std over seeds); ``report.html`` is written by the report
  layer through ``run_suite``'s ``on_finished`` hook (the CLI and ``api.run_suite`` pass it).

Built-in suites are YAML files in ``ipshield/configs/suites/`` (``embedded``, ``digits``,
``digits-clip``, ``smoke``); a path to any YAML file works the same way.

Output folder::

    suite.yaml, run.json     the resolved suite and what ran
    cells/<key>.json         one finished cell (metrics.json schema + cell, seed, seconds, hash)
    cells/<key>/             the cell's working folder (run folder, embedding.npz)
    shared/                  artifacts reused across cells (CoOp references, digits sources)
    results.csv, summary.csv, results.md, report.html

The classifier methods (MAP variants, NTL, CUTI-domain) run through
:class:`ipshield.bench.digits.DigitsBench` (its cell functions and its own cell cache under
``shared/digits-s<seed>/``), so ``ipshield bench digits`` and the ``digits`` suite compute the
same thing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import Field, field_validator, model_validator

from ipshield.config import BaseConfig
from ipshield.errors import ConfigError, IPShieldError
from ipshield.runs import write_json

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


# ============================================================================ the suite schema


class MethodEntry(BaseConfig):
    """One method of a suite. ``name`` labels it in the tables; ``runner`` (default: ``name``) is
    the cell runner; ``config`` overrides the method's own config (validated by that config)."""

    name: str
    runner: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def runner_name(self) -> str:
        return self.runner or self.name


class SuiteConfig(BaseConfig):
    """A benchmark suite (see docs/bench.md for every key)."""

    name: str
    description: str = ""
    #: data source of ``ipshield.data.sources.load_domains`` (synthetic, digits, folder)
    source: str = "synthetic"
    #: options of that source (n_train, n_test, seed, root, ...)
    data: dict[str, Any] = Field(default_factory=dict)
    #: every domain the CLIP methods are evaluated on (default: the domains of the pairs)
    domains: list[str] | None = None
    #: authorized -> unauthorized pairs: "a:b" strings or [a, b] lists; "all" = every ordered pair of ``domains``
    pairs: list[tuple[str, str]] | str
    methods: list[MethodEntry]
    seeds: list[int] = Field(default_factory=lambda: [0])
    #: CLIP folder for the CLIP methods; None = the cached small CLIP of ``clip_preset``
    model: str | None = None
    clip_preset: str = "default"
    device: str = "auto"
    #: options of ``DigitsBenchConfig`` for the classifier methods (n_train, steps, attacks, ks, ...)
    digits: dict[str, Any] = Field(default_factory=dict)
    #: the method whose first cell saves the embedding map (default: the first CLIP method that trains)
    embedding_map: str | None = None
    #: images per domain in the embedding map
    embedding_points: int = 150

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        if isinstance(v, dict):  # {name: {config...}} shorthand
            v = [{"name": k, **({"config": c} if c else {})} for k, c in v.items()]
        if isinstance(v, list):
            v = [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("digits")
    @classmethod
    def _digits(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("ownership"):
            raise ValueError("digits: ownership is not a cell of the suite harness; run `ipshield bench digits "
                             "--ownership --out DIR` for the ownership table")
        return v

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "all":
            return "all"
        if isinstance(v, list):
            out = []
            for item in v:
                if isinstance(item, str):
                    parts = [p.strip() for p in item.replace(">", ":").split(":")]
                    if len(parts) != 2 or not all(parts):
                        raise ValueError(f"pair {item!r} is not 'authorized:unauthorized'")
                    out.append(tuple(parts))
                else:
                    out.append(item)
            return out
        return v

    @model_validator(mode="after")
    def _check(self) -> "SuiteConfig":
        if not self.methods:
            raise ValueError("give at least one method")
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method names must be unique (repeated: {dup}); give variants their own name and a runner")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.pairs == "all":
            if not self.domains or len(self.domains) < 2:
                raise ValueError("pairs: all needs a list of at least two domains")
        else:
            if not self.pairs:
                raise ValueError("give at least one authorized:unauthorized pair")
            for a, u in self.pairs:
                if a == u:
                    raise ValueError(f"pair {a}:{u} names the same domain twice")
                if self.domains is not None and (a not in self.domains or u not in self.domains):
                    raise ValueError(f"pair {a}:{u} uses a domain missing from domains {self.domains}")
        if self.embedding_map is not None and self.embedding_map not in names:
            raise ValueError(f"embedding_map names '{self.embedding_map}', which is not a method of the suite")
        return self

    def pair_list(self) -> list[tuple[str, str]]:
        if self.pairs == "all":
            return [(a, b) for a in self.domains for b in self.domains if a != b]  # type: ignore[union-attr]
        return [tuple(p) for p in self.pairs]  # type: ignore[misc]

    def domain_list(self) -> list[str]:
        if self.domains:
            return list(self.domains)
        return list(dict.fromkeys(d for p in self.pair_list() for d in p))


SUITES_DIR = Path(__file__).resolve().parents[1] / "configs" / "suites"


def builtin_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def _register_builtin_suites() -> None:
    """Each built-in suite YAML is an entry of the ``SUITES`` registry (``ipshield bench run NAME``);
    a suite is data, so adding one is adding its YAML file."""
    import functools

    from ipshield.registry import SUITES, SuiteSpec

    for name, path in builtin_suites().items():
        if name not in SUITES._entries:
            SUITES.add(SuiteSpec(name=name, module=__name__, run=functools.partial(run_suite, path),
                                 description=f"suite {path.name} of the harness"))


def resolve_suite(suite: str | Path | SuiteConfig, overrides: list[str] | None = None) -> SuiteConfig:
    """A built-in suite name, a YAML path, or a ``SuiteConfig`` -> validated ``SuiteConfig``."""
    if isinstance(suite, SuiteConfig):
        return SuiteConfig.build(suite.to_dict(), overrides) if overrides else suite
    text = str(suite)
    builtin = builtin_suites()
    if text in builtin:
        return SuiteConfig.from_yaml(builtin[text], overrides)
    path = Path(text).expanduser()
    if path.is_file():
        return SuiteConfig.from_yaml(path, overrides)
    raise ConfigError(f"unknown suite '{text}': neither a built-in suite nor a YAML file",
                      f"built-in suites: {', '.join(builtin)}; or give the path of a suite YAML file (see docs/bench.md)")


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

    def digits_bench(self, seed: int):
        """The ``DigitsBench`` of this seed (sources, pseudo-source data and its cells are cached)."""
        if seed not in self._digits:
            from ipshield.bench.digits import DigitsBench, DigitsBenchConfig, classifier_methods

            ALL_METHODS = classifier_methods()

            opts = dict(self.suite.digits)
            root = opts.pop("root", None) or self.suite.data.get("root")
            methods = [m.runner_name for m in self.suite.methods if m.runner_name in ALL_METHODS]
            method_options = dict(opts.pop("method_options", {}))
            for m in self.suite.methods:
                if m.runner_name in ALL_METHODS and m.config:
                    method_options[m.runner_name] = {**method_options.get(m.runner_name, {}), **m.config}
            cfg = DigitsBenchConfig.build({**opts, "pairs": [list(p) for p in self.suite.pair_list()],
                                           "methods": methods or ["sa-map"], "seed": seed, "method_options": method_options})
            self._digits[seed] = DigitsBench(self.out / "shared" / f"digits-s{seed}", cfg, root=root, log=self.log)
        return self._digits[seed]


def cell_key(method: str, authorized: str, unauthorized: str, seed: int) -> str:
    return f"{_slug(method)}__{_slug(authorized)}__{_slug(unauthorized)}__s{seed}"


def cell_hash(suite: SuiteConfig, entry: MethodEntry) -> str:
    """What a cell's result depends on besides its pair and seed."""
    runner = entry.runner_name
    parts: dict[str, Any] = {"runner": runner, "config": entry.config, "source": suite.source, "data": suite.data}
    found = runner_for(runner)
    if found is not None and found[1]:
        parts.update(model=suite.model, preset=suite.clip_preset, domains=suite.domain_list())
        if runner not in ("zero-shot", "coop"):
            parts["coop"] = next((m.config for m in suite.methods if m.runner_name == "coop"), {})
    else:
        parts["digits"] = suite.digits
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan_cells(suite: SuiteConfig, out: Path, ctx: SuiteContext) -> list[tuple[Cell, str]]:
    """Every cell of the suite with its definition hash, in run order (seed, pair, method)."""
    unknown = sorted({m.runner_name for m in suite.methods if runner_for(m.runner_name) is None})
    if unknown:
        raise ConfigError(f"suite '{suite.name}': unknown method runner(s) {unknown}",
                          f"choose among {', '.join(runner_names())} (set 'runner:' for a renamed method)")
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
                            embedding_map=(m.name == emb and (a, u) == first_pair and seed == suite.seeds[0]))
                cells.append((cell, cell_hash(suite, m)))
    return cells


# ============================================================================ running


@dataclass
class SuiteResult:
    out: Path
    cells: list[dict]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    report: Path | None = None


def run_suite(suite: str | Path | SuiteConfig, out: str | Path, overrides: list[str] | None = None,
              log: Callable[[str], None] | None = None, show_progress: bool = True, verbose: bool = False,
              keep_going: bool = True, on_finished: Callable[[Path], Path | None] | None = None) -> SuiteResult:
    """Run (or resume) ``suite`` into the folder ``out``; returns what was computed and reused.

    ``keep_going``: a cell that fails with an unexpected error is logged (``cells/<key>.error.txt``)
    and skipped, the other cells still run; a user mistake (``IPShieldError``) stops the run.

    ``on_finished(out)`` is called once the tables are written (before ``run.json`` is finished);
    what it returns is ``SuiteResult.report``. The harness writes no HTML report itself: the
    report layer's ``run_suite_with_report`` passes its writer here.
    """
    from rich.console import Console

    from ipshield.runs import RunDir

    cfg = resolve_suite(suite, overrides)
    out = Path(out)
    console = Console(stderr=True, quiet=not show_progress and log is None)
    log = log or (lambda msg: console.print(msg, highlight=False))
    t0 = time.time()
    run = RunDir(out, kind="bench-suite", config=None, seed=cfg.seeds[0])
    (out / "suite.yaml").write_text(cfg.to_yaml())
    ctx = SuiteContext(cfg, out, log=log, verbose=verbose)
    cells = plan_cells(cfg, out, ctx)
    quiet_before = os.environ.get("IPSHIELD_QUIET")
    if not verbose:  # the methods' own tqdm bars would break the progress display
        os.environ["IPSHIELD_QUIET"] = "1"
    try:
        return _run_cells(cfg, out, ctx, cells, run, log, console, show_progress, on_finished, keep_going, t0)
    finally:
        if quiet_before is None:
            os.environ.pop("IPSHIELD_QUIET", None)
        else:
            os.environ["IPSHIELD_QUIET"] = quiet_before


def _run_cells(cfg, out, ctx, cells, run, log, console, show_progress, on_finished, keep_going, t0) -> SuiteResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    result = SuiteResult(out=out, cells=[])

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[cell]}"), console=console, disable=not show_progress, transient=False)
    with progress:
        task = progress.add_task(f"suite {cfg.name}", total=len(cells), cell="")
        for cell, digest in cells:
            path = out / "cells" / f"{cell.key}.json"
            progress.update(task, cell=cell.key)
            done = _load_cell(path)
            if done is not None and done.get("cell_hash") == digest:
                result.cells.append(done)
                result.reused.append(cell.key)
                progress.advance(task)
                continue
            if done is not None:
                log(f"{cell.key}: its definition changed since it was computed; recomputing")
            try:
                res = _compute(cell, digest)
            except IPShieldError:
                raise
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                if not keep_going:
                    raise
                cell.out.mkdir(parents=True, exist_ok=True)
                (out / "cells" / f"{cell.key}.error.txt").write_text(traceback.format_exc())
                result.failed[cell.key] = f"{type(exc).__name__}: {exc}"
                log(f"[red]{cell.key} failed[/red]: {type(exc).__name__}: {exc} (see cells/{cell.key}.error.txt)")
                progress.advance(task)
                continue
            write_json(path, res)
            (out / "cells" / f"{cell.key}.error.txt").unlink(missing_ok=True)
            result.cells.append(res)
            result.computed.append(cell.key)
            s = res.get("summary", {})
            log(f"{cell.key}: Acc_a {_f(s.get('acc_a_before'))} -> {_f(s.get('acc_a_after'))}, "
                f"Acc_u {_f(_mean(s.get('acc_u_before')))} -> {_f(s.get('acc_u_after_mean'))} ({res['seconds']:.0f}s)")
            progress.advance(task)
    write_tables(out, result.cells, cfg)
    result.seconds = round(time.time() - t0, 1)
    if on_finished is not None:
        result.report = on_finished(out)
    run.save_metrics({"suite": cfg.name, "cells": len(cells), "computed": result.computed, "reused": len(result.reused),
                      "failed": result.failed, "seconds_this_call": result.seconds}, "metrics.json")
    run.finish(seconds_this_call=result.seconds, failed=len(result.failed))
    return result


def _load_cell(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # write_json is atomic, but a hand-edited file may be broken
        return None


def _compute(cell: Cell, digest: str) -> dict:
    from ipshield.utils import seed_everything

    seed_everything(cell.seed)
    cell.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    metrics = runner_for(cell.runner)[0](cell)
    for k in ("method", "authorized", "unauthorized", "accuracy"):
        if k not in metrics:
            raise ValueError(f"cell runner '{cell.runner}' returned no '{k}' (metrics.json schema)")
    metrics.pop("history", None)
    res = dict(metrics)
    res.update({"cell": cell.key, "method": cell.method, "method_run": metrics.get("method"), "runner": cell.runner,
                "pair": [cell.authorized, cell.unauthorized], "seed": cell.seed, "config": cell.config,
                "cell_hash": digest, "seconds": round(time.time() - t0, 1)})
    return res


def _mean(v: Any) -> float | None:
    if isinstance(v, dict):
        vals = [x for x in v.values() if x is not None]
        return sum(vals) / len(vals) if vals else None
    return v


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


# ============================================================================ tables

#: (key, header, decimals, direction: True = higher is better, False = lower, None = neither)
ROW_METRICS: list[tuple[str, str, int, bool | None]] = [
    ("acc_a_before", "Acc_a before", 1, None),
    ("acc_a_after", "Acc_a after", 1, True),
    ("acc_u_before", "Acc_u before", 1, None),
    ("acc_u_after", "Acc_u after", 1, False),
    ("drop_a", "Drop_a", 1, False),
    ("drop_u", "Drop_u", 1, True),
    ("st_d", "ST-D", 3, False),
    ("gap", "Gap", 1, True),
    ("chance_normalised", "Acc_u/chance", 2, False),
    ("balanced_score", "Balanced", 3, True),
]


def metric_directions() -> dict[str, bool | None]:
    """Whether higher is better for each table column (True/False; None: neither), from
    ``ROW_METRICS`` and ``ipshield.metrics`` (each function's ``higher_is_better``)."""
    from ipshield import metrics as M

    d = {k: v for k, _h, _n, v in ROW_METRICS}
    d.update({"drop_a": M.drop_a.higher_is_better, "drop_u": M.drop_u.higher_is_better, "st_d": M.st_d.higher_is_better,
              "gap": M.gap.higher_is_better, "chance_normalised": M.chance_normalised.higher_is_better,
              "balanced_score": M.balanced_score.higher_is_better})
    d["acc_a_after"] = M.DIRECTIONS.get("acc_a_after", True)
    d["acc_u_after"] = M.DIRECTIONS.get("acc_u_after_mean", False)
    return d


def cell_row(cell: dict) -> dict:
    """One row of results.csv from a finished cell: the summary recomputed for this cell's pair."""
    from ipshield.metrics import summarize_restriction

    acc = cell["accuracy"]
    auth = cell["authorized"]
    unauth = cell["unauthorized"]
    if isinstance(unauth, str):
        unauth = [unauth]
    n_classes = int(cell.get("n_classes") or 10)
    s = summarize_restriction(acc["before"], acc["after"], auth, n_classes, list(unauth))
    pair = cell.get("pair") or [auth, ",".join(unauth)]
    row = {"method": cell["method"], "authorized": pair[0], "unauthorized": pair[1], "seed": cell.get("seed"),
           "acc_a_before": s["acc_a_before"], "acc_a_after": s["acc_a_after"],
           "acc_u_before": _mean(s.get("acc_u_before")), "acc_u_after": s.get("acc_u_after_mean"),
           "drop_a": s["drop_a"], "drop_u": s.get("drop_u_mean"), "st_d": s.get("st_d"), "gap": s.get("gap"),
           "chance_normalised": s.get("chance_normalised"), "balanced_score": s.get("balanced_score"),
           "reference": cell.get("reference", ""), "seconds": cell.get("seconds")}
    return row


def _std(vals: list[float]) -> float | None:
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def aggregate(rows: list[dict], by: Iterable[str] = ("method",)) -> list[dict]:
    """Mean and std over seeds of every metric, grouped by ``by``; the pairs inside a group are
    first averaged per seed (ST-D over the pairs where it is defined)."""
    by = tuple(by)
    groups: dict[tuple, dict[Any, list[dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), {}).setdefault(r.get("seed"), []).append(r)
    out = []
    for gkey, per_seed in groups.items():
        agg: dict[str, Any] = dict(zip(by, gkey))
        agg["seeds"] = len(per_seed)
        agg["pairs"] = len({(r["authorized"], r["unauthorized"]) for rs in per_seed.values() for r in rs})
        for key, *_ in ROW_METRICS:
            seed_means = []
            for rs in per_seed.values():
                vals = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
                if vals:
                    seed_means.append(sum(vals) / len(vals))
            agg[key] = sum(seed_means) / len(seed_means) if seed_means else None
            agg[key + "_std"] = _std(seed_means)
        out.append(agg)
    return out


def _pm(mean: Any, std: Any, nd: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{nd}f}" + (f" ± {std:.{nd}f}" if std is not None else "")


def _arrow(direction: bool | None) -> str:
    return " ↑" if direction is True else " ↓" if direction is False else ""


def markdown_tables(rows: list[dict], suite: SuiteConfig | None = None) -> str:
    dirs = metric_directions()
    head_cols = [f"{h}{_arrow(dirs.get(k))}" for k, h, _n, _d in ROW_METRICS]
    seeds = sorted({r.get("seed") for r in rows}, key=lambda s: (s is None, s))
    title = suite.name if suite else "benchmark"
    lines = [f"# Benchmark suite `{title}`", ""]
    if suite and suite.description:
        lines += [suite.description.strip(), ""]
    lines += [f"Seeds: {', '.join(str(s) for s in seeds)}. Accuracies in percent; Drop in points; mean ± std over seeds "
              "(std with n-1, shown when there are at least 2 seeds) of the per-seed mean over the pairs. "
              "↑ higher is better, ↓ lower is better. ST-D = Drop_a / Drop_u (MAP); Gap, Acc_u/chance and Balanced are "
              "ipshield's own balance metrics (docs/metrics.md), not a paper's. \"Before\" is each method's unprotected "
              "reference (zero-shot for CoOp, CoOp for IP-CLIP and NTL-prompt, the source model for MAP/NTL/CUTI).", "",
              "## Per method (mean over pairs)", "",
              "| method | pairs | " + " | ".join(head_cols) + " |", "|---|---:|" + "---:|" * len(ROW_METRICS)]
    for a in aggregate(rows, ("method",)):
        lines.append(f"| {a['method']} | {a['pairs']} | " + " | ".join(_pm(a[k], a[k + '_std'], n) for k, _h, n, _d in ROW_METRICS) + " |")
    lines += ["", "## Per method and pair", "", "| method | authorized | unauthorized | " + " | ".join(head_cols) + " |",
              "|---|---|---|" + "---:|" * len(ROW_METRICS)]
    for a in aggregate(rows, ("method", "authorized", "unauthorized")):
        lines.append(f"| {a['method']} | {a['authorized']} | {a['unauthorized']} | " +
                     " | ".join(_pm(a[k], a[k + '_std'], n) for k, _h, n, _d in ROW_METRICS) + " |")
    return "\n".join(lines) + "\n"


def attack_rows(cells: list[dict]) -> list[dict]:
    """Cost-to-break rows (one per cell that ran the attacks)."""
    out = []
    for c in cells:
        att = c.get("attacks")
        if not att:
            continue
        pair = c.get("pair") or [c["authorized"], c["unauthorized"]]
        out.append({"method": c["method"], "authorized": pair[0], "unauthorized": pair[1], "seed": c.get("seed"), **att})
    return out


def write_tables(out: Path, cells: list[dict], suite: SuiteConfig | None = None) -> list[dict]:
    import csv

    rows = [cell_row(c) for c in cells]
    cols = ["method", "authorized", "unauthorized", "seed", *[k for k, *_ in ROW_METRICS], "reference", "seconds"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
    agg = aggregate(rows, ("method",))
    scols = ["method", "seeds", "pairs"] + [x for k, *_ in ROW_METRICS for x in (k, k + "_std")]
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=scols, extrasaction="ignore")
        w.writeheader()
        for r in agg:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in scols})
    md = markdown_tables(rows, suite) if rows else f"# Benchmark suite `{suite.name if suite else ''}`\n\nNo finished cells yet.\n"
    att = attack_rows(cells)
    if att:
        ks = sorted({int(k.split("_k")[1]) for r in att for k in r if k.startswith("finetune_k")})
        md += ("\n## Cost to break (unauthorized accuracy recovered by each attack, %)\n\n"
               "| method | authorized | unauthorized | seed | Acc_u protected | " + " | ".join(f"fine-tune k={k}" for k in ks) +
               " | SHOT |\n|---|---|---|---:|---:|" + "---:|" * (len(ks) + 1) + "\n")
        for r in att:
            md += (f"| {r['method']} | {r['authorized']} | {r['unauthorized']} | {r.get('seed')} | {_f(r.get('acc_u_protected'))} | " +
                   " | ".join(_f(r.get(f"finetune_k{k}")) for k in ks) + f" | {_f(r.get('shot'))} |\n")
    (out / "results.md").write_text(md)
    return rows


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
    return metrics


def _digits_cell(cell: Cell) -> dict:
    bench = cell.ctx.digits_bench(cell.seed)
    row = bench.protect_cell(cell.runner, cell.authorized, cell.unauthorized)
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
        a = bench.attack_cell(cell.runner, cell.authorized, cell.unauthorized, row["model_dir"], row["acc_u_before"], row["acc_u_after"])
        metrics["attacks"] = _attack_dict(a, bench)
    return metrics


def _attack_dict(a: dict, bench) -> dict:
    out = {k: v for k, v in a.items() if k.startswith("finetune_k") or k in ("shot", "acc_u_source", "acc_u_protected")}
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


# ============================================================================ embedding map


def embedding_profiles(model, images) -> "Any":
    """[ours] The representation a prompt method changes: the image's L2-normalised class-similarity
    profile (its logits over the classes). The frozen image tower's features do not change under
    prompt learning, so the 'features after protection' are where the image lands relative to the
    protected class text features."""
    import torch

    with torch.no_grad():
        logits = torch.cat([model.predict_logits(images[i:i + 128]) for i in range(0, len(images), 128)]).float()
    return torch.nn.functional.normalize(logits, dim=-1).cpu().numpy()


def pca_2d(x) -> "Any":
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    _u, _s, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:2].T
    if y.shape[1] < 2:
        y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
    return y.astype(np.float32)


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


_register_builtin_suites()
