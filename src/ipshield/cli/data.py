"""`ipshield data preview` and `ipshield data info`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipshield.cli import data_app
from ipshield.cli.common import ClassNamesOpt, TestFractionOpt

_SOURCE = typer.Option("synthetic", "--source", help="synthetic (embedded default), digits, or folder")
_ROOT = typer.Option(None, "--root", "--digits-root",
                     help="digits: folder of the .npz archives (else $IPSHIELD_DIGITS); folder: root/<domain>/<class>/<image>")
_DOMAINS = typer.Option(None, "--domains", help="comma-separated domain names (default: all of the source)")
_N_TRAIN = typer.Option(None, "--n-train", help="synthetic: train images per domain (default 2000); digits: subset size")
_N_TEST = typer.Option(None, "--n-test", help="synthetic: test images per domain (default 500); digits: subset size")
_SEED = typer.Option(0, "--seed", help="synthetic generation / folder split / sample choice seed")
_SIZE = typer.Option(None, "--size", help="image size of synthetic and digit images (default 32)")
_ON_CORRUPT = typer.Option("skip", "--on-corrupt", help="folder: skip (count) or fail on unreadable images")


def _load(source: str, root: Optional[Path], domains: Optional[str], n_train: Optional[int], n_test: Optional[int],
          seed: int, size: Optional[int], on_corrupt: str, test_fraction: Optional[float],
          class_names: Optional[str] = None) -> dict:
    from ipshield.data.sources import load_domains
    from ipshield.registry import DATASETS

    src = DATASETS.get(source)  # clear error for an unknown source
    del src
    key = source.strip().lower()
    if key == "synthetic":
        opts = dict(n_train=n_train, n_test=n_test, seed=seed, size=size)
    elif key == "digits":
        opts = dict(root=root, n_train=n_train, n_test=n_test, size=size)
    elif key == "folder":
        opts = dict(root=root, seed=seed, on_corrupt=on_corrupt, test_fraction=test_fraction)
    else:  # a source added by a plug-in: pass what was given
        opts = dict(root=root)
    return load_domains(source, domains, class_names=class_names, **opts)


@data_app.command("preview")
def preview(
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG file to write"),
    source: str = _SOURCE,
    root: Optional[Path] = _ROOT,
    domains: Optional[str] = _DOMAINS,
    per_domain: int = typer.Option(10, "--per-domain", help="samples per domain (one row per domain)"),
    n_train: Optional[int] = _N_TRAIN,
    n_test: Optional[int] = _N_TEST,
    seed: int = _SEED,
    size: Optional[int] = _SIZE,
    on_corrupt: str = _ON_CORRUPT,
    test_fraction: Optional[float] = TestFractionOpt,
    class_names: Optional[str] = ClassNamesOpt,
):
    """Write a PNG grid of sample images: one row per domain, each image titled with its class."""
    from ipshield.data.preview import preview_grid

    doms = _load(source, root, domains, n_train, n_test, seed, size, on_corrupt, test_fraction, class_names)
    path = preview_grid(doms, out, per_domain=per_domain, seed=seed)
    typer.echo(f"wrote {path} ({len(doms)} domains x {per_domain} samples)")


@data_app.command("info")
def info(
    source: str = _SOURCE,
    root: Optional[Path] = _ROOT,
    domains: Optional[str] = _DOMAINS,
    n_train: Optional[int] = _N_TRAIN,
    n_test: Optional[int] = _N_TEST,
    seed: int = _SEED,
    size: Optional[int] = _SIZE,
    on_corrupt: str = _ON_CORRUPT,
    test_fraction: Optional[float] = TestFractionOpt,
    class_names: Optional[str] = ClassNamesOpt,
):
    """A table of the source's domains: classes, split sizes, image size, skipped files."""
    from rich.console import Console
    from rich.table import Table

    doms = _load(source, root, domains, n_train, n_test, seed, size, on_corrupt, test_fraction, class_names)
    table = Table(title=f"data source: {source}")
    for col in ("domain", "classes", "train", "test", "image", "skipped", "about"):
        table.add_column(col, justify="right" if col in ("classes", "train", "test", "skipped") else "left")
    for name, d in doms.items():
        if d.train.in_memory and len(d.train):
            h, w = d.train.images.shape[1:3]  # type: ignore[union-attr]
            image = f"{h}x{w} RGB"
        else:
            image = "files"
        about = d.meta.get("description") or d.meta.get("path") or ""
        table.add_row(name, str(d.num_classes), str(len(d.train)), str(len(d.test)), image,
                      str(d.train.skipped + d.test.skipped), str(about))
    console = Console()
    console.print(table)
    first = next(iter(doms.values()))
    shown = ", ".join(first.classes[:20]) + (f", ... ({first.num_classes} in all)" if first.num_classes > 20 else "")
    console.print(f"classes: {shown}")
