"""One registry and one contract (a *spec*) per kind of plug-in.

Every plug-in is registered with one decorator, in the module that defines it::

    @METHODS.register("my-method", config=MyConfig, model="classifier",
                      data=("authorized", "unauthorized"), scenarios=("target-specified",))
    def run(job, config) -> dict: ...

The decorator builds the kind's spec (``MethodSpec``, ``SchemeSpec``, ``AttackSpec``,
``SourceSpec``, ``SuiteSpec``), records the module the entry lives in and returns the decorated
object unchanged. Reading a registry first *discovers* the plug-ins: every module below the plug-in
packages (:data:`PLUGIN_PACKAGES`) is imported, then every module named by an installed package's
``ipshield.plugins`` entry point. No hand list, and an import error is an error (never swallowed).

The CLI (``ipshield protect METHOD``, ``ipshield attack NAME``, ...), the Python API
(``ipshield.api``), the benchmarks and the registry-driven tests are built from these specs.
docs/dev/CONTRACTS.md is the guide for adding an entry.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Literal, Mapping, TypeVar

from ipshield.errors import ConfigError, IPShieldError

#: every scenario name of the project (docs/dev/CONTRACTS.md): the authorized domain is restricted
#: against given unauthorized domains (target-specified), against its own watermarked images
#: (ownership), against domains never seen in training (target-free), or only watermarked
#: authorized images are served (authorization)
SCENARIOS = ("target-specified", "ownership", "target-free", "authorization")
#: the one suffix of a watermarked domain's name in every table and metrics.json
OWNERSHIP_SUFFIX = "+watermark"

#: packages whose modules register plug-ins (each is imported once, completely)
PLUGIN_PACKAGES = ("ipshield.data", "ipshield.models", "ipshield.protect", "ipshield.watermark", "ipshield.attacks",
                   "ipshield.bench")
ENTRY_POINT_GROUP = "ipshield.plugins"


def normalise_name(name: Any) -> str:
    return str(name).strip().lower().replace("_", "-")


# ============================================================================ specs


@dataclass(frozen=True)
class Spec:
    """What every spec has: a name, a one-line description and the module it was registered in."""

    name: str
    description: str = ""
    module: str = ""

    #: the field the decorated object is stored in
    _decorates = "obj"


@dataclass(frozen=True)
class MethodSpec(Spec):
    """A protection method (domain restriction) or an unprotected reference.

    ``run(job, config) -> metrics`` trains on ``job`` (model, domains, authorized/unauthorized,
    scenario, run folder) and returns the metrics dict; the jobs layer writes it to metrics.json.
    Artifacts go into ``job.out`` when it is set.
    """

    run: Callable[..., dict] | None = None
    #: its config class (pydantic, extra keys rejected)
    config: type | None = None
    #: what the entry sets on top of the config class's defaults (data, e.g. MAP's presets)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the model it protects: a CLIP ("clip") or an image classifier ("classifier")
    model: Literal["clip", "classifier"] = "classifier"
    #: the training data it needs: "authorized", "unauthorized" (empty: data-free)
    data: tuple[str, ...] = ("authorized", "unauthorized")
    #: the scenarios it supports (names of ``SCENARIOS``); empty: no scenario (a reference)
    scenarios: tuple[str, ...] = ("target-specified",)
    #: a reference (unprotected) rather than a protection
    reference: bool = False

    _decorates = "run"

    def make_config(self, data: Mapping[str, Any] | None = None, overrides: list[str] | None = None):
        """The validated config: the class defaults, then this entry's defaults, then ``data``,
        then ``key=value`` overrides."""
        if self.config is None:
            raise IPShieldError(f"protection method '{self.name}' has no config class", "register it with config=...")
        return self.config.build({**dict(self.defaults), **dict(data or {})}, overrides)

    def check_scenario(self, scenario: str | None) -> str | None:
        if scenario is None:
            return self.scenarios[0] if self.scenarios else None
        s = normalise_name(scenario)
        if s == "domain":  # the name used before the vocabulary was unified
            s = "target-specified"
        if s not in SCENARIOS:
            raise ConfigError(f"unknown scenario '{scenario}'", f"the scenarios are: {', '.join(SCENARIOS)}")
        if s not in self.scenarios:
            supported = ", ".join(self.scenarios) or "none (it is an unprotected reference)"
            raise ConfigError(f"protection method '{self.name}' does not support the scenario '{s}'",
                              f"{self.name} supports: {supported}")
        return s


@dataclass(frozen=True)
class SchemeSpec(Spec):
    """A watermark scheme of an embedding service. ``obj`` is the scheme class
    (``ipshield.watermark.base.WatermarkScheme``): ``fit(adapter, master_key, reference, config)``,
    ``save(folder)``, ``load(folder, master_key)``, ``encoder(adapter, customer)`` and
    ``postprocessors(customer)`` (what the service applies to the images' and the texts' embeddings,
    the texts reaching the scheme's text layer)."""

    obj: Any = None
    config: type | None = None
    #: the verification tests it declares (names of the tests ``verify`` runs)
    tests: tuple[str, ...] = ()
    #: whether its transform needs the texts (a text layer), not only the vectors
    needs_texts: bool = False

    def make_config(self, data: Mapping[str, Any] | None = None, overrides: list[str] | None = None):
        return self.config.build(dict(data or {}), overrides)


@dataclass(frozen=True)
class AttackSpec(Spec):
    """An attack on a protection or a watermark. ``run(target, config, **inputs) -> result``."""

    run: Callable[..., Any] | None = None
    config: type | None = None
    #: the kind of target it takes: "classifier", "prompt" (a CLIP prompt model), "embedder"
    #: (an embedding service or a student model of one)
    target: Literal["classifier", "prompt", "embedder"] = "classifier"
    #: the config field that is its budget (labelled images, queries, strength)
    budget: str = ""

    _decorates = "run"

    def make_config(self, data: Mapping[str, Any] | None = None, overrides: list[str] | None = None):
        if self.config is None:
            raise IPShieldError(f"attack '{self.name}' has no config class", "register it with config=...")
        return self.config.build(dict(data or {}), overrides)


@dataclass(frozen=True)
class SourceSpec(Spec):
    """A data source: ``load(names, **options) -> {name: Domain}``; ``domains(**options)`` lists
    the domain names it offers (with the same options)."""

    load: Callable[..., dict] | None = None
    domains: Callable[..., list[str]] | None = None

    _decorates = "load"


@dataclass(frozen=True)
class SuiteSpec(Spec):
    """A benchmark suite: ``run(out, **options)`` writes its tables into ``out``."""

    run: Callable[..., Any] | None = None

    _decorates = "run"


@dataclass(frozen=True)
class ClassifierSpec(Spec):
    """A classifier architecture: ``obj(num_classes, **kw) -> nn.Module``."""

    obj: Callable[..., Any] | None = None


S = TypeVar("S", bound=Spec)


# ============================================================================ the registry


class Registry(Generic[S]):
    """Specs of one kind of plug-in, by name."""

    def __init__(self, kind: str, spec_type: type[S]):
        self.kind = kind
        self.spec_type = spec_type
        self._entries: dict[str, S] = {}

    def register(self, name: str, **fields: Any) -> Callable[[Any], Any]:
        """Decorator: register the decorated object as the entry ``name`` of this registry, with
        ``fields`` of the spec. Returns the object unchanged."""
        key = normalise_name(name)
        allowed = {f.name for f in dataclasses.fields(self.spec_type)} - {"name", "module", self.spec_type._decorates}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise TypeError(f"{self.spec_type.__name__} has no field(s) {unknown}; its fields are {sorted(allowed)}")

        def deco(obj: Any) -> Any:
            module = getattr(obj, "__module__", "") or ""
            spec = self.spec_type(name=key, module=module, **{self.spec_type._decorates: obj}, **fields)
            self.add(spec)
            return obj

        return deco

    def add(self, spec: S) -> S:
        old = self._entries.get(spec.name)
        if old is not None and old != spec:
            raise ValueError(f"{self.kind} '{spec.name}' is registered twice ({old.module} and {spec.module})")
        self._entries[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        """Remove an entry (tests register throw-away entries and remove them again)."""
        self._entries.pop(normalise_name(name), None)

    def get(self, name: str) -> S:
        discover()
        key = normalise_name(name)
        if key not in self._entries:
            raise IPShieldError(f"unknown {self.kind} '{name}'",
                                f"choose one of: {', '.join(sorted(self._entries)) or '(none registered)'}")
        return self._entries[key]

    def names(self) -> list[str]:
        discover()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, S]]:
        discover()
        return iter(sorted(self._entries.items()))

    def specs(self) -> list[S]:
        return [s for _n, s in self.items()]

    def __contains__(self, name: Any) -> bool:
        discover()
        return normalise_name(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


#: protection methods and unprotected references: zero-shot, coop, ip-clip, ntl-prompt, sa-map, ...
METHODS: Registry[MethodSpec] = Registry("protection method", MethodSpec)
#: data sources: synthetic, digits, folder
DATASETS: Registry[SourceSpec] = Registry("data source", SourceSpec)
#: attacks on protections and watermarks
ATTACKS: Registry[AttackSpec] = Registry("attack", AttackSpec)
#: embedding watermark schemes: vlpmarker, embmarker, vlpmarker+embmarker
WATERMARKS: Registry[SchemeSpec] = Registry("watermark scheme", SchemeSpec)
#: classifier architectures
CLASSIFIERS: Registry[ClassifierSpec] = Registry("classifier architecture", ClassifierSpec)
#: benchmark suites
SUITES: Registry[SuiteSpec] = Registry("benchmark suite", SuiteSpec)

REGISTRIES: dict[str, Registry] = {"method": METHODS, "data source": DATASETS, "attack": ATTACKS,
                                   "watermark": WATERMARKS, "classifier": CLASSIFIERS, "suite": SUITES}

_discovered = False
_discovering = False


def discover() -> None:
    """Import every module of the plug-in packages (and of the ``ipshield.plugins`` entry points)
    once, so that every registry is complete. Import errors propagate."""
    global _discovered, _discovering
    if _discovered or _discovering:
        return
    _discovering = True
    try:
        for package in PLUGIN_PACKAGES:
            pkg = importlib.import_module(package)
            for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
                if info.name.rsplit(".", 1)[-1].startswith("_"):
                    continue
                importlib.import_module(info.name)
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value.split(":")[0])
        _discovered = True
    finally:
        _discovering = False
