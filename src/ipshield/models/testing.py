"""Random-weight CLIP checkpoints for tests: an ordinary Hugging Face CLIP folder of any ViT shape
(e.g. ViT-B/16: 12 x 768, patch 16, 224 px; text 12 x 512; embed 512), built from a config and a
random initialisation (nothing is downloaded), with a small word-level tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

#: a few words for the test tokenizer: the digit class names and the usual prompt words
DEFAULT_WORDS = (
    "a photo of the digit number handwritten picture drawing written an image this is . , "
    "zero one two three four five six seven eight nine x"
).split()


def make_random_clip(out_dir: str | Path, vision_layers: int = 12, vision_width: int = 768, patch: int = 16,
                     image_size: int = 224, text_layers: int = 12, text_width: int = 512, embed_dim: int = 512,
                     vision_heads: int | None = None, text_heads: int | None = None, context_length: int = 77,
                     words: Iterable[str] | None = None, seed: int = 0,
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) -> Path:
    """Write a random-weight CLIP (config.json, model.safetensors, tokenizer, preprocessor config)
    to ``out_dir`` and return the path. Defaults: the ViT-B/16 shape. Loadable with ``load_clip``."""
    import torch
    from transformers import CLIPModel

    from ipshield.models.clip import quiet_transformers
    from ipshield.models.tiny_clip import build_tokenizer, clip_config, save_preprocessor_config, save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(list(words) if words is not None else DEFAULT_WORDS)
    cfg = clip_config(tok.get_vocab_size(), vision_layers=vision_layers, vision_width=vision_width,
                      vision_heads=vision_heads, patch=patch, image_size=image_size, text_layers=text_layers,
                      text_width=text_width, text_heads=text_heads, embed_dim=embed_dim, context_length=context_length)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tok, out, context_length)
    save_preprocessor_config(out, image_size, image_mean, image_std)
    return out
