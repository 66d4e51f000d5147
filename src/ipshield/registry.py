"""One registry per kind of plug-in (protection methods, datasets, attacks, watermarks, models).

Entries are registered explicitly with a decorator in the module that defines them; the package
imports those modules in one place (``ipshield.plugins``), so nothing depends on import order.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from ipshield.errors import IPShieldError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        from ipshield import plugins  # noqa: F401  (fills every registry)

        key = name.strip().lower().replace("_", "-")
        if key not in self._entries:
            raise IPShieldError(
                f"unknown {self.kind} '{name}'",
                f"choose one of: {', '.join(sorted(self._entries)) or '(none registered)'}",
            )
        return self._entries[key]

    def names(self) -> list[str]:
        from ipshield import plugins  # noqa: F401

        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        from ipshield import plugins  # noqa: F401

        return iter(sorted(self._entries.items()))

    def __contains__(self, name: Any) -> bool:
        from ipshield import plugins  # noqa: F401

        return str(name).strip().lower().replace("_", "-") in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


#: protection methods (domain restriction): zero-shot, coop, ip-clip, map, ntl, cuti, ...
METHODS: Registry[Any] = Registry("protection method")
#: dataset sources: synthetic, digits, folder
DATASETS: Registry[Any] = Registry("dataset")
#: attacks on protections and watermarks
ATTACKS: Registry[Any] = Registry("attack")
#: embedding watermarks: vlpmarker, embmarker, vlpmarker+embmarker
WATERMARKS: Registry[Any] = Registry("watermark")
#: classifier architectures
CLASSIFIERS: Registry[Any] = Registry("classifier")
