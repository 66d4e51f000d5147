"""Validated configs: one pydantic class per method, extra keys rejected, loadable from YAML with
``key=value`` overrides (dotted keys for nested fields), the same names in the CLI and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ipshield.errors import ConfigError

C = TypeVar("C", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Base of every method config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def build(cls: type[C], data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> C:
        data = dict(data or {})
        for item in overrides or []:
            _apply_override(data, item)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc), _fix_hint(cls)) from None

    @classmethod
    def from_yaml(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
        return cls.build(read_yaml(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file as a mapping ({} for None); a clear ConfigError when missing or malformed."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", "give the path of a YAML file")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}", "fix the YAML syntax") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values", "write key: value lines")
    return loaded


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' has no '='", "write overrides as key=value, e.g. epochs=5")
    key, raw = item.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a nested section", "check the key path")
    node[parts[-1]] = value


def _describe(cls: type[BaseModel], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}' for {cls.__name__}")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(lines)


def _fix_hint(cls: type[BaseModel]) -> str:
    return f"valid keys for {cls.__name__}: {', '.join(cls.model_fields)}"
