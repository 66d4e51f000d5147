"""Options and helpers shared by the CLI modules (same names as the Python API)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

def source_help(default: str) -> str:
    return f"data source: synthetic (the embedded default), digits, folder (default {default}); `ipshield data info` lists its domains"


SourceOpt = typer.Option("synthetic", "--source", help=source_help("synthetic"))
RootOpt = typer.Option(None, "--root", help="data root for digits (else $IPSHIELD_DIGITS) or image folders")
DomainsOpt = typer.Option(None, "--domains", help="comma-separated domain names (default: all of the source)")
ConfigOpt = typer.Option(None, "--config", help="YAML file with the method's config")
SetOpt = typer.Option(None, "--set", help="config override key=value (repeatable)")
ModelOpt = typer.Option(None, "--model", help="CLIP checkpoint folder (Hugging Face format); default: the small CLIP pretrained by ipshield")
ClassNamesOpt = typer.Option(
    None, "--class-names",
    help="rename the classes, e.g. 0=zero,1=one (FOLDER=NAME pairs) or a YAML / JSON file of such pairs: a CLIP reads "
         "class names as words, and the small CLIP's tokenizer reads no numerals (a folder dataset may also hold "
         "ROOT/class_names.yaml)")
TestFractionOpt = typer.Option(None, "--test-fraction",
                               help="folder source: share of each class held out for test, in [0, 1) (default 0.2)")


def split_names(names: Optional[str]) -> Optional[list[str]]:
    if not names:
        return None
    return [n.strip() for n in names.split(",") if n.strip()]


def load_source(source: str, root: Optional[Path], domains: Optional[str], extra: Optional[list[str]] = None,
                class_names: Optional[str] = None, test_fraction: Optional[float] = None) -> dict:
    """Load the domains ``domains`` of a source (default: every domain the source offers, e.g. every
    archive of a digits folder); ``extra`` names (authorized/unauthorized) are included.
    ``class_names``: a class-name map (``--class-names``), applied to any source;
    ``test_fraction``: the folder source's held-out share (``--test-fraction``)."""
    from ipshield.data.sources import load_domains, source_domains

    opts = {}
    if root is not None:
        opts["root"] = root
    names = split_names(domains)
    if names is None:
        names = source_domains(source, **opts) or None
    if names is not None and extra:
        offered = {n.lower() for n in names}
        names = list(names) + [e for e in extra if e.lower() not in offered]
    if test_fraction is not None:
        opts["test_fraction"] = test_fraction
    return load_domains(source, names, class_names=class_names, **opts)


def resolve_model(model: Optional[Path], device: str = "cpu"):
    """Load a CLIP adapter from a folder, or the (cached) small CLIP of ipshield."""
    from ipshield.models.clip import load_clip
    from ipshield.models.tiny_clip import small_clip

    path = Path(model) if model is not None else small_clip("default")
    return load_clip(path, device=device)


def match_domain(name: str, domains: dict) -> str:
    """Case-insensitive match of a domain name; a clear error lists the choices."""
    from ipshield.errors import IPShieldError

    for d in domains:
        if d.lower() == name.strip().lower():
            return d
    raise IPShieldError(f"unknown domain '{name}'", f"choose one of: {', '.join(domains)}")
