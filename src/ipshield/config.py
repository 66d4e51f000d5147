"""Validated configs: one pydantic class per method, extra keys rejected, loadable from YAML with
``key=value`` overrides (dotted keys for nested fields), the same names in the CLI and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ipshield.errors import ConfigError

C = TypeVar("C", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Base of every method config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    #: counts that must be at least 1 when set (a field of one of these names in any config)
    _POSITIVE_COUNTS = ("epochs", "steps", "batch_size", "n_ctx", "max_train", "n_train", "n_test", "image_size")
    #: rates that must be > 0 when set
    _POSITIVE_RATES = ("lr",)

    @model_validator(mode="after")
    def _check_ranges(self):
        for name in self._POSITIVE_COUNTS:
            v = getattr(self, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise ValueError(f"{name} must be at least 1 (got {v})")
        for name in self._POSITIVE_RATES:
            v = getattr(self, name, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not v > 0:
                raise ValueError(f"{name} must be greater than 0 (got {v})")
        return self

    @classmethod
    def build(cls: type[C], data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> C:
        data = dict(data or {})
        for item in overrides or []:
            _apply_override(data, item)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            if all(e["type"] == "extra_forbidden" for e in exc.errors()):
                raise ConfigError(_describe(cls, exc), _fix_hint(cls)) from None
            raise ConfigError(_describe(cls, exc), "give each value named above in its range (see the method's doc)") from None

    @classmethod
    def from_yaml(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
        return cls.build(read_yaml(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_config(cls: type[C], config: Any = None, overrides: list[str] | None = None,
                   defaults: Mapping[str, Any] | None = None, what: str = "", **extra: Any) -> C:
    """The validated config of class ``cls`` from what a caller gives: an instance is used as given
    (``extra`` values that are not None and ``overrides`` applied on top), a mapping (or None) is
    read as data over ``defaults``. ``extra`` keys the class has no field for are ignored (e.g. a
    seed for a config without one)."""
    extra = {k: v for k, v in extra.items() if v is not None and k in cls.model_fields}
    if config is not None and hasattr(config, "to_dict"):
        if not isinstance(config, cls):
            raise ConfigError(f"{type(config).__name__} is not the config of {what or cls.__name__}",
                              f"give a {cls.__name__}")
        if not extra and not overrides:
            return config
        return cls.build({**config.to_dict(), **extra}, list(overrides or []))
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"the config of {what or cls.__name__} must be a {cls.__name__} or a mapping "
                          f"(got {type(config).__name__})", "pass config={'key': value} or a config instance")
    return cls.build({**dict(defaults or {}), **dict(config or {}), **extra}, list(overrides or []))


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
        elif not err["loc"]:  # a check across the whole config: its message names the field
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration: " + "; ".join(lines)


def _fix_hint(cls: type[BaseModel]) -> str:
    return f"valid keys for {cls.__name__}: {', '.join(cls.model_fields)}"
