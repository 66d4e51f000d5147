"""The backend-independent part of the CLIP adapter: OpenAI's pixel statistics,
:func:`l2_normalise` and the :class:`CLIPAdapter` class (whose default implementation is the
Hugging Face ``transformers`` backend; ``ipshield.models.openclip_adapter`` subclasses it).

This module imports nothing else of ``ipshield.models``, so both backends can build on it without
an import circle: ``ipshield.models.clip`` (the loaders, ``load_clip``) and
``ipshield.models.openclip_adapter`` import from here, and ``clip`` imports ``openclip_adapter``.
Every name is also importable from ``ipshield.models.clip``, its historical home. See that
module's docstring for what the methods need from CLIP.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ipshield.errors import IPShieldError

#: OpenAI CLIP's pixel statistics, used when a checkpoint has no preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TextInput = str | Sequence[str] | torch.Tensor


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along its last dimension (CLIP's feature normalisation)."""
    return F.normalize(x, dim=-1)


_l2 = l2_normalise  # the former private name, kept for callers that still use it


@functools.cache
def _mask_cache_kwarg() -> str:
    """The name under which ``transformers.masking_utils.create_causal_mask`` takes the KV cache:
    ``cache`` in current transformers, ``past_key_values`` in the early 5.x releases (deprecated
    since, to be removed in 5.40). ``inspect.signature`` follows the deprecation wrapper."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    return "cache" if "cache" in params else "past_key_values"


def causal_text_mask(config, inputs_embeds: torch.Tensor):
    """The causal attention mask transformers' CLIP text model builds for an unpadded batch and no
    cache (what ``CLIPTextTransformer.forward`` passes to its encoder), for the installed version."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=None,
                              **{_mask_cache_kwarg(): None})


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
        tower (S = ``image_size``): ``ipshield.data.transforms.resize_crop`` (shorter side resized
        to S, bicubic, anti-aliased when shrinking, clamped to [0, 1]; centre crop), the same
        function ``ImageSplit.to_tensor(S)`` uses, then (x - mean) / std. Differentiable."""
        from ipshield.data.transforms import resize_crop

        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise IPShieldError(f"images must be [B, 3, H, W], got {tuple(x.shape)}", "pass RGB batches in [0, 1]")
        x = x.to(device=self.device, dtype=torch.float32)
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = resize_crop(x, s)
        return ((x - self._mean) / self._std).to(self.dtype)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features [B, D] from preprocessed pixels (transformers' ``get_image_features``)."""
        feats, _ = self._vision_forward(pixels, keep_layers=False)
        return l2_normalise(feats) if normalize else feats

    def encode_image_with_layers(self, pixels: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(features [B, D], the output tokens of every visual block: ``vision_layers`` tensors
        [B, T, W] with T = ``num_image_tokens`` (class token first), W = ``vision_width``)."""
        feats, layers = self._vision_forward(pixels, keep_layers=True)
        return (l2_normalise(feats) if normalize else feats), layers

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

    def unknown_tokens(self, text: str) -> tuple[int, list[str]]:
        """(the number of tokens of ``text``, BOS / EOS left out; the pieces of ``text`` the
        tokenizer maps to its unknown token). A word-level vocabulary (the small CLIP's) maps every
        word it has not seen to the unknown token; a tokenizer without one (CLIP's byte-level BPE
        reads any text; open_clip's) gives ``(n, [])``, or ``(0, [])`` when it cannot be asked."""
        tok = self.tokenizer
        if getattr(tok, "unk_token_id", None) is None:  # open_clip's HFTokenizer wraps a transformers one
            tok = getattr(tok, "tokenizer", tok)
        unk = getattr(tok, "unk_token_id", None)
        if unk is None or not callable(tok):
            return 0, []
        fast = bool(getattr(tok, "is_fast", False))
        try:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=fast)
        except Exception:  # noqa: BLE001 (a tokenizer that cannot be asked this way: no verdict)
            return 0, []
        ids = list(enc["input_ids"])
        spans = list(enc["offset_mapping"]) if fast else [None] * len(ids)
        pieces = [text[s[0]:s[1]] if s is not None else "<unk>" for i, s in zip(ids, spans) if i == unk]
        return len(ids), pieces

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, T, text_width] (no position embedding)."""
        return self.model.text_model.embeddings.token_embedding(torch.as_tensor(input_ids, device=self.device).long())

    def encode_text_embeddings(self, embeds: torch.Tensor, eos_positions: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The text tower on token embeddings [N, T', text_width] (T' <= context_length): adds the
        position embeddings, runs the causal transformer, final layer norm, pools at
        ``eos_positions`` [N], projects to [N, embed_dim]."""
        eos = self._check_embeds(embeds, eos_positions)
        tm = self.model.text_model
        n, t, _ = embeds.shape
        h = embeds.to(self.dtype) + tm.embeddings.position_embedding.weight[:t].unsqueeze(0)
        mask = causal_text_mask(tm.config, h)
        h = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = tm.final_layer_norm(h)
        pooled = h[torch.arange(n, device=h.device), eos]
        feats = self.model.text_projection(pooled)
        return l2_normalise(feats) if normalize else feats
