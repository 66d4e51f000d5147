"""``ipshield watermark keygen|apply``, ``ipshield attack extract``, ``ipshield verify`` and
``ipshield bench watermark`` (embedding-service watermarks: VLPMarker and EmbMarker)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app, attack_app, watermark_app
from ipshield.cli.common import SetOpt

KeyOpt = typer.Option(..., "--key", help="the owner's master key file (from `ipshield watermark keygen`)")
WatermarkOpt = typer.Option(..., "--watermark", help="the watermark folder written by `ipshield watermark apply`")
OverwriteOpt = typer.Option(False, "--overwrite", help="replace a finished run already in --out")


def _model_path(model: Optional[Path]) -> Path:
    if model is not None:
        return Path(model)
    from ipshield.models.tiny_clip import small_clip

    return small_clip("default")


@watermark_app.command("keygen")
def keygen_cmd(
    out: Path = typer.Option(..., "--out", help="key file to write (JSON, mode 600); keep it secret"),
    dim: Optional[int] = typer.Option(None, "--dim", help="embedding size of the service"),
    model: Optional[Path] = typer.Option(None, "--model", help="read the embedding size from this CLIP folder"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing key file"),
) -> None:
    """Create a random master key (per-customer transforms are derived from it)."""
    from ipshield.errors import IPShieldError
    from ipshield.watermark.keys import keygen

    if dim is None:
        if model is None:
            raise IPShieldError("the embedding size is needed", "pass --dim D or --model DIR")
        import json

        cfg = json.loads((Path(model) / "config.json").read_text())
        dim = int(cfg.get("projection_dim") or cfg["text_config"]["projection_dim"])
    path, key = keygen(out, dim, overwrite=force)
    typer.echo(f"wrote {path} (dim {key.dim}, key id {key.key_id}, mode 600)")


@watermark_app.command("apply")
def apply_cmd(
    out: Path = typer.Option(..., "--out", help="watermark folder to write (holds secrets: keep it private)"),
    key: Path = KeyOpt,
    model: Optional[Path] = typer.Option(None, "--model", help="the service's CLIP folder (default: the small CLIP)"),
    scheme: str = typer.Option("vlpmarker", "--scheme", help="a registered scheme: vlpmarker, embmarker, or "
                                                             "vlpmarker+embmarker (both layers; dotted --set keys)"),
    customers: str = typer.Option("customer-0", "--customers", help="comma-separated customer ids to report on"),
    n_reference: int = typer.Option(600, "--n-reference", help="reference sample of normal inputs (trigger selection)"),
    overrides: Optional[list[str]] = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished watermark in --out (the old one, "
                                                              "and the evidence it gives, is lost)"),
) -> None:
    """Fit the triggers and (VLPMarker) refine the customers' transforms; report utility."""
    from ipshield.cli.common import split_names
    from ipshield.jobs.watermark import apply_watermark

    m = apply_watermark(_model_path(model), key, out, scheme, split_names(customers) or ["customer-0"], overrides,
                        n_reference=n_reference, overwrite=overwrite)
    typer.echo(f"watermark written to {out}; max |zero-shot change| = {m.get('max_abs_zero_shot_change', float('nan')):.2f} points")


@watermark_app.command("calibrate")
def calibrate_cmd(
    innocent: list[Path] = typer.Option(..., "--innocent", help="an innocent model's CLIP folder (repeat; at least 5)"),
    key: Path = KeyOpt,
    watermark: Path = WatermarkOpt,
    out: Path = typer.Option(..., "--out", help="run folder for the calibration report"),
    customers: Optional[str] = typer.Option(None, "--customers", help="comma-separated ids (default: those of apply)"),
    clean_model: Optional[Path] = typer.Option(None, "--clean-model", help="the unwatermarked service model (default: from the watermark folder)"),
    max_queries: int = typer.Option(512, "--max-queries", help="verification query budget (use the one of verify)"),
    alpha: float = typer.Option(1e-6, "--alpha", help="p-value threshold of the decision"),
    dry_run: bool = typer.Option(False, "--dry-run", help="report only; do not write the calibration into the watermark folder"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Calibrate the verification decision on innocent models; `ipshield verify` then uses it."""
    from ipshield.cli.common import split_names
    from ipshield.jobs.watermark import run_calibrate

    m = run_calibrate(innocent, key, watermark, out, customers=split_names(customers), clean_model=clean_model,
                      max_queries=max_queries, alpha=alpha, write=not dry_run, overwrite=overwrite)
    cal = m["calibration"]
    typer.echo(f"{m['false_positives']} of {m['n_innocent']} innocent models flagged (leave-one-out); threshold "
               f"{cal['threshold']:.3g}; {'not written (dry run)' if dry_run else 'written to ' + str(watermark / 'watermark.json')}")


@attack_app.command("extract")
def extract_cmd(
    out: Path = typer.Option(..., "--out", help="run folder (the student goes to OUT/student)"),
    key: Path = KeyOpt,
    watermark: Path = WatermarkOpt,
    customer: str = typer.Option("customer-0", "--customer", help="the customer account the thief uses"),
    model: Optional[Path] = typer.Option(None, "--model", help="the service's CLIP folder (default: the small CLIP)"),
    n_queries: int = typer.Option(6000, "--n-queries", help="public image-caption pairs sent to the service (the budget)"),
    overrides: Optional[list[str]] = SetOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Model extraction (the wm-extract attack): train a student CLIP on the watermarked service's embeddings."""
    from ipshield.jobs.watermark import run_extract

    m = run_extract(_model_path(model), key, watermark, customer, out, n_queries, overrides, overwrite=overwrite)
    typer.echo(f"student written to {out / 'student'}; zero-shot {m['accuracy']['student']}")


@app.command("verify")
def verify_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="the suspect CLIP folder (or give --suspect-url)"),
    suspect_url: Optional[str] = typer.Option(None, "--suspect-url", help="the suspect's HTTP embedding API (black box), instead of --model"),
    suspect_key: Optional[str] = typer.Option(None, "--suspect-key", envvar="IPSHIELD_SUSPECT_KEY", help="API key for --suspect-url (or env IPSHIELD_SUSPECT_KEY)"),
    suspect_schema: str = typer.Option("ipshield", "--suspect-schema", help="API schema of --suspect-url: ipshield or openai (/v1/embeddings)"),
    key: Path = KeyOpt,
    watermark: Path = WatermarkOpt,
    out: Path = typer.Option(..., "--out", help="run folder for the report"),
    customer: Optional[str] = typer.Option(None, "--customer", help="verify this customer's watermark"),
    identify: bool = typer.Option(False, "--identify", help="find the leaking customer among --customers"),
    customers: Optional[str] = typer.Option(None, "--customers", help="comma-separated ids (default: those of apply)"),
    clean_model: Optional[Path] = typer.Option(None, "--clean-model", help="the unwatermarked service model (default: from the watermark folder)"),
    max_queries: int = typer.Option(512, "--max-queries", help="verification query budget"),
    alpha: float = typer.Option(1e-6, "--alpha", help="p-value threshold of the decision"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Is a suspect model a copy of the watermarked service? (trigger, distribution, covariance, permutation, Procrustes tests)."""
    from ipshield.cli.common import split_names
    from ipshield.jobs.watermark import run_verify

    if (model is None) == (suspect_url is None):
        from ipshield.errors import IPShieldError

        raise IPShieldError("give exactly one suspect", "pass --model DIR (a local model) or --suspect-url URL (an HTTP API)")
    suspect = model
    if suspect_url is not None:
        from ipshield.serve.client import HTTPSuspect

        suspect = HTTPSuspect(suspect_url, suspect_key, schema=suspect_schema, budget=max_queries)
    m = run_verify(suspect, key, watermark, out, customer=customer, identify=identify, customers=split_names(customers),
                   clean_model=clean_model, max_queries=max_queries, alpha=alpha, overwrite=overwrite)
    typer.echo(f"{m['verdict']} (p={m['p_value']:.3g}, customer={m['customer_id']}, queries={m['queries'].get('total')}); "
               f"report in {out}")


try:  # `ipshield bench watermark`, next to the other benchmarks
    from ipshield.cli.bench import bench_app
except ModuleNotFoundError:  # pragma: no cover
    bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")


@bench_app.command("watermark")
def bench_watermark_cmd(
    out: Path = typer.Option(..., "--out", help="benchmark folder (rerun the same command to resume)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the service's CLIP folder (default: the small CLIP)"),
    smoke: bool = typer.Option(False, "--smoke", help="tiny sizes: checks the pipeline quickly"),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """VLPMarker vs EmbMarker on the small CLIP: utility, extraction, innocents, attacks, identification."""
    from ipshield.bench.watermark import WatermarkBenchConfig, run_watermark_bench

    cfg = WatermarkBenchConfig.smoke() if smoke else WatermarkBenchConfig()
    cfg = WatermarkBenchConfig.build(cfg.to_dict(), overrides)
    res = run_watermark_bench(out, cfg, model=model, log=typer.echo)
    typer.echo(f"done in {res['seconds']:.0f}s; tables in {out / 'results.md'}")
