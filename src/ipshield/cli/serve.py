"""`ipshield serve` (the embedding service) and `ipshield keys create|list|revoke|report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, keys_app

DbOpt = typer.Option("sqlite:///ipshield.db", "--db", help="database URL: sqlite:///FILE.db (default) or postgresql+psycopg://USER@HOST/DB")


@app.command("serve")
def serve(
    model: str = typer.Option(..., "--model", help="CLIP checkpoint folder (or 'stub' for the model-free stand-in)"),
    db: str = DbOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port"),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="the owner's master key (ipshield watermark keygen)"),
    watermark_dir: Optional[Path] = typer.Option(None, "--watermark-dir", help="VLPMarker folder (ipshield watermark apply); default: the key's orthogonal matrices"),
    watermark: bool = typer.Option(True, "--watermark/--no-watermark", help="serve each customer's watermarked embeddings"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="micro-batch concurrent requests"),
    max_batch: int = typer.Option(64, "--max-batch", help="items per request"),
    rate: float = typer.Option(20.0, "--rate", help="default requests/s per key (keys may override)"),
    quota: Optional[int] = typer.Option(None, "--quota", help="default embeddings per key (keys may override)"),
    device: str = typer.Option("cpu", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads"),
    log_level: str = typer.Option("info", "--log-level"),
):
    """Serve image and text embeddings over HTTP (FastAPI + uvicorn; docs at /docs)."""
    import logging

    from ipshield.serve.server import serve_forever
    from ipshield.serve.settings import ServeSettings

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(
        model=model, db=db, key_file=str(key_file) if key_file else None,
        watermark_dir=str(watermark_dir) if watermark_dir else None, watermark=watermark, device=device,
        batching=batching, max_batch=max_batch, default_rate=rate, default_quota=quota, torch_threads=threads,
    )
    serve_forever(settings, host=host, port=port, log_level=log_level)


@keys_app.command("create")
def keys_create(
    customer: str = typer.Option(..., "--customer", help="customer id (its watermark is derived from the master key)"),
    db: str = DbOpt,
    rate: Optional[float] = typer.Option(None, "--rate", help="requests per second (default: the server's)"),
    burst: Optional[float] = typer.Option(None, "--burst", help="token-bucket size (default 2 x rate)"),
    quota: Optional[int] = typer.Option(None, "--quota", help="embeddings allowed in total (default: the server's)"),
):
    """Create an API key. The key is printed once and never stored (only its hash)."""
    from ipshield.serve.db import open_db
    from ipshield.serve.store import KeyStore

    raw, rec = KeyStore(open_db(db)).create(customer, rate=rate, burst=burst, quota=quota)
    typer.echo(f"key id:   {rec.key_id}")
    typer.echo(f"customer: {rec.customer}")
    typer.echo(f"api key:  {raw}")
    typer.echo("store the key now: it is shown only once (the database keeps its hash).", err=True)


@keys_app.command("list")
def keys_list(db: str = DbOpt, all_: bool = typer.Option(True, "--all/--active", help="include revoked keys")):
    """List keys (ids, customers, limits, usage; never the keys themselves)."""
    from rich.console import Console
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
    from ipshield.serve.store import KeyStore

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

    from rich.console import Console
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
):
    """Load on loopback: watermark on/off x micro-batching on/off; throughput, p50/p99, 5xx."""
    from ipshield.errors import IPShieldError
    from ipshield.serve.bench import print_result, run_bench

    if kind not in ("image", "text"):
        raise IPShieldError(f"unknown --kind {kind!r}", "use image or text")
    if model is None:
        from ipshield.models.tiny_clip import small_clip

        model = str(small_clip("default"))
    res = run_bench(model, requests=requests, concurrency=concurrency, kind=kind, rounds=rounds,
                    key_file=str(key_file) if key_file else None, watermark_dir=str(watermark_dir) if watermark_dir else None,
                    threads=threads, out=str(out))
    print_result(res)
    if res["total_5xx"]:
        raise typer.Exit(1)
