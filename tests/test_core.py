"""Config validation, run folders, registries and the CLI's handling of user mistakes."""

import json
import subprocess
import sys

import pytest
import torch

from ipshield.config import BaseConfig
from ipshield.errors import ConfigError, IPShieldError
from ipshield.registry import Registry
from ipshield.runs import RunDir, load_tensors


class DemoConfig(BaseConfig):
    epochs: int = 3
    lr: float = 0.01
    name: str = "x"


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        DemoConfig.build({"epochs": 2, "lerning_rate": 0.1})
    assert "lerning_rate" in str(e.value) and "lr" in e.value.fix
    with pytest.raises(ConfigError):
        DemoConfig.build({"epochs": "many"})
    cfg = DemoConfig.build({"epochs": 2}, ["lr=0.5", "name=abc"])
    assert cfg.epochs == 2 and cfg.lr == 0.5 and cfg.name == "abc"
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\n")
    assert DemoConfig.from_yaml(p, ["lr=1e-3"]).lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError):
        DemoConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError):
        DemoConfig.build({}, ["noequals"])


def test_run_folder(tmp_path):
    run = RunDir(tmp_path / "r", "test", DemoConfig(), seed=3)
    run.save_metrics({"accuracy": {"after": {"a": 90.0}}, "st_d": float("nan")})
    run.save_tensors("w.safetensors", {"w": torch.ones(2, 2)})
    run.finish()
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["seed"] == 3 and info["status"] == "done" and "torch" in info["versions"]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["st_d"] is None
    assert (tmp_path / "r" / "config.yaml").read_text().startswith("epochs: 3")
    assert torch.equal(load_tensors(tmp_path / "r" / "w.safetensors")["w"], torch.ones(2, 2))
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(IPShieldError):
        load_tensors(tmp_path / "bad.safetensors")


def test_registry():
    from ipshield.registry import ClassifierSpec

    reg: Registry = Registry("thing", ClassifierSpec)
    reg.register("a-b", description="an int")(int)
    spec = reg.get("A_B")
    assert spec.obj is int and spec.name == "a-b" and spec.module == "builtins" and spec.description == "an int"
    with pytest.raises(IPShieldError) as e:
        reg.get("zzz")
    assert "a-b" in e.value.fix
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a-b")(float)
    with pytest.raises(TypeError, match="no field"):
        reg.register("c", nonsense=1)
    reg.unregister("a-b")
    assert "a-b" not in reg


def test_cli_user_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ipshield.cli", "data", "preview", "--source", "folder", "--root", str(tmp_path / "nope"),
         "--out", str(tmp_path / "g.png")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_names_resolve():
    from ipshield import api

    for name in api.__all__:
        assert callable(getattr(api, name)), name


