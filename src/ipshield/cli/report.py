"""``ipshield bench run SUITE`` (also ``ipshield bench SUITE``), ``ipshield bench suites`` and
``ipshield report RUN_FOLDER``: the benchmark harness and its HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from ipshield.cli import app
from ipshield.cli.bench import bench_app
from ipshield.cli.common import SetOpt


class _SuiteFallbackGroup(TyperGroup):
    """``ipshield bench NAME ...`` where NAME is not a bench command runs the suite NAME
    (``ipshield bench run NAME ...``): built-in suite names and YAML paths work directly."""

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().resolve_command(ctx, args)


# bench_app is the MAP developer's group (cli/bench.py); only its click class is set here
from typer.models import DefaultPlaceholder  # noqa: E402

if isinstance(bench_app.info.cls, DefaultPlaceholder) or bench_app.info.cls is None:
    bench_app.info.cls = _SuiteFallbackGroup

WatermarkRunOpt = typer.Option(None, "--watermark-run", help="an `ipshield bench watermark` folder: adds its p-value curves")


@bench_app.command("run")
def bench_run(
    suite: str = typer.Argument(..., help="a built-in suite (embedded, digits, digits-clip, smoke) or a suite YAML file"),
    out: Optional[Path] = typer.Option(None, "--out", help="benchmark folder (default runs/bench-<suite>); rerun to resume"),
    overrides: Optional[list[str]] = SetOpt,
    watermark_run: Optional[Path] = WatermarkRunOpt,
    no_report: bool = typer.Option(False, "--no-report", help="write the tables only"),
    verbose: bool = typer.Option(False, "--verbose", help="show the methods' own training bars"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress display"),
) -> None:
    """Run or resume a benchmark suite (methods x pairs x seeds); writes results.csv/.md and report.html."""
    from ipshield.bench.harness import resolve_suite
    from ipshield.report.suite import run_suite_with_report as run_suite

    cfg = resolve_suite(suite, overrides)
    out = out or Path("runs") / f"bench-{cfg.name}"
    res = run_suite(cfg, out, show_progress=not quiet, verbose=verbose, report=not no_report, watermark_run=watermark_run)
    attacked = f" ({len(res.attacked)} with their prompt attacks redone)" if res.attacked else ""
    robust = out / "prompt-robust" / "robust.md"
    typer.echo(f"{len(res.computed)} cells computed now, {len(res.reused)} reused{attacked} ({res.seconds:.0f}s); "
               f"tables: {out / 'results.md'}" + (f", {robust}" if robust.is_file() else "")
               + (f"; report: {res.report}" if res.report else ""))
    if res.failed:
        typer.secho(f"{len(res.failed)} cell(s) failed: {', '.join(res.failed)}; rerun the same command to retry them",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@bench_app.command("suites")
def bench_suites() -> None:
    """List the built-in suites."""
    import yaml

    from ipshield.bench.harness import builtin_suites

    for name, path in builtin_suites().items():
        d = yaml.safe_load(path.read_text()) or {}
        desc = " ".join(str(d.get("description", "")).split())
        typer.echo(f"{name:12s} {desc[:110]}")
        typer.echo(f"{'':12s} {path}")


@app.command("report")
def report_cmd(
    run: Path = typer.Argument(..., help="a folder of `ipshield bench run` or `ipshield bench digits`"),
    out: Optional[Path] = typer.Option(None, "--out", help="the HTML file (default RUN/report.html)"),
    watermark_run: Optional[Path] = WatermarkRunOpt,
) -> None:
    """Regenerate the self-contained HTML report of a benchmark from its saved results."""
    from ipshield.report.html import write_report

    path = write_report(run, out, watermark_run=watermark_run)
    typer.echo(f"report: {path}")
