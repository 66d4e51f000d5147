"""One folder per run: resolved config, seed, package versions, metrics.json, artifacts, plots.

Layout of a run folder (documented in the README)::

    run.json        what ran: command/method, seed, package versions, start and end time, status
                    (running | done | failed | interrupted, with the reason when not done)
    config.yaml     the resolved, validated config
    metrics.json    the numbers (accuracies in percent keyed by domain name, ...)
    *.safetensors   learned artifacts (never pickle)
    *.png           plots
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

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
        self.info.pop("reason", None)
        self.info["status"] = "done"
        self.info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(self.path / "run.json", self.info)

    def mark(self, status: str, reason: str) -> None:
        """Record how an unfinished run ended: ``failed`` or ``interrupted``, with the reason."""
        self.info["status"] = status
        self.info["reason"] = reason
        self.info["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            write_json(self.path / "run.json", self.info)
        except OSError:  # a full disk or a removed folder: the run ends all the same
            pass


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM); SIGINT raises Python's own KeyboardInterrupt."""


def _config_data(config: Any) -> Any:
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else _jsonable(config)


def read_run_info(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "run.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def open_run(path: str | Path, kind: str, config: Any = None, seed: int | None = None,
             overwrite: bool = False) -> RunDir:
    """The run folder of a job, checked against what it already holds.

    - empty or new: a fresh run;
    - a finished run (status ``done``): refused unless ``overwrite`` (its metrics.json would no
      longer match a new config.yaml);
    - an unfinished run (running, failed, interrupted) of the same kind and config: started again
      in place (jobs keep no partial state, so the work is redone); with another kind or config:
      refused unless ``overwrite``.
    ``overwrite`` removes the old run.json, config.yaml and metrics.json first.
    """
    import yaml

    p = Path(path)
    info = read_run_info(p)
    if info and not overwrite:
        old_kind, status = info.get("kind"), info.get("status", "running")
        old_cfg = None
        if (p / "config.yaml").is_file():
            try:
                old_cfg = yaml.safe_load((p / "config.yaml").read_text())
            except yaml.YAMLError:
                old_cfg = "unreadable"
        same = old_kind == kind and (config is None or old_cfg == _config_data(config))
        if status == "done":
            raise IPShieldError(f"{p} already holds a finished '{old_kind}' run",
                                "choose another --out folder, or pass --overwrite to replace it")
        if not same:
            raise IPShieldError(f"{p} holds an unfinished '{old_kind}' run ({status}) with another "
                                f"{'kind' if old_kind != kind else 'configuration'}",
                                "run the same command again to redo it, choose another --out, or pass --overwrite")
    if overwrite:
        for name in ("run.json", "config.yaml", "metrics.json"):
            with contextlib.suppress(FileNotFoundError):
                (p / name).unlink()
    return RunDir(p, kind=kind, config=config, seed=seed, resume=not overwrite)


@contextlib.contextmanager
def run_guard(run: RunDir) -> Iterator[RunDir]:
    """Marks ``run`` ``interrupted`` (Ctrl-C, SIGTERM) or ``failed`` (any error, with its message)
    when the body does not finish, then lets the exception go on. SIGTERM is turned into
    :class:`Interrupted` while the body runs (main thread only)."""
    previous = None
    installed = False
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def _term(signum, frame):  # noqa: ARG001
            raise Interrupted("SIGTERM")

        signal.signal(signal.SIGTERM, _term)
        installed = True
    except ValueError:  # not the main thread
        pass
    try:
        yield run
    except Interrupted as exc:
        run.mark("interrupted", f"stopped by {exc.args[0] if exc.args else 'a signal'}")
        raise
    except KeyboardInterrupt:
        run.mark("interrupted", "stopped by Ctrl-C (SIGINT)")
        raise
    except BaseException as exc:
        problem = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
        run.mark("failed", str(problem)[:2000])
        raise
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def private_dir(path: str | Path) -> Path:
    """A folder only its owner can read (0700), whatever the umask."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, 0o700)
    return p


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist", "give the path of a .safetensors file written by ipshield")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{p} is not a readable safetensors file ({exc})", "re-create it with ipshield") from None
