"""One folder per run: resolved config, seed, package versions, metrics.json, artifacts, plots.

Layout of a run folder (documented in the README)::

    run.json        what ran: command/method, seed, package versions, start and end time, status
    config.yaml     the resolved, validated config
    metrics.json    the numbers (accuracies in percent keyed by domain name, ...)
    *.safetensors   learned artifacts (never pickle)
    *.png           plots
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ipshield.errors import CheckpointError, IPShieldError
from ipshield.utils import package_versions


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; undefined metrics are written as null
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # atomic: an interrupted write never leaves a half file


class RunDir:
    """A run folder. Creating one writes ``run.json``; ``finish`` marks it complete."""

    def __init__(self, path: str | Path, kind: str, config: Any = None, seed: int | None = None, resume: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise IPShieldError(f"--out {self.path} is a file, not a folder", "give a folder path for the run")
        self.path.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        info_path = self.path / "run.json"
        self.info: dict[str, Any] = {}
        if resume and info_path.exists():
            try:
                self.info = json.loads(info_path.read_text())
            except json.JSONDecodeError:
                self.info = {}
        self.info.update(
            {
                "kind": kind,
                "seed": seed,
                "versions": package_versions(),
                "started": self.info.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
                "status": "running",
            }
        )
        write_json(info_path, self.info)
        if config is not None:
            self.save_config(config)

    def save_config(self, config: Any) -> None:
        import yaml

        data = config.to_dict() if hasattr(config, "to_dict") else _jsonable(config)
        (self.path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def save_metrics(self, metrics: dict[str, Any], name: str = "metrics.json") -> Path:
        p = self.path / name
        write_json(p, metrics)
        return p

    def load_metrics(self, name: str = "metrics.json") -> dict[str, Any] | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.exists() else None

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        p = self.path / name
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(p), metadata=metadata)
        return p

    def file(self, name: str) -> Path:
        return self.path / name

    def finish(self, **extra: Any) -> None:
        self.info.update(extra)
        self.info["status"] = "done"
        self.info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(self.path / "run.json", self.info)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist", "give the path of a .safetensors file written by ipshield")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{p} is not a readable safetensors file ({exc})", "re-create it with ipshield") from None
