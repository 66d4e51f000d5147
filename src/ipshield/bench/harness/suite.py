"""The suite schema: a suite YAML validated by :class:`SuiteConfig`, and the built-in suites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from ipshield.config import BaseConfig
from ipshield.errors import ConfigError


# ============================================================================ the suite schema


class MethodEntry(BaseConfig):
    """One method of a suite. ``name`` labels it in the tables; ``runner`` (default: ``name``) is
    the cell runner; ``config`` overrides the method's own config (validated by that config)."""

    name: str
    runner: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def runner_name(self) -> str:
        return self.runner or self.name


class PromptAttacksConfig(BaseConfig):
    """[ours] The prompt attacks of a suite (``ipshield.attacks.prompt``, through
    ``ipshield.attacks.robust.prompt_robust``): run on every trained CLIP prompt method cell (ip-clip,
    ntl-prompt, ...; not zero-shot nor the CoOp reference) with the suite's CoOp as the unprotected
    reference; written to ``prompt-robust/`` (robust.json/.md/.csv, robust-labels.csv)."""

    #: prompt attacks of the ATTACKS registry (target "prompt"); default: all of them
    attacks: list[str] = Field(default_factory=lambda: _prompt_attack_names())
    #: labelled unauthorized images of the k-attacks (a k above the domain's training images gives n/a)
    ks: list[int] = Field(default_factory=lambda: [10, 100])
    #: config overrides per attack, e.g. {prompt-finetune: {steps: 40}} (the from-scratch CoOp reference
    #: takes the step budget of the first k-attack)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: unauthorized test images evaluated per attack (class-balanced); None: the whole test split
    n_test: int | None = None

    @model_validator(mode="after")
    def _check_attacks(self) -> "PromptAttacksConfig":
        known = _prompt_attack_names()
        if not self.attacks:
            raise ValueError(f"give at least one attack (the prompt attacks: {', '.join(known)})")
        bad = [a for a in self.attacks if a not in known]
        if bad:
            raise ValueError(f"unknown prompt attack(s) {bad}; the prompt attacks are: {', '.join(known)}")
        dup = sorted({a for a in self.attacks if self.attacks.count(a) > 1})
        if dup:
            raise ValueError(f"attack(s) {dup} named twice")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of positive image counts (got {self.ks})")
        for name, opts in self.options.items():
            if name not in self.attacks:
                raise ValueError(f"options for '{name}', which is not among the attacks {self.attacks}")
            fixed = sorted(set(opts) & {"k", "seed", "n_test", "references"})
            if fixed:
                raise ValueError(f"options.{name} sets {fixed}, which the suite sets (ks, seeds, n_test; "
                                 "the references are computed once per pair)")
            from ipshield.registry import ATTACKS

            try:
                ATTACKS.get(name).make_config(dict(opts))
            except ConfigError as exc:
                raise ValueError(f"options.{name}: {exc.problem}") from None
        return self


def _prompt_attack_names() -> list[str]:
    from ipshield.attacks.robust import prompt_attacks

    return prompt_attacks()


class SuiteConfig(BaseConfig):
    """A benchmark suite (see docs/bench.md for every key)."""

    name: str
    description: str = ""
    #: data source of ``ipshield.data.sources.load_domains`` (synthetic, digits, folder)
    source: str = "synthetic"
    #: options of that source (n_train, n_test, seed, root, ...)
    data: dict[str, Any] = Field(default_factory=dict)
    #: every domain the CLIP methods are evaluated on (default: the domains of the pairs)
    domains: list[str] | None = None
    #: authorized -> unauthorized pairs: "a:b" strings or [a, b] lists; "all" = every ordered pair of ``domains``
    pairs: list[tuple[str, str]] | str
    methods: list[MethodEntry]
    seeds: list[int] = Field(default_factory=lambda: [0])
    #: CLIP folder for the CLIP methods; None = the cached small CLIP of ``clip_preset``
    model: str | None = None
    clip_preset: str = "default"
    device: str = "auto"
    #: options of ``DigitsBenchConfig`` for the classifier methods (n_train, steps, attacks, ks, ...)
    digits: dict[str, Any] = Field(default_factory=dict)
    #: the method whose first cell saves the embedding map (default: the first CLIP method that trains)
    embedding_map: str | None = None
    #: images per domain in the embedding map
    embedding_points: int = 150
    #: [ours] the prompt attacks on the trained CLIP prompt methods (None: none); see PromptAttacksConfig
    prompt_attacks: PromptAttacksConfig | None = None

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        if isinstance(v, dict):  # {name: {config...}} shorthand
            v = [{"name": k, **({"config": c} if c else {})} for k, c in v.items()]
        if isinstance(v, list):
            v = [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("prompt_attacks", mode="before")
    @classmethod
    def _prompt_attacks(cls, v: Any) -> Any:
        if v is True:  # shorthands: true = every prompt attack at the defaults, a list = those attacks
            return {}
        if v is False:
            return None
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if isinstance(v, list):
            return {"attacks": v}
        return v

    @field_validator("digits")
    @classmethod
    def _digits(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("ownership"):
            raise ValueError("digits: ownership is not a cell of the suite harness; run `ipshield bench digits "
                             "--ownership --out DIR` for the ownership table")
        return v

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "all":
            return "all"
        if isinstance(v, list):
            out = []
            for item in v:
                if isinstance(item, str):
                    parts = [p.strip() for p in item.replace(">", ":").split(":")]
                    if len(parts) != 2 or not all(parts):
                        raise ValueError(f"pair {item!r} is not 'authorized:unauthorized'")
                    out.append(tuple(parts))
                else:
                    out.append(item)
            return out
        return v

    @model_validator(mode="after")
    def _check(self) -> "SuiteConfig":
        if not self.methods:
            raise ValueError("give at least one method")
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method names must be unique (repeated: {dup}); give variants their own name and a runner")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.pairs == "all":
            if not self.domains or len(self.domains) < 2:
                raise ValueError("pairs: all needs a list of at least two domains")
        else:
            if not self.pairs:
                raise ValueError("give at least one authorized:unauthorized pair")
            for a, u in self.pairs:
                if a == u:
                    raise ValueError(f"pair {a}:{u} names the same domain twice")
                if self.domains is not None and (a not in self.domains or u not in self.domains):
                    raise ValueError(f"pair {a}:{u} uses a domain missing from domains {self.domains}")
        if self.embedding_map is not None and self.embedding_map not in names:
            raise ValueError(f"embedding_map names '{self.embedding_map}', which is not a method of the suite")
        return self

    def pair_list(self) -> list[tuple[str, str]]:
        if self.pairs == "all":
            return [(a, b) for a in self.domains for b in self.domains if a != b]  # type: ignore[union-attr]
        return [tuple(p) for p in self.pairs]  # type: ignore[misc]

    def domain_list(self) -> list[str]:
        if self.domains:
            return list(self.domains)
        return list(dict.fromkeys(d for p in self.pair_list() for d in p))



SUITES_DIR = Path(__file__).resolve().parents[2] / "configs" / "suites"


def builtin_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def resolve_suite(suite: str | Path | SuiteConfig, overrides: list[str] | None = None) -> SuiteConfig:
    """A built-in suite name, a YAML path, or a ``SuiteConfig`` -> validated ``SuiteConfig``."""
    if isinstance(suite, SuiteConfig):
        return SuiteConfig.build(suite.to_dict(), overrides) if overrides else suite
    text = str(suite)
    builtin = builtin_suites()
    if text in builtin:
        return SuiteConfig.from_yaml(builtin[text], overrides)
    path = Path(text).expanduser()
    if path.is_file():
        return SuiteConfig.from_yaml(path, overrides)
    raise ConfigError(f"unknown suite '{text}': neither a built-in suite nor a YAML file",
                      f"built-in suites: {', '.join(builtin)}; or give the path of a suite YAML file (see docs/bench.md)")
