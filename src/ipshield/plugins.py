"""Imports every module that registers a plug-in, so each registry is complete when read."""

from __future__ import annotations

import importlib

_MODULES = [
    "ipshield.data.sources",
    "ipshield.models.classifiers",
    "ipshield.protect.zeroshot",
    "ipshield.protect.coop",
    "ipshield.protect.ipclip",
    "ipshield.protect.ntl_prompt",
    "ipshield.protect.map",
    "ipshield.protect.ntl",
    "ipshield.protect.cuti",
    "ipshield.watermark.vlpmarker",
    "ipshield.watermark.embmarker",
    "ipshield.watermark.stacked",
    "ipshield.attacks.domain",
    "ipshield.attacks.watermark",
]

for _name in _MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a module not written yet (or an optional one)
        if exc.name != _name:
            raise
