"""A benchmark suite run with its HTML report: ``ipshield bench run SUITE`` and ``api.run_suite``.

The harness (``ipshield.bench.harness.run_suite``) runs the cells and writes the tables; it sits
below the report layer and takes the report writer as its ``on_finished`` hook. This wrapper
passes ``ipshield.report.html.write_report`` there, so the report is written at the same point of
the run as before (after the tables, before ``run.json`` is finished).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ipshield.bench.harness import SuiteConfig, SuiteResult, run_suite


def run_suite_with_report(suite: str | Path | SuiteConfig, out: str | Path, overrides: list[str] | None = None,
                          log: Callable[[str], None] | None = None, show_progress: bool = True, verbose: bool = False,
                          report: bool = True, watermark_run: str | Path | None = None,
                          keep_going: bool = True) -> SuiteResult:
    """Run (or resume) ``suite`` into the folder ``out`` (see ``ipshield.bench.harness.run_suite``)
    and, with ``report``, write ``out/report.html`` (with the ``watermark_run`` folder's p-value
    curves if given); ``SuiteResult.report`` is its path."""
    on_finished = None
    if report:
        def on_finished(folder: Path) -> Path:
            from ipshield.report.html import write_report

            return write_report(folder, watermark_run=watermark_run)

    return run_suite(suite, out, overrides, log=log, show_progress=show_progress, verbose=verbose,
                     keep_going=keep_going, on_finished=on_finished)


__all__ = ["run_suite_with_report"]
