"""Class-name maps: the names a model reads for the classes of a data source.

A folder dataset names its classes after its class folders (``0`` .. ``9``, ``back_pack``, ...).
A CLIP reads class names as text, and a word-level tokenizer (the small CLIP's) maps a word it has
never seen, a bare numeral included, to its unknown token: every such class then gets the same
text feature and zero-shot accuracy falls to chance. A class-name map renames the classes, keeping
their order (and so every label):

- ``parse_class_names(spec)``: ``"0=zero,1=one"``, a YAML / JSON file holding such a mapping, or a
  mapping (``{"0": "zero"}``) -> ``{folder name: name}``;
- ``rename_classes(domains, mapping)``: the same domains with their classes renamed (a name the
  mapping does not mention is kept; a key that is no class is an error, a typo being likely);
- ``CLASS_NAMES_FILES``: the file a folder dataset may hold next to its domain folders
  (``ROOT/class_names.yaml``); the folder source reads it when no map is given.

``ipshield.data.sources.load_domains(..., class_names=...)`` applies a map to any source; the CLI
option is ``--class-names``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ipshield.data.domain import Domain
from ipshield.errors import DataError

#: the files a folder dataset may hold in its root to name its classes (the first found is used)
CLASS_NAMES_FILES = ("class_names.yaml", "class_names.yml", "class_names.json")

_EXAMPLE = "e.g. --class-names 0=zero,1=one (or a YAML / JSON file mapping folder names to names)"


def _check_mapping(data: Any, where: str) -> dict[str, str]:
    if not isinstance(data, Mapping):
        raise DataError(f"the class-name map {where} must map folder names to names, got {type(data).__name__}",
                        "write one 'folder name: name' pair per line (YAML) or a JSON object")
    out: dict[str, str] = {}
    for k, v in data.items():
        if v is None or isinstance(v, (list, dict)) or not str(v).strip():
            raise DataError(f"the class-name map {where} gives class '{k}' no usable name ({v!r})",
                            "give every listed class a non-empty name")
        out[str(k).strip()] = str(v).strip()
    return out


def read_class_names_file(path: str | Path) -> dict[str, str]:
    """The mapping of a YAML (``.yaml``, ``.yml``) or JSON (``.json``) class-name file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"class-name file {p} does not exist", f"give an existing YAML / JSON file, {_EXAMPLE}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 (any parse error: one clear message)
        raise DataError(f"class-name file {p} cannot be read ({exc.__class__.__name__}: {exc})",
                        "write a mapping 'folder name: name', one per line (YAML) or a JSON object") from None
    return _check_mapping(data if data is not None else {}, f"in {p}")


def parse_class_names(spec: str | Path | Mapping[str, str] | None) -> dict[str, str] | None:
    """``{folder name: name}`` from ``"a=b,c=d"``, a YAML / JSON file, or a mapping (None: None)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _check_mapping(spec, "given")
    if isinstance(spec, Path):
        return read_class_names_file(spec)
    text = str(spec).strip()
    if not text:
        return None
    if "=" not in text:
        if not Path(text).expanduser().is_file():
            raise DataError(f"the class-name map '{text}' is neither FOLDER=NAME pairs nor an existing file",
                            f"write FOLDER=NAME pairs separated by commas, {_EXAMPLE}")
        return read_class_names_file(text)
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataError(f"cannot read '{part.strip()}' of the class-name map '{text}'",
                            f"write FOLDER=NAME pairs separated by commas, {_EXAMPLE}")
        if key.strip() in out:
            raise DataError(f"class '{key.strip()}' is named twice in the class-name map '{text}'", "name it once")
        out[key.strip()] = value.strip()
    return out


def find_class_names_file(root: str | Path | None) -> Path | None:
    """``ROOT/class_names.yaml`` (``.yml``, ``.json``) when a folder dataset holds one."""
    if root is None:
        return None
    for name in CLASS_NAMES_FILES:
        p = Path(root).expanduser() / name
        if p.is_file():
            return p
    return None


def rename_classes(domains: Mapping[str, Domain], mapping: Mapping[str, str] | None,
                   origin: str = "the class-name map") -> dict[str, Domain]:
    """The domains with their classes renamed by ``mapping`` (``{class: new name}``; a class it does
    not mention keeps its name). The order of the classes, hence every label, is unchanged. Keys
    match a class exactly, else case-insensitively; a key that is no class, or two classes given
    the same name, is a ``DataError``. The domains are new objects sharing the splits."""
    doms = dict(domains)
    if not mapping or not doms:
        return doms
    classes = list(next(iter(doms.values())).classes)
    lower: dict[str, list[str]] = {}
    for c in classes:
        lower.setdefault(c.lower(), []).append(c)
    new = {c: c for c in classes}
    unknown = []
    for key, value in mapping.items():
        if key in new:
            new[key] = value
        elif len(lower.get(key.lower(), [])) == 1:
            new[lower[key.lower()][0]] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
        raise DataError(f"{origin} names classes the data does not have: {', '.join(map(repr, unknown))}",
                        f"use the class (folder) names of the data: {shown}")
    renamed = [new[c] for c in classes]
    seen: dict[str, str] = {}
    for c, r in zip(classes, renamed):
        if r in seen:
            raise DataError(f"{origin} gives classes '{seen[r]}' and '{c}' the same name '{r}'",
                            "give every class its own name")
        seen[r] = c
    out = {}
    for name, d in doms.items():
        if list(d.classes) != classes:  # check_same_classes has run for the sources that need it
            raise DataError(f"domain '{name}' has other classes than '{next(iter(doms))}'",
                            "rename the classes of domains that share one set of classes")
        meta = dict(d.meta)
        meta["class_folders"] = list(classes)
        out[name] = Domain(d.name, list(renamed), d.train, d.test, meta=meta)
    return out


__all__ = ["CLASS_NAMES_FILES", "parse_class_names", "read_class_names_file", "find_class_names_file",
           "rename_classes"]
