"""The Python API, with the names of the CLI commands.

    from ipshield import api
    domains = api.load_domains("synthetic")
    clip = api.load_clip(api.small_clip("default"))
    api.protect("coop", model=clip, domains=domains, authorized="clean", out="runs/coop")   # ipshield protect coop
    api.protect("ip-clip", model=clip, domains=domains, authorized="clean",                # ipshield protect ip-clip
                unauthorized=["inverted"], out="runs/ipclip", overrides=["epochs=5"])
    api.protect("sa-map", domains=digits, authorized="mnist", unauthorized=["usps"], out="runs/sa")

``api.protect(METHOD, ...)`` reaches every registered method (``api.methods()`` lists them) with
the same names and the same entry defaults as ``ipshield protect METHOD``.

Imports are lazy: ``import ipshield.api`` costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute); CLI command in the comment
_NAMES: dict[str, tuple[str, str]] = {
    # data
    "load_domains": ("ipshield.data.sources", "load_domains"),            # --source/--domains options
    "load_synthetic": ("ipshield.data.synthetic", "load_synthetic"),
    "load_digits": ("ipshield.data.digits", "load_digits"),
    "load_image_folders": ("ipshield.data.folders", "load_image_folders"),
    "preview_grid": ("ipshield.data.preview", "preview_grid"),            # data preview
    # models
    "load_clip": ("ipshield.models.clip", "load_clip"),
    "pretrain": ("ipshield.models.tiny_clip", "pretrain"),                # pretrain
    "PretrainConfig": ("ipshield.models.tiny_clip", "PretrainConfig"),
    "small_clip": ("ipshield.models.tiny_clip", "small_clip"),
    "train_source": ("ipshield.models.classifiers", "train_source"),      # train-source
    "load_classifier": ("ipshield.models.classifiers", "load_classifier"),
    # unprotected references and protections
    "zero_shot": ("ipshield.protect.zeroshot", "evaluate_zero_shot"),     # zero-shot
    "protect": ("ipshield.jobs", "protect"),                              # protect METHOD (every registered method)
    "methods": ("ipshield.api", "_methods"),
    "run_zero_shot": ("ipshield.jobs", "run_zero_shot"),                  # protect zero-shot
    "CoOpConfig": ("ipshield.protect.coop", "CoOpConfig"),
    "train_coop": ("ipshield.protect.coop", "train_coop"),
    "run_coop": ("ipshield.jobs", "run_coop"),                            # protect coop
    "IPCLIPConfig": ("ipshield.protect.ipclip", "IPCLIPConfig"),
    "train_ipclip": ("ipshield.protect.ipclip", "train_ipclip"),
    "run_ipclip": ("ipshield.jobs", "run_ipclip"),                        # protect ip-clip
    "run_ntl_prompt": ("ipshield.jobs", "run_ntl_prompt"),                # protect ntl-prompt
    "evaluate": ("ipshield.jobs", "evaluate"),                            # evaluate
    "predict": ("ipshield.jobs", "predict"),                              # predict
    "ablation": ("ipshield.protect.ipclip_run", "ablation"),              # ablation ip-clip
    "MAPConfig": ("ipshield.protect.map", "MAPConfig"),
    "NTLConfig": ("ipshield.protect.ntl", "NTLConfig"),
    "CUTIConfig": ("ipshield.protect.cuti", "CUTIConfig"),
    # watermarks
    "keygen": ("ipshield.watermark.keys", "keygen"),                      # watermark keygen
    "apply_watermark": ("ipshield.jobs.watermark", "apply_watermark"),     # watermark apply
    "attack": ("ipshield.jobs.attack", "attack"),                         # attack NAME (every registered attack)
    "cost_to_break": ("ipshield.jobs.attack", "cost_to_break"),           # attack finetune
    "attacks": ("ipshield.api", "_attacks"),
    "extract": ("ipshield.jobs.watermark", "run_extract"),                 # attack extract
    "verify": ("ipshield.jobs.watermark", "run_verify"),                   # verify
    "calibrate_watermark": ("ipshield.jobs.watermark", "run_calibrate"),   # watermark calibrate
    # evidence
    "summarize_restriction": ("ipshield.metrics", "summarize_restriction"),
    "run_suite": ("ipshield.report.suite", "run_suite_with_report"),      # bench SUITE
    "run_digits_bench": ("ipshield.bench.digits", "run_digits_bench"),    # bench digits
    "create_app": ("ipshield.serve.app", "create_app"),                   # serve
    "run_demo": ("ipshield.demo", "run_demo"),                            # demo
}

__all__ = sorted(_NAMES)


def _methods() -> list[str]:
    """The names of every registered protection method and reference (``ipshield protect --help``)."""
    from ipshield.registry import METHODS

    return METHODS.names()


def _attacks() -> list[str]:
    """The names of every registered attack (``ipshield attack --help``)."""
    from ipshield.registry import ATTACKS

    return ATTACKS.names()


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'ipshield.api' has no attribute {name!r}")
    module, attr = _NAMES[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return __all__
