"""The Python API, with the names of the CLI commands.

    from ipshield import api
    domains = api.load_domains("synthetic")
    clip = api.load_clip(api.small_clip("default"))
    api.run_coop(clip, domains, "clean", "runs/coop")                          # ipshield protect coop
    api.run_ipclip(clip, domains, "clean", ["inverted"], "runs/ipclip")         # ipshield protect ip-clip

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
    "run_zero_shot": ("ipshield.protect.zeroshot", "run_zero_shot"),
    "CoOpConfig": ("ipshield.protect.coop", "CoOpConfig"),
    "train_coop": ("ipshield.protect.coop", "train_coop"),
    "run_coop": ("ipshield.protect.coop", "run_coop"),                    # protect coop
    "IPCLIPConfig": ("ipshield.protect.ipclip", "IPCLIPConfig"),
    "train_ipclip": ("ipshield.protect.ipclip", "train_ipclip"),
    "run_ipclip": ("ipshield.protect.ipclip_run", "run_ipclip"),          # protect ip-clip
    "run_ntl_prompt": ("ipshield.protect.ipclip_run", "run_ntl_prompt"),  # protect ntl-prompt
    "evaluate": ("ipshield.protect.ipclip_run", "evaluate_run"),          # evaluate
    "predict": ("ipshield.protect.ipclip_run", "predict_folder"),         # predict
    "ablation": ("ipshield.protect.ipclip_run", "ablation"),              # ablation ip-clip
    "MAPConfig": ("ipshield.protect.map", "MAPConfig"),
    "run_map": ("ipshield.protect.map", "run"),                           # protect map
    "NTLConfig": ("ipshield.protect.ntl", "NTLConfig"),
    "run_ntl": ("ipshield.protect.ntl", "run"),                           # protect ntl
    "CUTIConfig": ("ipshield.protect.cuti", "CUTIConfig"),
    "run_cuti": ("ipshield.protect.cuti", "run"),                         # protect cuti
    # watermarks
    "keygen": ("ipshield.watermark.keys", "keygen"),                      # watermark keygen
    "apply_watermark": ("ipshield.watermark.run", "apply_watermark"),     # watermark apply
    "extract": ("ipshield.watermark.run", "run_extract"),                 # attack extract
    "verify": ("ipshield.watermark.run", "run_verify"),                   # verify
    "calibrate_watermark": ("ipshield.watermark.run", "run_calibrate"),   # watermark calibrate
    # evidence
    "summarize_restriction": ("ipshield.metrics", "summarize_restriction"),
    "run_suite": ("ipshield.bench.harness", "run_suite"),                 # bench SUITE
    "run_digits_bench": ("ipshield.bench.digits", "run_digits_bench"),    # bench digits
    "create_app": ("ipshield.serve.app", "create_app"),                   # serve
    "run_demo": ("ipshield.demo", "run_demo"),                            # demo
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'ipshield.api' has no attribute {name!r}")
    module, attr = _NAMES[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return __all__
