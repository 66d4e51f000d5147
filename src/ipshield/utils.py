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


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; ``cpu``; ``cuda`` (``cuda:N``), with
    a clear error on a machine without CUDA."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        from ipshield.errors import ConfigError

        raise ConfigError(f"unknown device '{device}'", "use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ipshield.errors import ConfigError

        raise ConfigError("device 'cuda' was asked for but this machine has no CUDA GPU",
                          "use --device cpu (or auto, which picks CUDA when there is one)")
    if dev.type not in ("cpu", "cuda"):
        from ipshield.errors import ConfigError

        raise ConfigError(f"device '{device}' is not supported", "use auto, cpu or cuda")
    return dev


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
    """A tqdm bar on long work; silent when IPSHIELD_QUIET=1 or disabled. When stderr is not a
    terminal (a log file, CI) the bar is written as whole lines, at most one every 30 s and at the
    end, instead of a stream of carriage returns."""
    if not enabled or os.environ.get("IPSHIELD_QUIET") == "1":
        return it
    import sys

    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return _LogLines(it, desc, total)


class _LogLines:
    """Progress as plain log lines: ``desc: 3/10 (30%) 12.3s`` every 30 s and once at the end."""

    def __init__(self, it: Iterable[T], desc: str, total: int | None, every_s: float = 30.0):
        self.it, self.desc, self.every_s = it, desc or "progress", every_s
        self.total = total if total is not None else (len(it) if hasattr(it, "__len__") else None)  # type: ignore[arg-type]
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = " " + ", ".join(f"{k}={v}" for k, v in values.items())

    def __len__(self) -> int:
        return int(self.total or 0)

    def __iter__(self):
        import sys
        import time

        t0 = last = time.perf_counter()
        n = 0
        for item in self.it:
            yield item
            n += 1
            now = time.perf_counter()
            if now - last >= self.every_s:
                last = now
                print(self._line(n, now - t0), file=sys.stderr, flush=True)
        print(self._line(n, time.perf_counter() - t0), file=sys.stderr, flush=True)

    def _line(self, n: int, seconds: float) -> str:
        of = f"/{self.total} ({100.0 * n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc}: {n}{of} {seconds:.1f}s{self.postfix}"
