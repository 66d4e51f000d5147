"""Running a suite: every cell once, finished cells reused, then the tables."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ipshield.bench.harness.cells import (PROMPT_ATTACK_KEYS, Cell, SuiteContext, plan_cells, runner_for,
                                          update_prompt_attacks)
from ipshield.bench.harness.suite import SuiteConfig, resolve_suite
from ipshield.bench.harness.tables import _f, _mean, write_prompt_robust, write_tables
from ipshield.errors import IPShieldError
from ipshield.runs import write_json

# ============================================================================ running


@dataclass
class SuiteResult:
    out: Path
    cells: list[dict]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    #: reused cells whose prompt attacks alone were (re)computed or removed (``prompt_attacks`` changed)
    attacked: list[str] = field(default_factory=list)
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
            if done is not None and done.get("cell_hash") == digest and done.get("prompt_attacks_hash") != cell.attack_hash:
                # the suite's prompt attacks changed: only they run again, on the saved trained prompt
                try:
                    updated = update_prompt_attacks(cell, done)
                except (IPShieldError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001
                    if not keep_going:
                        raise
                    (out / "cells" / f"{cell.key}.error.txt").write_text(traceback.format_exc())
                    result.failed[cell.key] = f"prompt attacks: {type(exc).__name__}: {exc}"
                    log(f"[red]{cell.key}: the prompt attacks failed[/red]: {type(exc).__name__}: {exc} "
                        f"(see cells/{cell.key}.error.txt)")
                    updated = None
                    done = {k: v for k, v in done.items() if k not in PROMPT_ATTACK_KEYS}  # retried by the next run
                if updated is not None:
                    write_json(path, updated)
                    (out / "cells" / f"{cell.key}.error.txt").unlink(missing_ok=True)
                    done = updated
                    result.attacked.append(cell.key)
                    if cell.attack_hash is not None:
                        log(f"{cell.key}: prompt attacks ({done.get('prompt_attacks_seconds', 0):.0f}s)")
                elif cell.key not in result.failed:
                    log(f"{cell.key}: its trained prompt is gone; recomputing the cell")
                    done = None
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
    write_prompt_robust(out, result.cells, cfg)
    result.seconds = round(time.time() - t0, 1)
    if on_finished is not None:
        result.report = on_finished(out)
    run.save_metrics({"suite": cfg.name, "cells": len(cells), "computed": result.computed, "reused": len(result.reused),
                      "attacked": result.attacked,
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
