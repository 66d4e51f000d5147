"""The ``ipshield`` command line. Each area adds its commands in its own module of this package;
the names match the Python API (``ipshield.api``).

A user's mistake (``IPShieldError``) prints one message with the fix and exits with status 2,
never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

app = typer.Typer(
    name="ipshield",
    help="IP protection for vision-language models: domain restriction, embedding watermarks, attacks, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
protect_app = typer.Typer(help="Protect a model (domain restriction) or train an unprotected reference.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect and preview datasets.", no_args_is_help=True)
watermark_app = typer.Typer(help="Watermark an embedding service (keys, apply).", no_args_is_help=True)
attack_app = typer.Typer(help="Attacks that try to break a protection or a watermark.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the embedding service.", no_args_is_help=True)
app.add_typer(protect_app, name="protect")
app.add_typer(data_app, name="data")
app.add_typer(watermark_app, name="watermark")
app.add_typer(attack_app, name="attack")
app.add_typer(keys_app, name="keys")

# Modules that add commands; a missing one (not written yet) is skipped.
_COMMAND_MODULES = ["data", "models", "protect", "demo", "watermark", "serve", "bench", "ipclip", "report"]
for _m in _COMMAND_MODULES:
    try:
        importlib.import_module(f"ipshield.cli.{_m}")
    except ModuleNotFoundError as exc:
        if exc.name != f"ipshield.cli.{_m}":
            raise


def main(argv: list[str] | None = None) -> None:
    from ipshield.errors import IPShieldError

    try:
        app(args=argv, standalone_mode=False)
    except IPShieldError as exc:
        typer.secho(f"error: {exc.problem}", fg=typer.colors.RED, err=True)
        if exc.fix:
            typer.secho(f"  fix: {exc.fix}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted: the run folder keeps what finished; run the same command again to resume", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if os.environ.get("IPSHIELD_DEBUG"):
            raise
        raise


if __name__ == "__main__":
    main()
