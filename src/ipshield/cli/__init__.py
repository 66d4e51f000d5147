"""The ``ipshield`` command line. Each area adds its commands in its own module of this package;
the names match the Python API (``ipshield.api``).

Exit statuses, never a traceback unless ``IPSHIELD_DEBUG`` is set:

- 0 done; 1 a command's own failure (``typer.Exit(1)``), aborted input, or an internal error
  (one line; ``IPSHIELD_DEBUG=1`` shows the traceback);
- 2 a user's mistake: an ``IPShieldError`` (one message with the fix) or a usage error of the
  command line (missing or unknown option, bad value);
- 130 interrupted (Ctrl-C / SIGINT, or SIGTERM while a run is guarded).

The command line runs on typer, whose parser is click: the ``click`` package for typer < 0.29,
typer's own copy (``typer._click``) since; :func:`main` recognises the exceptions of both.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import typer
from typer.core import TyperGroup

_INTERRUPT_HINT = "the run folder keeps what finished; run the same command again to resume"


class _Interrupted(Exception):
    """A ``KeyboardInterrupt`` (or ``runs.Interrupted``) of a running command, carried past the
    CLI framework, which would otherwise turn it into ``Abort`` (click) or a silent exit code 130
    (typer >= 0.29) when ``standalone_mode`` is off."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


class _Group(TyperGroup):
    """The top-level group: marks an interrupt of the invoked command (see :class:`_Interrupted`)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted(exc) from exc


app = typer.Typer(
    name="ipshield",
    help="IP protection for vision-language models: domain restriction, embedding watermarks, attacks, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_Group,
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

# The modules that add commands (they import ``app`` and the sub-apps above, hence last).
from ipshield.cli import data, models, protect, demo, watermark, serve, bench, ipclip, report, attack  # noqa: E402,F401,I001
from ipshield.cli import monitor  # noqa: E402,F401,I001  (`ipshield monitor run|report`)


def _framework_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException classes, Abort classes, Exit classes) of every click the CLI may run on:
    the ``click`` package and typer's vendored ``typer._click`` (whichever are importable)."""
    errors: set[type] = set()
    aborts: set[type] = {typer.Abort}
    exits: set[type] = {typer.Exit}
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, bucket in (("ClickException", errors), ("Abort", aborts), ("Exit", exits)):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type):
                bucket.add(cls)
    return tuple(errors), tuple(aborts), tuple(exits)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _interrupted(detail: BaseException | None = None, *, process_exit: bool = True) -> None:
    if process_exit:  # the process ends: a second Ctrl-C while it does must not print a traceback
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass
    what = "Ctrl-C"
    if detail is not None and type(detail) is not KeyboardInterrupt and detail.args:
        what = _one_line(detail.args[0])  # runs.Interrupted("SIGTERM")
    typer.secho(f"interrupted: stopped by {what}; {_INTERRUPT_HINT}", err=True)
    sys.exit(130)


def _caused_by_interrupt(exc: BaseException) -> BaseException | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def main(argv: list[str] | None = None) -> None:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``). Returns when the command
    succeeds; otherwise exits with the statuses of the module docstring."""
    from ipshield.errors import IPShieldError

    entry = argv is None  # the console script: the process ends with this call
    click_errors, aborts, exits = _framework_exceptions()
    try:
        from ipshield.cli.protect import sync_commands

        sync_commands()  # a method registered after the CLI was imported gets its command too
        rv = app(args=argv, standalone_mode=False, prog_name="ipshield")
    except _Interrupted as exc:
        _interrupted(exc.original, process_exit=entry)
    except KeyboardInterrupt as exc:  # outside the command (argument parsing, set-up)
        _interrupted(exc, process_exit=entry)
    except IPShieldError as exc:
        typer.secho(f"error: {exc.problem}", fg=typer.colors.RED, err=True)
        if exc.fix:
            typer.secho(f"  fix: {exc.fix}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
    except click_errors as exc:  # usage errors (missing/unknown option, bad value), exit code 2
        exc.show()
        sys.exit(exc.exit_code)
    except aborts as exc:
        interrupt = _caused_by_interrupt(exc)
        if interrupt is not None:
            _interrupted(interrupt, process_exit=entry)
        typer.secho("aborted", err=True)
        sys.exit(1)
    except exits as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("IPSHIELD_DEBUG"):
            raise
        typer.secho(f"internal error: {type(exc).__name__}: {_one_line(exc)[:500]}", fg=typer.colors.RED, err=True)
        typer.secho("run with IPSHIELD_DEBUG=1 for the traceback", err=True)
        sys.exit(1)
    # Without standalone mode the framework returns the exit code of ``typer.Exit(code)`` (and of
    # an interrupt outside the command in typer >= 0.29) instead of exiting.
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        if rv == 130:
            _interrupted(process_exit=entry)
        sys.exit(rv)


if __name__ == "__main__":
    main()
