"""A CLIP adapter: one interface over a Hugging Face ``transformers`` CLIP checkpoint (the default
backend) or an open_clip model (optional backend, ``ipshield.models.openclip_adapter``).

What the methods need from CLIP, and nothing more:

- ``preprocess`` (images in [0, 1] -> normalised pixels at the model's resolution),
- ``encode_image`` and ``encode_image_with_layers`` (the output tokens of every visual block, the
  taps IP-CLIP reads style and content from),
- ``tokenize`` / ``eos_positions`` / ``encode_text`` (what ``get_text_features`` computes),
- ``token_embedding`` and ``encode_text_embeddings``: the text tower run on token *embeddings*, the
  entry point of prompt learning (CoOp, IP-CLIP). The text transformer is causal and pools at the
  EOS token, so a batch may be truncated to its longest real prompt without changing the result.

Sizes are read from the checkpoint, so any ViT CLIP works (B/32, B/16, L/14 and the project's
small CLIP). The adapter is frozen by default: no parameter requires a gradient and it stays in
eval mode even when a parent module calls ``.train()``; gradients still flow to its *inputs*
(prompt embeddings, pixels).

Layout: the adapter class, ``OPENAI_MEAN``/``OPENAI_STD`` and ``l2_normalise`` are defined in
``ipshield.models.common`` (imported by both backends, so no import circle), the open_clip
backend in ``ipshield.models.openclip_adapter``; this module holds the loaders and re-exports
those names, so ``from ipshield.models.clip import CLIPAdapter, load_clip`` keeps working.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ipshield.errors import CheckpointError, IPShieldError

# The adapter class and the shared names live in ipshield.models.common (so that the open_clip
# backend can subclass the adapter without importing this module); they stay importable from here.
from ipshield.models.common import (  # noqa: F401  (re-exported)
    OPENAI_MEAN,
    OPENAI_STD,
    CLIPAdapter,
    TextInput,
    _l2,
    causal_text_mask,
    l2_normalise,
)
from ipshield.models.openclip_adapter import OpenCLIPAdapter, load_openclip  # noqa: F401  (re-exported)

_CHECKPOINT_HINT = (
    "give a folder holding a Hugging Face CLIP checkpoint: config.json, model.safetensors and the "
    "tokenizer files (tokenizer.json, or vocab.json + merges.txt), e.g. one written by `ipshield pretrain`"
)


# ---------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})", _CHECKPOINT_HINT) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object", _CHECKPOINT_HINT)
    return data


def resolve_clip_folder(path: str | Path) -> Path:
    """``path`` itself, or ``path/clip`` when ``path`` is a run folder of ``ipshield pretrain``."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "clip" / "config.json").is_file():
        return p / "clip"
    return p


def check_hf_clip_folder(path: str | Path) -> dict:
    """Validate a Hugging Face CLIP folder before loading it; returns its config.json as a dict.
    Raises ``CheckpointError`` naming the problem and the fix."""
    p = resolve_clip_folder(path)
    if not p.exists():
        raise CheckpointError(f"model folder {p} does not exist", _CHECKPOINT_HINT)
    if not p.is_dir():
        raise CheckpointError(f"model path {p} is a file, not a folder", _CHECKPOINT_HINT)
    files = {f.name for f in p.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not ({"model.safetensors", "model.safetensors.index.json"} & files):
        if {"pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json"} & files:
            raise CheckpointError(
                f"{p} holds pickled PyTorch weights (pytorch_model.bin) and no model.safetensors; ipshield loads "
                "weights only from safetensors (a pickle can run code when loaded)",
                "convert once with transformers: CLIPModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True), on a machine you trust",
            )
        missing.append("model.safetensors")
    if not ("tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise CheckpointError(f"model folder {p} lacks {', '.join(missing)}", _CHECKPOINT_HINT)
    cfg = _read_json(p / "config.json")
    model_type = cfg.get("model_type")
    if model_type != "clip":
        raise CheckpointError(
            f"{p} is not a CLIP checkpoint (config.json model_type is {model_type!r}, expected 'clip')",
            "point --model at a CLIP folder (vision + text towers); for open_clip weights use backend='open_clip'",
        )
    vc = cfg.get("vision_config") or {}
    if not isinstance(vc, dict) or "patch_size" not in vc or vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(
            f"{p} does not describe a ViT vision tower (vision_config has no patch_size)",
            "use a ViT CLIP (B/32, B/16, L/14, or the small CLIP from `ipshield pretrain`); ResNet CLIPs are not supported",
        )
    return cfg


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' logging and progress bars (loading problems are reported as errors)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_hf(path: str | Path, device: str | torch.device, dtype: torch.dtype | None, frozen: bool) -> CLIPAdapter:
    from transformers import AutoTokenizer, CLIPModel

    p = resolve_clip_folder(path)
    check_hf_clip_folder(p)
    with quiet_transformers():
        return _load_hf_checked(p, device, dtype, frozen, AutoTokenizer, CLIPModel)


def _safetensors_shapes(p: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header(s), without reading the weights."""
    from safetensors import safe_open

    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set((_read_json(index).get("weight_map") or {}).values()))
        if not files:
            raise CheckpointError(f"{index} lists no weight files", _CHECKPOINT_HINT)
    else:
        files = ["model.safetensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"weight file {f} (listed in the index) is missing", _CHECKPOINT_HINT)
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc})",
                                  "re-save the checkpoint (CLIPModel.save_pretrained) or re-run `ipshield pretrain`") from None
    return shapes


def _check_weight_shapes(p: Path, CLIPModel) -> None:
    """Compare the weights' names and shapes with the model that config.json describes, so that a
    wrong-size checkpoint fails with a message that names the tensors."""
    from transformers import CLIPConfig

    try:
        cfg = CLIPConfig.from_pretrained(str(p), local_files_only=True)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in CLIPModel(cfg).state_dict().items()}
    except Exception as exc:  # a config transformers cannot build a model from
        raise CheckpointError(f"config.json in {p} does not describe a valid CLIP ({str(exc)[:300]})",
                              _CHECKPOINT_HINT) from None
    found = _safetensors_shapes(p)
    missing = sorted(k for k in expected if k not in found and not k.endswith("position_ids"))
    # extra tensors (e.g. the position_ids buffers older checkpoints saved) are ignored, as transformers does
    wrong = sorted(f"{k} {list(found[k])} (config.json expects {list(v)})"
                   for k, v in expected.items() if k in found and found[k] != v)
    problems = []
    for label, items in (("wrong shapes", wrong), ("missing tensors", missing)):
        if items:
            problems.append(f"{label}: {', '.join(items[:3])}{f' and {len(items) - 3} more' if len(items) > 3 else ''}")
    if problems:
        raise CheckpointError(f"the weights in {p} do not match its config.json ({'; '.join(problems)})",
                              "use the config.json saved with these weights, or re-save the checkpoint "
                              "(CLIPModel.save_pretrained) / re-run `ipshield pretrain`")


def _load_hf_checked(p: Path, device, dtype, frozen, AutoTokenizer, CLIPModel) -> CLIPAdapter:
    _check_weight_shapes(p, CLIPModel)
    try:
        model, info = CLIPModel.from_pretrained(str(p), use_safetensors=True, local_files_only=True,
                                                output_loading_info=True, dtype=dtype or torch.float32)
    except Exception as exc:  # anything else transformers or safetensors may raise for a bad folder
        msg = str(exc).strip().splitlines()
        detail = " ".join(msg[:3])[:600] if msg else type(exc).__name__
        raise CheckpointError(f"could not load the CLIP weights in {p}: {detail}",
                              "the weights must match config.json (sizes, layer counts); re-save the checkpoint or "
                              "re-run `ipshield pretrain`") from None
    bad = []
    for key in ("missing_keys", "mismatched_keys"):
        vals = sorted(str(v) for v in (info.get(key) or []))
        if vals:
            bad.append(f"{key.replace('_', ' ')}: {', '.join(vals[:4])}{' ...' if len(vals) > 4 else ''}")
    if bad:
        raise CheckpointError(f"the weights in {p} do not match its config.json ({'; '.join(bad)})",
                              "re-save the checkpoint with CLIPModel.save_pretrained or re-run `ipshield pretrain`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # tokenizers raise many types for broken files
        raise CheckpointError(f"could not load the tokenizer in {p}: {str(exc)[:300]}",
                              "save the tokenizer next to the weights (tokenizer.json + tokenizer_config.json)") from None
    mean = std = None
    pre = p / "preprocessor_config.json"
    if pre.is_file():
        pcfg = _read_json(pre)
        mean, std = pcfg.get("image_mean"), pcfg.get("image_std")
    adapter = CLIPAdapter(model, tokenizer, image_mean=mean, image_std=std, path=p, frozen=frozen)
    return adapter.to(device)


def load_clip(path: str | Path, backend: str = "hf", device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None, frozen: bool = True, **options) -> CLIPAdapter:
    """Load a CLIP from a LOCAL path as a :class:`CLIPAdapter` (frozen by default).

    ``backend="hf"``: a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer files).
    ``backend="open_clip"``: an open_clip folder (open_clip_config.json + open_clip_model.safetensors)
    or a ``.safetensors`` file with ``model_name=...``; needs ``pip install ipshield[openclip]``.
    Nothing is ever downloaded.
    """
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype.lower())
        if dtype is None:
            raise IPShieldError("unknown dtype", "use float32, float16 or bfloat16")
    from ipshield.utils import resolve_device

    dev = resolve_device(str(device) if device is not None else None)
    name = (backend or "hf").strip().lower().replace("-", "_")
    if name in ("hf", "transformers", "huggingface"):
        if options:
            raise IPShieldError(f"unknown option(s) for the hf backend: {', '.join(options)}", "remove them")
        return _load_hf(path, dev, dtype, frozen)
    if name in ("open_clip", "openclip"):
        return load_openclip(path, device=dev, dtype=dtype, frozen=frozen, **options)
    raise IPShieldError(f"unknown CLIP backend '{backend}'", "use backend='hf' (transformers) or 'open_clip'")
