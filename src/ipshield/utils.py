"""Small shared helpers: seeding, devices, versions, progress bars."""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path
from typing import Iterable, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir() -> Path:
    """Where reusable artifacts (the pretrained small CLIP, generated data) live."""
    root = os.environ.get("IPSHIELD_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "ipshield"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ["ipshield", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "pydantic"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def progress(it: Iterable[T], desc: str = "", total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on long work; silent when IPSHIELD_QUIET=1 or disabled."""
    if not enabled or os.environ.get("IPSHIELD_QUIET") == "1":
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
