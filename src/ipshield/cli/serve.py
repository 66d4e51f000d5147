"""`ipshield serve` (the embedding service) and `ipshield keys create|list|revoke|report`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, keys_app

DbOpt = typer.Option("sqlite:///ipshield.db", "--db", help="database URL: sqlite:///FILE.db (default) or postgresql+psycopg://USER@HOST/DB")


# ServeSettings field -> (the option of `serve` that sets it, how to fix a bad value)
_SERVE_OPTIONS = {
    "model": ("--model", "give a CLIP checkpoint folder, stub, or stub:DIM (e.g. --model stub:64)"),
    "db": ("--db", "give --db sqlite:///FILE.db or postgresql+psycopg://USER@HOST/DB"),
    "device": ("--device", "use --device auto, cpu, cuda or cuda:N"),
    "key_file": ("--key-file", "give the master key file (ipshield watermark keygen)"),
    "watermark_dir": ("--watermark-dir", "give a watermark folder (ipshield watermark apply)"),
    "max_batch": ("--max-batch", "give the items allowed per request, a whole number of at least 1, e.g. --max-batch 64"),
    "default_rate": ("--rate", "give the default requests per second per key, a finite number > 0, e.g. --rate 20"),
    "default_quota": ("--quota", "give the default embeddings per key, a whole number from 0 to 9223372036854775807 "
                                 "(2^63 - 1), or leave --quota out (unlimited)"),
    "torch_threads": ("--threads", "give torch threads, a whole number of at least 1, or leave --threads out"),
    "body_timeout_s": ("--body-timeout", "give the seconds a client may take to send its request body, a finite "
                                         "number > 0, e.g. --body-timeout 30"),
    "max_request_pixels": ("--max-request-pixels", "give the pixels (width x height, summed over the images) allowed "
                                                   "in one request, a whole number of at least 1"),
}


def _settings(**values):
    """ServeSettings from the options; a bad value is an IPShieldError naming its option."""
    from pydantic import ValidationError

    from ipshield.errors import IPShieldError
    from ipshield.serve.settings import ServeSettings

    try:
        return ServeSettings(**values)
    except ValidationError as exc:
        problems, fixes = [], []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            option, fix = _SERVE_OPTIONS.get(field, (field.replace("_", "-") or "an option", None))
            msg = str(err.get("msg", "is not valid"))
            msg = msg.removeprefix("Value error, ")
            if msg.startswith("Input should"):
                problems.append(f"{option} should{msg[len('Input should'):]} (got {err.get('input')!r})")
            else:
                problems.append(f"{option}: {msg}")
            if fix and fix not in fixes:
                fixes.append(fix)
        raise IPShieldError("; ".join(problems), "; ".join(fixes) or "see `ipshield serve --help`") from None


def _check_model_sources(settings) -> None:
    """The model folder and the watermark's files exist (checked before anything is loaded)."""
    from ipshield.errors import IPShieldError

    model = settings.model
    if not (model == "stub" or model.startswith("stub:")) and not Path(model).is_dir():
        raise IPShieldError(f"--model {model}: the model folder does not exist",
                            "pass --model with a CLIP folder (e.g. from `ipshield pretrain`), or --model stub")
    if settings.watermark:
        if not settings.key_file:
            raise IPShieldError("the watermark is on but no master key was given",
                                "pass --key-file master_key.json (from `ipshield watermark keygen`), or --no-watermark")
        if not Path(settings.key_file).is_file():
            raise IPShieldError(f"--key-file {settings.key_file} does not exist",
                                "give the master key file (from `ipshield watermark keygen`), or --no-watermark")
        if settings.watermark_dir and not Path(settings.watermark_dir).is_dir():
            raise IPShieldError(f"--watermark-dir {settings.watermark_dir} does not exist",
                                "give a watermark folder (from `ipshield watermark apply`), or leave the option out")


@contextlib.contextmanager
def _writing(what: str):
    """A database error of a write (a read-only file, a server that refuses) as an IPShieldError
    that says so, without the SQL, its parameters or the URL."""
    from sqlalchemy.exc import DBAPIError

    from ipshield.errors import IPShieldError

    try:
        yield
    except DBAPIError as exc:
        text = str(getattr(exc, "orig", "") or "").lower()
        kind = type(getattr(exc, "orig", None) or exc).__name__
        if any(s in text for s in ("readonly", "read-only", "read only", "permission denied", "insufficient privilege")):
            raise IPShieldError(f"cannot {what}: the database is read-only (this user may not write it)",
                                "make the database writable (for SQLite: the file and its folder, e.g. chmod u+w), "
                                "or use a --db URL with write access; `ipshield keys list` works read-only") from None
        raise IPShieldError(f"cannot {what}: the database refused the write ({kind})",
                            "check the --db URL, that the database server is running and that this user may write it") from None


@app.command("serve")
def serve(
    model: str = typer.Option(..., "--model", help="CLIP checkpoint folder (or 'stub' / 'stub:DIM' for the model-free stand-in)"),
    db: str = DbOpt,
    create_db: bool = typer.Option(False, "--create-db", help="create the SQLite database when it is missing (it then has no keys: "
                                                               "every request gets 401 until `ipshield keys create`)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", help="TCP port, 1-65535"),
    workers: int = typer.Option(1, "--workers", help="server processes sharing the port (each loads the model)"),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="the owner's master key (ipshield watermark keygen)"),
    watermark_dir: Optional[Path] = typer.Option(None, "--watermark-dir", help="VLPMarker folder (ipshield watermark apply); default: the key's orthogonal matrices"),
    watermark: bool = typer.Option(True, "--watermark/--no-watermark", help="serve each customer's watermarked embeddings"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="micro-batch concurrent requests"),
    max_batch: int = typer.Option(64, "--max-batch", help="items per request (>= 1)"),
    max_request_pixels: Optional[int] = typer.Option(None, "--max-request-pixels", help="pixels (width x height) summed over the images of one request [default: 268435456 (256 Mi)]"),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="seconds a client may take to send its request body (> 0)"),
    rate: float = typer.Option(20.0, "--rate", help="default requests/s per key, > 0 (keys may override)"),
    quota: Optional[int] = typer.Option(None, "--quota", help="default embeddings per key, 0 to 2^63-1 (keys may override)"),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (>= 1)"),
    log_level: str = typer.Option("info", "--log-level", help="critical, error, warning, info, debug or trace"),
):
    """Serve image and text embeddings over HTTP (FastAPI + uvicorn; docs at /docs).

    The SQLite database must exist (`ipshield keys create --db URL` makes it) unless --create-db."""
    from ipshield.serve.server import check_database, check_run_options, serve_forever, setup_logging
    from ipshield.utils import resolve_device

    # every option is checked before a model is loaded or the database opened
    log_level = check_run_options(port, workers, log_level)
    values = dict(model=model, db=db, key_file=str(key_file) if key_file else None,
                  watermark_dir=str(watermark_dir) if watermark_dir else None, watermark=watermark, device=device,
                  batching=batching, max_batch=max_batch, default_rate=rate, default_quota=quota, torch_threads=threads,
                  body_timeout_s=body_timeout)
    if max_request_pixels is not None:
        values["max_request_pixels"] = max_request_pixels
    settings = _settings(**values)
    settings.device = str(resolve_device(settings.device))  # auto -> cpu/cuda; cuda without a GPU is an error
    _check_model_sources(settings)
    check_database(settings.db, create=create_db, write=True,
                   missing_fix=f"create it with the first key: `ipshield keys create --db {_shown(settings.db)} --customer NAME`, "
                               "or pass --create-db to start on an empty database")
    setup_logging(log_level)
    serve_forever(settings, host=host, port=port, log_level=log_level, workers=workers)


@keys_app.command("create")
def keys_create(
    customer: str = typer.Option(..., "--customer", help="customer id (its watermark is derived from the master key)"),
    db: str = DbOpt,
    rate: Optional[float] = typer.Option(None, "--rate", help="requests per second, > 0 (default: the server's)"),
    burst: Optional[float] = typer.Option(None, "--burst", help="token-bucket size, >= 1 (default 2 x rate)"),
    quota: Optional[int] = typer.Option(None, "--quota", help="embeddings allowed in total, 0 to 2^63-1 (default: the server's)"),
    admin: bool = typer.Option(False, "--admin", help="an owner key: opens /admin (the owner's page) and /metrics"),
):
    """Create an API key. The key is printed once and never stored (only its hash).
    Creates the SQLite database when it is missing."""
    from ipshield.serve.db import open_db
    from ipshield.serve.limits_check import validate_key_limits
    from ipshield.serve.server import check_database
    from ipshield.serve.store import KeyStore

    validate_key_limits(rate, burst, quota)
    check_database(db, create=True, write=True)
    with _writing("create the key"):
        raw, rec = KeyStore(open_db(db)).create(customer, rate=rate, burst=burst, quota=quota, admin=admin)
    typer.echo(f"key id:   {rec.key_id}")
    typer.echo(f"customer: {rec.customer}" + ("  (owner key: /admin, /metrics)" if admin else ""))
    typer.echo(f"api key:  {raw}")
    typer.echo("store the key now: it is shown only once (the database keeps its hash).", err=True)


@keys_app.command("list")
def keys_list(db: str = DbOpt, all_: bool = typer.Option(True, "--all/--active", help="include revoked keys")):
    """List keys (ids, customers, limits, usage; never the keys themselves)."""
    from rich.table import Table

    from ipshield.serve.db import open_db
    from ipshield.serve.store import KeyStore

    recs = KeyStore(open_db(db)).list(include_revoked=all_)
    t = Table(title=f"API keys ({len(recs)})")
    for c in ("key id", "customer", "status", "rate/s", "quota", "used", "created", "last used"):
        t.add_column(c)
    for r in recs:
        t.add_row(r.key_id, r.customer, "revoked" if r.revoked else "active", _fmt(r.rate, "default"),
                  _fmt(r.quota, "default"), str(r.used), _time(r.created_at), _time(r.last_used_at))
    _console().print(t)


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="key id (from `keys list`) or the key itself"), db: str = DbOpt):
    """Revoke a key: every later request with it gets 401."""
    from ipshield.serve.db import open_db
    from ipshield.serve.server import check_database
    from ipshield.serve.store import KeyStore

    check_database(db, create=False, write=True,
                   missing_fix="check the --db URL (the database is made by `ipshield keys create`)")
    with _writing("revoke the key"):
        rec = KeyStore(open_db(db)).revoke(key)
    typer.echo(f"revoked {rec.key_id} ({rec.customer})")


@keys_app.command("report")
def keys_report(
    db: str = DbOpt,
    hours: float = typer.Option(24.0, "--hours", help="report window"),
    volume: int = typer.Option(20000, "--volume-items", help="items in the window that count as high volume"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Usage per key and the extraction monitor's verdict (ok / watch / suspect)."""
    import json

    from rich.table import Table

    from ipshield.serve.db import open_db
    from ipshield.serve.monitor import MonitorConfig, report

    reps = report(open_db(db), MonitorConfig(window_s=hours * 3600.0, volume_items=volume))
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reps], indent=2))
        return
    t = Table(title=f"usage and extraction monitor, last {hours:g} h")
    for c in ("key id", "customer", "status", "requests", "items", "peak/win", "rejected", "unique", "spread", "eff.rank", "flags", "verdict"):
        t.add_column(c)
    colour = {"ok": "green", "watch": "yellow", "suspect": "bold red"}
    for r in reps:
        t.add_row(r.key_id, r.customer, "revoked" if r.revoked else "active", str(r.requests), str(r.items), str(r.peak),
                  str(r.rejected), _num(r.unique), _num(r.spread), _num(r.eff_rank), ",".join(r.flags) or "-",
                  f"[{colour[r.verdict]}]{r.verdict}[/]")
    _console().print(t)


def _console():
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _shown(url: str) -> str:
    """A database URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "URL"


def _fmt(v, default: str) -> str:
    return default if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _time(t) -> str:
    import datetime as dt

    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


try:  # `ipshield bench serve`, next to the other benchmarks
    from ipshield.cli.bench import bench_app
except ModuleNotFoundError:  # pragma: no cover
    bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")


@bench_app.command("serve")
def bench_serve_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="CLIP folder (default: the small CLIP), or stub[:DIM]"),
    requests: int = typer.Option(2000, "--requests", help="requests per configuration"),
    concurrency: int = typer.Option(32, "--concurrency"),
    kind: str = typer.Option("image", "--kind", help="image or text requests"),
    rounds: int = typer.Option(10, "--rounds", help="interleaved rounds over the configurations"),
    threads: int = typer.Option(1, "--threads", help="torch threads of each server"),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="master key (default: a fresh one)"),
    watermark_dir: Optional[Path] = typer.Option(None, "--watermark-dir", help="VLPMarker folder to serve"),
    out: Path = typer.Option(Path("runs/bench-serve"), "--out"),
    floor: bool = typer.Option(True, "--floor/--no-floor", help="also measure the bare-FastAPI floor (CPU ratios)"),
):
    """Load on loopback: watermark on/off x micro-batching on/off; throughput, p50/p99, 5xx; server CPU
    per request against the bare-FastAPI floor."""
    from ipshield.errors import IPShieldError
    from ipshield.serve.bench import print_result, run_bench

    if kind not in ("image", "text"):
        raise IPShieldError(f"unknown --kind {kind!r}", "use image or text")
    if model is None:
        from ipshield.models.tiny_clip import small_clip

        model = str(small_clip("default"))
    res = run_bench(model, requests=requests, concurrency=concurrency, kind=kind, rounds=rounds,
                    key_file=str(key_file) if key_file else None, watermark_dir=str(watermark_dir) if watermark_dir else None,
                    threads=threads, out=str(out), floor=floor)
    print_result(res)
    if res["total_5xx"]:
        raise typer.Exit(1)
