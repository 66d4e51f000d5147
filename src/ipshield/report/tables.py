"""Accuracy tables for the terminal (rich) and markdown."""

from __future__ import annotations

from typing import Mapping

from rich.console import Console
from rich.table import Table


def accuracy_table(acc: Mapping[str, Mapping[str, float]], authorized: str | None = None, title: str = "") -> Table:
    models = list(acc)
    domains = list(next(iter(acc.values())))
    t = Table(title=title or None)
    t.add_column("domain")
    for m in models:
        t.add_column(m, justify="right")
    for d in domains:
        name = f"{d} (authorized)" if d == authorized else d
        t.add_row(name, *[f"{acc[m].get(d, float('nan')):.1f}" for m in models])
    return t


def print_accuracy_table(acc, authorized=None, title="") -> None:
    Console().print(accuracy_table(acc, authorized, title))


def markdown_accuracy_table(acc: Mapping[str, Mapping[str, float]], authorized: str | None = None) -> str:
    models = list(acc)
    domains = list(next(iter(acc.values())))
    lines = ["| domain | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for d in domains:
        name = f"{d} (authorized)" if d == authorized else d
        lines.append(f"| {name} | " + " | ".join(f"{acc[m].get(d, float('nan')):.1f}" for m in models) + " |")
    return "\n".join(lines) + "\n"
