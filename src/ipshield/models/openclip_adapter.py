"""open_clip as an optional CLIP backend, behind the same interface as the Hugging Face one.

open_clip needs torchvision, which must never be installed on this project's CPU path, so the
package is imported lazily and a clear error says how to get it. Only local files are read:

- a folder in open_clip's hub layout: ``open_clip_config.json`` ({"model_cfg": ..., "preprocess_cfg": ...})
  + ``open_clip_model.safetensors``; or
- a ``.safetensors`` file (or a folder holding one) with ``model_name="ViT-B-16"`` (an open_clip
  architecture name; its config ships with open_clip, nothing is downloaded).

Only OpenAI-style ViT CLIPs with an argmax-pooled causal text tower are supported (the ones
prompt learning is defined for); other towers (ResNet, timm, Hugging Face text encoders, CoCa)
raise ``CheckpointError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ipshield.errors import CheckpointError, IPShieldError
from ipshield.models.common import OPENAI_MEAN, OPENAI_STD, CLIPAdapter, l2_normalise

_INSTALL_FIX = ("pip install ipshield[openclip] on a machine with torchvision (a CUDA machine: install the CUDA "
                "torch first); on the CPU-only path use backend='hf' with a Hugging Face CLIP folder")

_OC_HINT = ("give an open_clip folder (open_clip_config.json + open_clip_model.safetensors) or a .safetensors "
            "file with model_name=<open_clip architecture, e.g. ViT-B-16>")


def _import_open_clip():
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        raise IPShieldError(f"the open_clip backend needs the open_clip package, which is not installed ({exc})",
                            _INSTALL_FIX) from None
    return open_clip


class OpenCLIPAdapter(CLIPAdapter):
    """The CLIP adapter over an open_clip ``CLIP`` / ``CustomTextCLIP`` model (ViT, argmax pooling)."""

    backend = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, path: str | Path | None = None, frozen: bool = True,
                 eos_token_id: int | None = None):
        nn.Module.__init__(self)  # CLIPAdapter.__init__ reads a transformers config; set everything here
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path) if path is not None else None
        visual = model.visual
        if not (hasattr(visual, "conv1") and hasattr(visual, "transformer") and hasattr(visual, "class_embedding")):
            raise CheckpointError(f"the open_clip model's image tower is a {type(visual).__name__}, not a ViT",
                                  "use a ViT CLIP (ViT-B-32, ViT-B-16, ViT-L-14, ...)")
        text = getattr(model, "text", model)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(text, a) for a in needed) or getattr(text, "cls_emb", None) is not None:
            raise CheckpointError(f"the open_clip model's text tower ({type(text).__name__}) is not an OpenAI-style "
                                  "causal transformer", "use a CLIP with open_clip's own text transformer")
        pool = getattr(model, "text_pool_type", None) or getattr(text, "pool_type", None) or "argmax"
        if pool != "argmax":
            raise CheckpointError(f"the open_clip text tower pools with '{pool}', not at the EOS token (argmax)",
                                  "use an OpenAI-style CLIP (text_pool_type 'argmax')")
        self._visual = visual
        self._text = text
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = visual.patch_size if hasattr(visual, "patch_size") else visual.conv1.kernel_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.vision_width = int(visual.conv1.out_channels)
        self.vision_layers = len(visual.transformer.resblocks)
        attn = getattr(visual.transformer.resblocks[0], "attn", None)
        self.vision_heads = int(getattr(attn, "num_heads", max(1, self.vision_width // 64)))
        self.num_image_tokens = (self.image_size // self.patch_size) ** 2 + 1
        self.text_width = int(text.token_embedding.embedding_dim)
        self.text_layers = len(text.transformer.resblocks)
        self.context_length = int(text.positional_embedding.shape[0])
        self.vocab_size = int(text.token_embedding.num_embeddings)
        proj = text.text_projection
        self.embed_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        # argmax pooling: the EOS is the highest id of each sequence (see eos_positions)
        self.bos_token_id = None
        self.eos_token_id = eos_token_id
        self.pad_token_id = 0
        self._init_pixel_stats(image_mean, image_std)
        self.frozen = False
        if frozen:
            self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        return self._visual.conv1.weight.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def _vision_forward(self, pixels: torch.Tensor, keep_layers: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        outputs: list[torch.Tensor] = []
        handles = []
        if keep_layers:
            batch_first = bool(getattr(self._visual.transformer, "batch_first", False))

            def hook(_module, _inp, out):
                out = out[0] if isinstance(out, tuple) else out
                outputs.append(out if batch_first else out.transpose(0, 1))

            handles = [blk.register_forward_hook(hook) for blk in self._visual.transformer.resblocks]
        try:
            feats = self.model.encode_image(pixels, normalize=False)
        finally:
            for h in handles:
                h.remove()
        return feats, outputs

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's rule: the position of the highest id (the end-of-text token) of each row."""
        ids = torch.as_tensor(input_ids)
        return (ids[None] if ids.ndim == 1 else ids).argmax(dim=-1)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer(list(texts), context_length=self.context_length)
        return torch.as_tensor(ids).long().to(self.device)

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text.token_embedding(torch.as_tensor(input_ids, device=self.device).long())

    def encode_text_embeddings(self, embeds: torch.Tensor, eos_positions: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        eos = self._check_embeds(embeds, eos_positions)
        text = self._text
        n, t, _ = embeds.shape
        x = embeds.to(self.dtype) + text.positional_embedding[:t].to(self.dtype)
        mask = getattr(text, "attn_mask", None)
        if mask is None:
            mask = torch.full((t, t), float("-inf"), device=x.device).triu_(1)
        mask = mask[:t, :t].to(device=x.device)
        transformer = text.transformer
        if hasattr(transformer, "batch_first"):  # open_clip >= 2.23 takes [N, T, W] and transposes itself
            x = transformer(x, attn_mask=mask)
        else:  # older open_clip: the caller passes [T, N, W]
            x = transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = text.ln_final(x)
        pooled = x[torch.arange(n, device=x.device), eos]
        proj = text.text_projection
        feats = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return l2_normalise(feats) if normalize else feats


def _load_weights(model: nn.Module, weights: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})", _OC_HINT) from None
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    expected = model.state_dict()
    wrong = [f"{k} {list(v.shape)} (expected {list(expected[k].shape)})" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in result.missing_keys if k != "attn_mask"]
    if wrong or missing:
        raise CheckpointError(f"the weights in {weights} do not match the architecture "
                              f"({'wrong shapes: ' + ', '.join(wrong[:3]) if wrong else ''}"
                              f"{'; ' if wrong and missing else ''}"
                              f"{'missing: ' + ', '.join(missing[:3]) if missing else ''})",
                              "give the model_name / open_clip_config.json these weights were saved with")


def load_openclip(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  frozen: bool = True, model_name: str | None = None) -> OpenCLIPAdapter:
    """Load a local open_clip checkpoint as a :class:`OpenCLIPAdapter` (see the module docstring)."""
    open_clip = _import_open_clip()
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"open_clip checkpoint {p} does not exist", _OC_HINT)
    cfg_path = p / "open_clip_config.json" if p.is_dir() else None
    mean = std = None
    if cfg_path is not None and cfg_path.is_file() and model_name is None:
        try:
            cfg = json.loads(cfg_path.read_text())
            model_cfg = dict(cfg["model_cfg"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{cfg_path} is not a valid open_clip config ({exc})", _OC_HINT) from None
        if "multimodal_cfg" in model_cfg:
            raise CheckpointError("CoCa models are not supported", "use a plain CLIP")
        custom_text = bool(model_cfg.pop("custom_text", False))
        text_cfg = model_cfg.get("text_cfg") or {}
        if text_cfg.get("hf_model_name"):
            raise CheckpointError(f"{p} uses a Hugging Face text encoder ({text_cfg['hf_model_name']})",
                                  "use a CLIP with open_clip's own (causal, argmax-pooled) text transformer")
        try:
            cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
            model = cls(**model_cfg)
        except Exception as exc:
            raise CheckpointError(f"could not build the model of {cfg_path} ({exc})", _OC_HINT) from None
        pre = cfg.get("preprocess_cfg") or {}
        mean, std = pre.get("mean"), pre.get("std")
        tok_name = text_cfg.get("hf_tokenizer_name")
        if tok_name and not Path(tok_name).is_dir():
            raise CheckpointError(f"{p} needs the Hugging Face tokenizer '{tok_name}', which would be downloaded",
                                  "give a local tokenizer folder in text_cfg.hf_tokenizer_name")
        if tok_name:
            tokenizer = open_clip.tokenizer.HFTokenizer(tok_name)
        else:
            def tokenizer(texts, context_length=77):
                return open_clip.tokenize(texts, context_length=context_length)
        weights = next((p / n for n in ("open_clip_model.safetensors", "model.safetensors") if (p / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{p} has no open_clip_model.safetensors (weights are loaded only from safetensors)",
                                  _OC_HINT)
    else:
        if model_name is None:
            raise CheckpointError(f"{p} has no open_clip_config.json and no model_name was given", _OC_HINT)
        if p.is_dir():
            cands = sorted(p.glob("*.safetensors"))
            if len(cands) != 1:
                raise CheckpointError(f"{p} holds {len(cands)} .safetensors files", "give the path of the weight file")
            weights = cands[0]
        elif p.suffix == ".safetensors":
            weights = p
        else:
            raise CheckpointError(f"{p} is not a .safetensors file (pickled checkpoints are not loaded)",
                                  "convert it to safetensors on a machine you trust")
        try:
            model = open_clip.create_model(model_name, pretrained=None)
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:
            raise CheckpointError(f"unknown or unusable open_clip architecture '{model_name}' ({exc})",
                                  "see open_clip.list_models() for the names") from None
        mean = getattr(model.visual, "image_mean", None)
        std = getattr(model.visual, "image_std", None)
    _load_weights(model, weights)
    if dtype is not None:
        model = model.to(dtype)
    eot = getattr(getattr(tokenizer, "tokenizer", tokenizer), "eot_token_id", None)
    adapter = OpenCLIPAdapter(model, tokenizer, image_mean=mean or OPENAI_MEAN, image_std=std or OPENAI_STD,
                              path=p, frozen=frozen, eos_token_id=eot)
    return adapter.to(device)
