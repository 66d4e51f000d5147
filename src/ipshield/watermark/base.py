"""What both embedding watermarks (VLPMarker, EmbMarker) share.

An *embedder* is anything with ``embed_images(images [B,3,H,W] in [0,1]) -> [B,D]`` and
``embed_texts(list[str]) -> [N,D]``: the clean service (:class:`CleanEncoder`), the watermarked
service (``WatermarkedEncoder``), a suspect (``ipshield.watermark.verify.Suspect``), a stolen
student. Everything here takes embedders, so it works the same on a local model and on a remote
API.

A *reference sample* (:class:`ReferenceSample`) is a set of ordinary inputs of the service (images
and captions): the triggers are chosen far from it, the distribution test probes with it, and the
utility check measures on it. ``reference_from_synthetic`` builds one from the built-in domains.

A watermark folder (``ipshield watermark apply``) holds ``watermark.json`` (scheme, config,
key fingerprint, embedding size; nothing secret) and the secret parts in safetensors files with mode
600. ``load_watermark(folder, key)`` reads any scheme registered in ``WATERMARKS``; what a scheme
class provides is :class:`WatermarkScheme`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ipshield.errors import CheckpointError, IPShieldError

WATERMARK_FORMAT = "ipshield-watermark"


class Embedder(Protocol):
    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


class WatermarkScheme(Protocol):
    """The contract of a watermark scheme: the class registered in ``WATERMARKS`` with
    ``@WATERMARKS.register(name, config=..., tests=(...), needs_texts=...)`` (its ``SchemeSpec``:
    the config class, the names of the verification tests it declares, whether its service needs
    the texts, not only the vectors). The methods below are what the jobs (apply, verify,
    calibrate), the service and the verification call; ``scheme`` is the registered name."""

    scheme: str
    dim: int

    @property
    def key_id(self) -> str: ...

    @classmethod
    def fit(cls, adapter, key, reference: "ReferenceSample", config=None, verbose: bool = False) -> "WatermarkScheme": ...

    @classmethod
    def load(cls, folder: str | Path, key) -> "WatermarkScheme": ...

    def save(self, folder: str | Path) -> Path: ...

    def postprocessors(self, customer_id: str): ...

    def encoder(self, adapter, customer_id: str, batch_size: int = 256) -> Embedder: ...

    def trigger_queries_for(self, customers: Sequence[str], n_pairs: int) -> dict: ...

    def trigger_test(self, plan: dict, img_emb: torch.Tensor, txt_emb: torch.Tensor, customer_id: str): ...

    def transform(self, customer_id: str) -> torch.Tensor | None: ...


#: the methods every scheme class has (``WatermarkScheme``; checked by the tests for every entry)
SCHEME_METHODS = ("fit", "load", "save", "postprocessors", "encoder", "trigger_queries_for", "trigger_test", "transform")


@dataclass
class ReferenceSample:
    """Ordinary inputs of the service: images [N,3,H,W] in [0,1] and captions (any number)."""

    images: torch.Tensor
    texts: list[str]

    def __repr__(self) -> str:
        return f"ReferenceSample(images={len(self.images)}, texts={len(self.texts)})"

    def split(self, n_images: int, n_texts: int, offset: int = 0) -> "ReferenceSample":
        return ReferenceSample(self.images[offset:offset + n_images], self.texts[offset:offset + n_texts])


def reference_from_synthetic(n: int = 600, seed: int = 1, split: str = "test", size: int = 32) -> ReferenceSample:
    """``n`` images spread over every synthetic style, with one caption each (``caption``)."""
    from ipshield.data.synthetic import STYLES, caption, image_attrs, load_synthetic

    per = max(1, -(-n // len(STYLES)))
    doms = load_synthetic(n_train=max(per, 200), n_test=max(per, 100), seed=seed, size=size)
    rng = np.random.default_rng(seed)
    imgs, texts = [], []
    for style, d in doms.items():
        sp = d.test if split == "test" else d.train
        idx = rng.choice(len(sp), size=min(per, len(sp)), replace=False)
        imgs.append(sp.subset(idx).to_tensor(size))
        for i in idx:
            try:
                attrs = image_attrs(d, split, int(i))
            except Exception:  # attrs are optional
                attrs = None
            texts.append(caption(int(sp.labels[i]), style, rng, attrs=attrs))
    images = torch.cat(imgs)
    order = torch.from_numpy(rng.permutation(len(images)))
    images = images[order][:n]
    texts = [texts[i] for i in order.tolist()][:n]
    return ReferenceSample(images, texts)


@torch.no_grad()
def embed_in_batches(fn, items, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(items), batch_size):
        out.append(fn(items[i:i + batch_size]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


class CleanEncoder:
    """The unwatermarked service: normalised CLIP embeddings of a ``CLIPAdapter``."""

    def __init__(self, adapter, batch_size: int = 256):
        self.adapter = adapter
        self.batch_size = batch_size
        self.embed_dim = int(adapter.embed_dim)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        return embed_in_batches(lambda x: a.encode_image(a.preprocess(x), normalize=True), images, self.batch_size)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        a = self.adapter
        return embed_in_batches(lambda t: a.encode_text(list(t), normalize=True), list(texts), self.batch_size)

    def __repr__(self) -> str:
        return f"CleanEncoder(dim={self.embed_dim})"


# ------------------------------------------------------------------------------ utility
ZERO_SHOT_TEMPLATE = "a photo of the digit {}"


@torch.no_grad()
def zero_shot_accuracy(embedder: Embedder, domains: dict, template: str = ZERO_SHOT_TEMPLATE, size: int = 32,
                       max_images: int | None = None) -> dict[str, float]:
    """Zero-shot top-1 accuracy (percent) of an embedder on each domain's test split: the class
    whose prompt embedding has the highest cosine with the image embedding."""
    out = {}
    for name, d in domains.items():
        txt = F.normalize(embedder.embed_texts([template.format(c) for c in d.classes]).float(), dim=-1)
        sp = d.test if max_images is None else d.test.subset(range(min(max_images, len(d.test))))
        img = F.normalize(embedder.embed_images(sp.to_tensor(size)).float(), dim=-1)
        pred = (img @ txt.T).argmax(-1).numpy()
        out[name] = float((pred == sp.labels).mean() * 100.0)
    return out


# ------------------------------------------------------------------------------ folders
def write_watermark_json(folder: Path, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "watermark.json").write_text(json.dumps({"format": WATERMARK_FORMAT, **data}, indent=2) + "\n")


def read_watermark_json(folder: str | Path) -> dict:
    p = Path(folder).expanduser()
    f = p / "watermark.json"
    if not f.is_file():
        raise CheckpointError(f"{p} is not a watermark folder (no watermark.json)",
                              "give the folder written by `ipshield watermark apply`")
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{f} is not readable JSON", "re-create it with `ipshield watermark apply`") from None
    if data.get("format") != WATERMARK_FORMAT:
        raise CheckpointError(f"{f} is not an ipshield watermark description", "give the folder written by `ipshield watermark apply`")
    return data


def load_watermark(folder: str | Path, key):
    """Load a watermark folder of any registered scheme with the owner's ``MasterKey`` (or the path
    of the key file). The key must be the one the watermark was made with."""
    from ipshield.registry import WATERMARKS
    from ipshield.watermark.keys import MasterKey

    data = read_watermark_json(folder)
    if not isinstance(key, MasterKey):
        key = MasterKey.load(key)
    if data.get("key_id") != key.key_id:
        raise IPShieldError("the key does not belong to this watermark (fingerprints differ)",
                            "use the key file the watermark was made with (`ipshield watermark apply --key ...`)")
    key.check_dim(int(data["dim"]), "the watermark")
    scheme = WATERMARKS.get(data["scheme"]).obj
    return scheme.load(folder, key)
