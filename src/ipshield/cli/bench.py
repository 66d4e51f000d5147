"""``ipshield bench ...``: benchmarks on real data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import app
from ipshield.cli.common import ConfigOpt, SetOpt

bench_app = typer.Typer(help="Benchmarks that compare the protections on real data.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("digits")
def bench_digits(
    out: Path = typer.Option(..., "--out", help="benchmark folder (rerun the same command to resume)"),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="authorized:unauthorized pairs, comma-separated "
                                                              "(default: all 6 ordered pairs of mnist, usps, mnistm)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated: sa-map, sf-map, df-map, ntl, cuti "
                                                                  "(the default) and ntl-tf (target-free NTL)"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    smoke: bool = typer.Option(False, "--smoke", help="tiny sizes and one pair: checks the pipeline in about a minute"),
    no_attacks: bool = typer.Option(False, "--no-attacks", help="skip the cost-to-break attacks"),
    ownership: bool = typer.Option(False, "--ownership", help="add the ownership table: each method against the grid "
                                                              "watermark on its own source domain"),
    root: Optional[Path] = typer.Option(None, "--root", help="folder of mnist.npz, usps.npz, mnistm.npz (else $IPSHIELD_DIGITS)"),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """MAP (SA/SF/DF), NTL and CUTI-domain on every digits pair, with the cost-to-break table."""
    from ipshield.bench.digits import DigitsBenchConfig, parse_pairs, run_digits_bench
    from ipshield.cli.common import split_names

    kw: dict = {}
    p = parse_pairs(pairs)
    if p is not None:
        kw["pairs"] = p
    m = split_names(methods)
    if m is not None:
        kw["methods"] = m
    if seed is not None:
        kw["seed"] = seed
    if no_attacks:
        kw["attacks"] = False
    if ownership:
        kw["ownership"] = True
    if config is not None:
        base = DigitsBenchConfig.from_yaml(config, overrides).to_dict()
        cfg = DigitsBenchConfig.build({**base, **kw})
    elif smoke:
        cfg = DigitsBenchConfig.smoke(**kw)
        cfg = DigitsBenchConfig.build(cfg.to_dict(), overrides)
    else:
        cfg = DigitsBenchConfig.build(kw, overrides)
    result = run_digits_bench(out, cfg, root=root, log=typer.echo)
    typer.echo(f"{len(result['computed'])} cells computed now ({result['seconds']:.0f}s); tables: "
               f"{out / 'results.md'}, {out / 'attacks.md'}" + (f", {out / 'ownership.md'}" if result["ownership"] else ""))
    try:  # the HTML report of ipshield.report.html (the harness's; a failure there never fails the benchmark)
        from ipshield.report.html import write_report

        typer.echo(f"report: {write_report(out)}")
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"(no HTML report: {exc}; `ipshield report {out}` retries)")
