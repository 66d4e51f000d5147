"""``ipshield monitor run|report``: watch suspect embedding APIs for the service's watermark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app

monitor_app = typer.Typer(help="Watch suspect embedding APIs for the service's watermark (run, report).", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")

_DB_HELP = "database URL (the service's, so the owner's page shows the checks): sqlite:///FILE.db or postgresql+psycopg://USER@HOST/DB"


@monitor_app.command("run")
def monitor_run(
    suspects: Path = typer.Option(..., "--suspects", help="YAML list of suspects: name, url, api_key_env (the NAME of "
                                                          "an environment variable holding the API key), max_queries"),
    db: str = typer.Option("sqlite:///ipshield.db", "--db", help=_DB_HELP),
    key_file: Path = typer.Option(..., "--key-file", help="the owner's master key file (from `ipshield watermark keygen`)"),
    watermark: Path = typer.Option(..., "--watermark", help="the watermark folder written by `ipshield watermark apply`"),
    clean_model: Optional[Path] = typer.Option(None, "--clean-model", help="the unwatermarked service model (default: from the watermark folder)"),
    customers: Optional[str] = typer.Option(None, "--customers", help="comma-separated ids to identify among (default: those of apply)"),
    every: float = typer.Option(3600.0, "--every", help="seconds between the starts of two rounds"),
    once: bool = typer.Option(False, "--once", help="one round, then exit"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="stop after this many rounds (default: run until stopped)"),
    max_queries: int = typer.Option(512, "--max-queries", help="query budget of one check, for suspects without max_queries"),
    alpha: float = typer.Option(1e-6, "--alpha", help="p-value threshold of the decision"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds to wait for one answer of a suspect"),
) -> None:
    """Verify every suspect API for the watermark, now and every --every seconds.

    Each check is stored in the database (verdict, p-values, queries, identified customer) and
    logged as one line; a suspect that fails is stored with the verdict "error" and the reason."""
    import datetime as dt
    import math

    from ipshield.cli.common import split_names
    from ipshield.errors import IPShieldError
    from ipshield.serve.db import open_db
    from ipshield.serve.server import check_database
    from ipshield.serve.suspects import Verifier, load_suspects, run_monitor, suspect_key

    if not (math.isfinite(every) and every > 0):
        raise IPShieldError(f"--every {every} is not a positive number of seconds", "give --every SECONDS, e.g. --every 3600")
    if max_queries < 1:
        raise IPShieldError(f"--max-queries {max_queries} is below 1", "give the query budget of one check, e.g. --max-queries 512")
    if rounds is not None and rounds < 1:
        raise IPShieldError(f"--rounds {rounds} is below 1", "give --rounds N with N >= 1, or leave it out")
    if not (math.isfinite(timeout) and timeout > 0):
        raise IPShieldError(f"--timeout {timeout} is not a positive number of seconds", "give --timeout SECONDS, e.g. --timeout 60")
    specs = load_suspects(suspects)  # the file and every key's variable, before anything slow
    for spec in specs:
        suspect_key(spec)
    check_database(db, create=True, write=True)
    verifier = Verifier.load(key_file, watermark, clean_model=clean_model, customers=split_names(customers),
                             alpha=alpha, max_queries=max_queries)
    engine = open_db(db)  # created (when missing) only once everything else is in order

    def line(text: str) -> None:
        typer.echo(f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {text}")

    n = 1 if once else rounds
    typer.echo(f"monitoring {len(specs)} suspect(s) against the {verifier.scheme} watermark"
               + ("" if n == 1 else f", every {every:g} s"), err=True)
    run_monitor(engine, specs, every, n, verifier=verifier, max_queries=max_queries, log_line=line, timeout_s=timeout)


@monitor_app.command("report")
def monitor_report(
    db: str = typer.Option("sqlite:///ipshield.db", "--db", help=_DB_HELP),
    suspect: Optional[str] = typer.Option(None, "--suspect", help="this suspect only (its name in the suspects file)"),
    limit: int = typer.Option(50, "--limit", help="at most this many checks, newest first"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """The history of the suspect checks, newest first."""
    import json
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ipshield.serve.db import open_db
    from ipshield.serve.server import check_database
    from ipshield.serve.suspects import history

    check_database(db, create=False, write=False,
                   missing_fix="check the --db URL (the checks are written by `ipshield monitor run --db URL`)")
    rows = history(open_db(db, create=False), suspect=suspect, limit=max(0, limit))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"suspect checks ({len(rows)}, newest first)")
    for c in ("when (local)", "suspect", "scheme", "verdict", "p trigger", "p distribution", "queries", "customer", "note"):
        t.add_column(c)
    colour = {"stolen": "bold red", "not-detected": "green", "inconclusive": "yellow", "error": "magenta"}
    for r in rows:
        v = r["verdict"]
        note = (r.get("detail") or "-") if v in ("error", "inconclusive") else "-"
        t.add_row(_when(r["checked_at"]), escape(r["suspect"]), escape(r["scheme"]),
                  f"[{colour[v]}]{escape(v)}[/]" if v in colour else escape(v), _p(r["p_trigger"]), _p(r["p_distribution"]),
                  str(r["queries"]), escape(r["customer"] or "-"), escape(note[:80]))
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def _p(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _when(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
