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
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ipshield.errors import CheckpointError, IPShieldError

#: OpenAI CLIP's pixel statistics, used when a checkpoint has no preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_CHECKPOINT_HINT = (
    "give a folder holding a Hugging Face CLIP checkpoint: config.json, model.safetensors and the "
    "tokenizer files (tokenizer.json, or vocab.json + merges.txt), e.g. one written by `ipshield pretrain`"
)

TextInput = str | Sequence[str] | torch.Tensor


def _l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class CLIPAdapter(nn.Module):
    """A frozen CLIP behind the interface of ``docs/dev/CONTRACTS.md`` (Hugging Face backend).

    Built by :func:`load_clip`; ``model`` is a ``transformers.CLIPModel``, ``tokenizer`` the
    checkpoint's tokenizer.

    Attributes read from the checkpoint: ``embed_dim``, ``vision_width``, ``vision_layers``,
    ``vision_heads``, ``patch_size``, ``image_size``, ``num_image_tokens`` (patches + class token),
    ``text_width``, ``text_layers``, ``context_length``, ``vocab_size``, ``image_mean``,
    ``image_std``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id``.
    """

    backend = "hf"

    def __init__(self, model: nn.Module, tokenizer, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, path: str | Path | None = None, frozen: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path) if path is not None else None
        tc, vc = model.config.text_config, model.config.vision_config
        self.embed_dim = int(model.text_projection.out_features)
        self.vision_width = int(vc.hidden_size)
        self.vision_layers = int(vc.num_hidden_layers)
        self.vision_heads = int(vc.num_attention_heads)
        self.patch_size = int(vc.patch_size)
        self.image_size = int(vc.image_size)
        self.num_image_tokens = (self.image_size // self.patch_size) ** 2 + 1
        self.text_width = int(tc.hidden_size)
        self.text_layers = int(tc.num_hidden_layers)
        self.context_length = int(tc.max_position_embeddings)
        self.vocab_size = int(tc.vocab_size)
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self._init_pixel_stats(image_mean, image_std)
        self.frozen = False
        if frozen:
            self.freeze()

    # ------------------------------------------------------------------ common
    def _init_pixel_stats(self, image_mean, image_std) -> None:
        self.image_mean = tuple(float(v) for v in (image_mean or OPENAI_MEAN))
        self.image_std = tuple(float(v) for v in (image_std or OPENAI_STD))
        self.register_buffer("_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> "CLIPAdapter":
        """No parameter requires a gradient; eval mode is kept even under a parent's ``.train()``."""
        self.requires_grad_(False)
        self.frozen = True
        super().train(False)
        return self

    def unfreeze(self) -> "CLIPAdapter":
        self.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> "CLIPAdapter":
        return super().train(False if self.frozen else mode)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature, on the log scale (logits = ``logit_scale.exp()`` * cosine)."""
        return self.model.logit_scale

    def extra_repr(self) -> str:
        return (f"backend={self.backend}, image_size={self.image_size}, patch={self.patch_size}, "
                f"vision={self.vision_layers}x{self.vision_width}, text={self.text_layers}x{self.text_width}, "
                f"embed_dim={self.embed_dim}, context_length={self.context_length}")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Float images [B, 3, H, W] in [0, 1] -> normalised pixels [B, 3, S, S] for the vision
        tower (S = ``image_size``): shorter side resized to S (bicubic, antialiased, clamped to
        [0, 1]), centre crop, then (x - mean) / std. Differentiable."""
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise IPShieldError(f"images must be [B, 3, H, W], got {tuple(x.shape)}", "pass RGB batches in [0, 1]")
        x = x.to(device=self.device, dtype=torch.float32)
        s = self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=nh < h or nw < w)
            x = x.clamp(0.0, 1.0)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s]
        return ((x - self._mean) / self._std).to(self.dtype)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features [B, D] from preprocessed pixels (transformers' ``get_image_features``)."""
        feats, _ = self._vision_forward(pixels, keep_layers=False)
        return _l2(feats) if normalize else feats

    def encode_image_with_layers(self, pixels: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(features [B, D], the output tokens of every visual block: ``vision_layers`` tensors
        [B, T, W] with T = ``num_image_tokens`` (class token first), W = ``vision_width``)."""
        feats, layers = self._vision_forward(pixels, keep_layers=True)
        return (_l2(feats) if normalize else feats), layers

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the first EOS token of each row [N]. Rows without the tokenizer's EOS id fall
        back to the position of the highest id (OpenAI's rule: EOS is the last vocabulary entry)."""
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        fallback = ids.argmax(dim=-1)
        if self.eos_token_id is None:
            return fallback
        is_eos = ids == int(self.eos_token_id)
        first = is_eos.int().argmax(dim=-1)
        return torch.where(is_eos.any(dim=-1), first, fallback)

    def encode_text(self, texts: TextInput, normalize: bool = True) -> torch.Tensor:
        """Text features [N, D] of strings or of token ids [N, T] (what transformers'
        ``get_text_features`` gives). Runs only up to the longest prompt's EOS (exact: causal)."""
        if isinstance(texts, torch.Tensor):
            ids = texts.to(self.device)
            if ids.ndim == 1:
                ids = ids[None]
        else:
            ids = self.tokenize(texts)
        eos = self.eos_positions(ids)
        t = int(eos.max().item()) + 1 if len(eos) else 1
        return self.encode_text_embeddings(self.token_embedding(ids[:, :t]), eos, normalize=normalize)

    def _check_embeds(self, embeds: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
        if embeds.ndim != 3 or embeds.shape[-1] != self.text_width:
            raise IPShieldError(f"prompt embeddings must be [N, T, {self.text_width}], got {tuple(embeds.shape)}",
                                "build them with token_embedding(input_ids) (plus learned context vectors)")
        n, t, _ = embeds.shape
        if t > self.context_length:
            raise IPShieldError(f"prompt length {t} exceeds the model's context length {self.context_length}",
                                "use fewer context tokens or shorter class names")
        eos = torch.as_tensor(eos_positions, device=embeds.device).long().reshape(-1)
        if eos.shape[0] != n:
            raise IPShieldError(f"{eos.shape[0]} EOS positions for {n} prompts", "give one EOS position per prompt")
        if n and (int(eos.min()) < 0 or int(eos.max()) >= t):
            raise IPShieldError(f"EOS positions must lie in [0, {t}), got {eos.min().item()}..{eos.max().item()}",
                                "truncate the prompts after their EOS token, not before")
        return eos

    # ------------------------------------------------------------------ backend: transformers
    def _vision_forward(self, pixels: torch.Tensor, keep_layers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        vm = self.model.vision_model
        h = vm.embeddings(pixels.to(device=self.device, dtype=self.dtype))
        h = vm.pre_layrnorm(h)
        layers: list[torch.Tensor] = []
        for block in vm.encoder.layers:
            out = block(h, None)
            h = out[0] if isinstance(out, tuple) else out
            if keep_layers:
                layers.append(h)
        pooled = vm.post_layernorm(h[:, 0, :])
        return self.model.visual_projection(pooled), layers

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] (LongTensor on the adapter's device): BOS, tokens, EOS,
        padding. Prompts longer than the context are truncated (the EOS is kept)."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")
        return out["input_ids"].long().to(self.device)

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, T, text_width] (no position embedding)."""
        return self.model.text_model.embeddings.token_embedding(torch.as_tensor(input_ids, device=self.device).long())

    def encode_text_embeddings(self, embeds: torch.Tensor, eos_positions: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The text tower on token embeddings [N, T', text_width] (T' <= context_length): adds the
        position embeddings, runs the causal transformer, final layer norm, pools at
        ``eos_positions`` [N], projects to [N, embed_dim]."""
        from transformers.masking_utils import create_causal_mask

        eos = self._check_embeds(embeds, eos_positions)
        tm = self.model.text_model
        n, t, _ = embeds.shape
        h = embeds.to(self.dtype) + tm.embeddings.position_embedding.weight[:t].unsqueeze(0)
        mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, past_key_values=None)
        h = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = tm.final_layer_norm(h)
        pooled = h[torch.arange(n, device=h.device), eos]
        feats = self.model.text_projection(pooled)
        return _l2(feats) if normalize else feats


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
        from ipshield.models.openclip_adapter import load_openclip

        return load_openclip(path, device=dev, dtype=dtype, frozen=frozen, **options)
    raise IPShieldError(f"unknown CLIP backend '{backend}'", "use backend='hf' (transformers) or 'open_clip'")
