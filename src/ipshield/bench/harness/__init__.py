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
    shared/                  artifacts reused across cells (CoOp references, digits sources,
                             prompt-refs/: the references of the prompt attacks per pair and seed)
    results.csv, summary.csv, results.md, report.html
    prompt-robust/           with ``prompt_attacks``: robust.json/.md/.csv, robust-labels.csv (and
                             robust.html, the report layer's) of the prompt attacks on the CLIP methods

With ``prompt_attacks`` ([ours]) every trained CLIP prompt method cell (ip-clip, ntl-prompt, ...)
is attacked once trained (``ipshield.attacks.robust.prompt_robust``, the suite's CoOp as the
unprotected reference); the attack results live in the cell JSON under their own hash
(``prompt_attacks_hash``), so changing ``prompt_attacks`` re-runs only the attacks on the saved
prompt, and changes no cell hash.

The classifier methods (MAP variants, NTL, CUTI-domain) run through
:class:`ipshield.bench.digits.DigitsBench` (its cell functions and its own cell cache under
``shared/digits-s<seed>/``), so ``ipshield bench digits`` and the ``digits`` suite compute the
same thing.
"""

from __future__ import annotations

from ipshield.bench.harness.cells import (CELL_RUNNERS, CLIP_RUNNERS, PROMPT_ATTACK_KEYS, Cell, CellRunner, SuiteContext,
                                          _attack_dict, _digits_cell, _eval_domains, _n_embed, _size, _slug, _summary,
                                          attacked_runner, cell_hash, cell_key, coop_cell, method_cell, plan_cells,
                                          prompt_attack_hash, prompt_attack_metrics, register_cell, runner_for,
                                          runner_names, save_embedding_map, source_cell, update_prompt_attacks,
                                          zero_shot_cell)
from ipshield.bench.harness.embedding import embedding_profiles, pca_2d
from ipshield.bench.harness.run import SuiteResult, _compute, _load_cell, _run_cells, run_suite
from ipshield.bench.harness.suite import (SUITES_DIR, MethodEntry, PromptAttacksConfig, SuiteConfig, builtin_suites,
                                          resolve_suite)
from ipshield.bench.harness.tables import (PROMPT_ROBUST_DIR, ROW_METRICS, _arrow, _f, _mean, _pm, _std, aggregate,
                                           attack_rows, cell_row, markdown_tables, metric_directions,
                                           prompt_robust_results, write_prompt_robust, write_tables)


def _register_builtin_suites() -> None:
    """Each built-in suite YAML is an entry of the ``SUITES`` registry (``ipshield bench run NAME``);
    a suite is data, so adding one is adding its YAML file."""
    import functools

    from ipshield.registry import SUITES, SuiteSpec

    for name, path in builtin_suites().items():
        if name not in SUITES._entries:
            SUITES.add(SuiteSpec(name=name, module=__name__, run=functools.partial(run_suite, path),
                                 description=f"suite {path.name} of the harness"))


_register_builtin_suites()
