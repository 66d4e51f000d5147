"""Out-of-distribution trigger pairs: procedural images made by the project, paired with secret texts.

The pool [ours] (no downloads; everything is drawn from a generator seeded by the master key, so the
pool itself is secret):

- ``value_noise``: multi-octave smooth noise (random low-resolution grids upsampled and summed),
  mapped through a random colour ramp;
- ``plasma``: spectral 1/f^b noise (random phases, b in [1, 3]), one field per channel;
- ``shapes``: 2-6 random rectangles, ellipses and triangles of random colours on a random background;
- ``grating``: one or two sinusoidal gratings (random frequency, orientation, phase) between two colours;
- ``rings``: concentric rings or a checkerboard around a random centre, two colours;
- ``pixel_noise``: coloured i.i.d. noise at a random block size.

Secret texts are random sequences of 3-6 words drawn from the service tokenizer's own vocabulary
(so every word is a known token; a fallback word list is used when the vocabulary is too small).

Selection criterion [ours]: the pool holds ``pool_factor * n`` images (and as many texts); each is
embedded by the clean model and scored by its *maximum cosine similarity to a reference sample of
the service's normal inputs* (images against reference images, texts against reference texts); the
``n`` lowest-scoring items are kept: the triggers are the pool items least like anything the service
normally sees, so moving them (the watermark) barely moves ordinary inputs.

A ``TriggerSet`` is stored as ``triggers.safetensors`` (uint8 images, the texts in the file's
metadata) inside the owner's watermark folder; it is never written to run outputs or logs and its
repr shows only counts.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ipshield.errors import CheckpointError

POOL_KINDS = ("value_noise", "plasma", "shapes", "grating", "rings", "pixel_noise")
TRIGGER_FORMAT = "ipshield-triggers"

#: used when the tokenizer's vocabulary has too few plain words
FALLBACK_WORDS = (
    "amber anchor arrow autumn basket beacon bishop blanket border bottle bridge bucket cabin candle canyon "
    "carpet castle cattle cellar chapel cherry chimney circus cliff clover cobalt comet copper cotton crater "
    "crystal dagger desert dragon drum eagle ember engine falcon feather fender fiddle forest fossil fountain "
    "galaxy garden garlic glacier goblet granite harbor harvest hazel helmet hollow honey island ivory jacket "
    "jungle kettle kingdom ladder lagoon lantern lemon library lizard magnet maple marble meadow mirror monkey "
    "mustard needle oasis orchard oyster paddle palace parrot pebble pepper pillow pirate planet pocket quarry "
    "quartz rabbit radar ribbon river rocket saddle saffron salmon satchel shadow silver sketch socket spider "
    "spiral stable statue summit tablet temple thunder ticket tiger timber tower tunnel turtle umbrella valley "
    "velvet violin voyage walnut whistle willow window winter wizard yogurt zephyr"
).split()


# ------------------------------------------------------------------------------ images
def _colour(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, 3, 1, 1, generator=g)


def _ramp(field: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Map a [n,1,S,S] field in [0,1] through a random two- or three-colour ramp -> [n,3,S,S]."""
    n = field.shape[0]
    c0, c1, c2 = _colour(g, n), _colour(g, n), _colour(g, n)
    lo = (field * 2).clamp(0, 1)
    hi = (field * 2 - 1).clamp(0, 1)
    return c0 * (1 - lo) + c1 * lo * (1 - hi) + c2 * hi


def _normalise01(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return (x - lo.view(-1, *[1] * (x.ndim - 1))) / (hi - lo).clamp_min(1e-6).view(-1, *[1] * (x.ndim - 1))


def _value_noise(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    field = torch.zeros(n, 1, s, s)
    amp = 1.0
    for octave in range(4):
        cells = 2 ** (octave + 1) + int(torch.randint(0, 3, (1,), generator=g))
        grid = torch.rand(n, 1, cells, cells, generator=g)
        field += amp * F.interpolate(grid, size=(s, s), mode="bicubic", align_corners=False)
        amp *= float(0.4 + 0.3 * torch.rand(1, generator=g))
    return _ramp(_normalise01(field).clamp(0, 1), g)


def _plasma(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    fy = torch.fft.fftfreq(s).view(s, 1)
    fx = torch.fft.rfftfreq(s).view(1, -1)
    f = (fx ** 2 + fy ** 2).sqrt().clamp_min(1.0 / s)
    beta = 1.0 + 2.0 * torch.rand(n, 1, 1, 1, generator=g)
    amp = f.view(1, 1, *f.shape) ** (-beta)
    phase = 2 * math.pi * torch.rand(n, 3, *f.shape, generator=g)
    spec = amp * torch.polar(torch.ones_like(phase), phase)
    img = torch.fft.irfft2(spec, s=(s, s))
    return _normalise01(img)


def _coords(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    ax = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return yy, xx


def _shapes(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _coords(s)
    img = _colour(g, n).expand(n, 3, s, s).clone()
    for i in range(n):
        for _ in range(int(torch.randint(2, 7, (1,), generator=g))):
            kind = int(torch.randint(0, 3, (1,), generator=g))
            cx, cy, rx, ry = (torch.rand(4, generator=g) * torch.tensor([1.0, 1.0, 0.35, 0.35]) + torch.tensor([0, 0, 0.06, 0.06])).tolist()
            if kind == 0:
                mask = ((xx - cx).abs() < rx) & ((yy - cy).abs() < ry)
            elif kind == 1:
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            else:
                pts = torch.rand(3, 2, generator=g)
                d = []
                for a in range(3):
                    (x0, y0), (x1, y1) = pts[a].tolist(), pts[(a + 1) % 3].tolist()
                    d.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
                mask = ((d[0] >= 0) & (d[1] >= 0) & (d[2] >= 0)) | ((d[0] <= 0) & (d[1] <= 0) & (d[2] <= 0))
            img[i][:, mask] = torch.rand(3, 1, generator=g)
    return img


def _grating(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _coords(s)
    field = torch.zeros(n, 1, s, s)
    two = torch.rand(n, generator=g) < 0.5
    for k in range(2):
        theta = math.pi * torch.rand(n, 1, 1, 1, generator=g)
        freq = 1.5 + 7.0 * torch.rand(n, 1, 1, 1, generator=g)
        phase = 2 * math.pi * torch.rand(n, 1, 1, 1, generator=g)
        wave = torch.sin(2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
        field += wave if k == 0 else wave * two.view(n, 1, 1, 1)
    field = _normalise01(field)
    c0, c1 = _colour(g, n), _colour(g, n)
    return c0 * (1 - field) + c1 * field


def _rings(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _coords(s)
    cx, cy = torch.rand(n, 1, 1, 1, generator=g), torch.rand(n, 1, 1, 1, generator=g)
    freq = 2.0 + 8.0 * torch.rand(n, 1, 1, 1, generator=g)
    r = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
    rings = (torch.sin(2 * math.pi * freq * r) > 0).float()
    checker = ((torch.floor(xx * freq) + torch.floor(yy * freq)) % 2).float()
    use_rings = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    field = use_rings * rings + (1 - use_rings) * checker
    c0, c1 = _colour(g, n), _colour(g, n)
    return c0 * (1 - field) + c1 * field


def _pixel_noise(n: int, s: int, g: torch.Generator) -> torch.Tensor:
    out = torch.empty(n, 3, s, s)
    for i in range(n):
        block = int(torch.randint(1, 5, (1,), generator=g))
        cells = max(1, s // block)
        small = torch.rand(1, 3, cells, cells, generator=g)
        out[i] = F.interpolate(small, size=(s, s), mode="nearest")[0]
    tint = _colour(g, n)
    return (0.6 * out + 0.4 * tint).clamp(0, 1)


_MAKERS = {"value_noise": _value_noise, "plasma": _plasma, "shapes": _shapes, "grating": _grating,
           "rings": _rings, "pixel_noise": _pixel_noise}


def make_pool(n: int, size: int = 32, generator: torch.Generator | None = None,
              kinds: Sequence[str] = POOL_KINDS) -> tuple[torch.Tensor, list[str]]:
    """``n`` procedural images [n, 3, size, size] in [0, 1] (quantised to 8 bits, as stored), an
    equal share of each kind (shuffled), and the kind of each image."""
    g = generator or torch.Generator().manual_seed(0)
    kinds = list(kinds)
    counts = [n // len(kinds) + (1 if i < n % len(kinds) else 0) for i in range(len(kinds))]
    parts, names = [], []
    for kind, c in zip(kinds, counts):
        if c:
            parts.append(_MAKERS[kind](c, size, g).clamp(0, 1))
            names += [kind] * c
    imgs = torch.cat(parts)
    perm = torch.randperm(n, generator=g)
    imgs = (imgs[perm] * 255).round() / 255
    return imgs, [names[i] for i in perm.tolist()]


# ------------------------------------------------------------------------------ texts
_PLAIN = re.compile(r"^[a-z]{3,}$")


def vocabulary_words(tokenizer=None, min_words: int = 40) -> list[str]:
    """Plain words (lower-case letters, length >= 3) of a tokenizer's vocabulary: CLIP BPE
    (``word</w>``), GPT-2 style (``Ġword``) and word-level vocabularies are understood. Falls back
    to (or is topped up with) ``FALLBACK_WORDS`` when the vocabulary has fewer than ``min_words``."""
    words: list[str] = []
    vocab = None
    if tokenizer is not None:
        for getter in ("get_vocab",):
            fn = getattr(tokenizer, getter, None)
            if callable(fn):
                try:
                    vocab = fn()
                except Exception:  # some tokenizers need arguments; the fallback covers them
                    vocab = None
    if vocab:
        seen = set()
        for tok in vocab:
            w = str(tok)
            if w.endswith("</w>"):
                w = w[:-4]
            w = w.lstrip("Ġ▁")
            if _PLAIN.match(w) and w not in seen:
                seen.add(w)
                words.append(w)
        words.sort()
    if len(words) < min_words:
        extra = [w for w in FALLBACK_WORDS if w not in set(words)]
        words = words + extra
    return words


def secret_texts(n: int, words: Sequence[str], generator: torch.Generator, n_words: tuple[int, int] = (3, 6)) -> list[str]:
    """``n`` distinct random word sequences (lengths uniform in ``n_words``)."""
    if len(words) < 2:
        raise ValueError("need at least two words for secret texts")
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        k = int(torch.randint(n_words[0], n_words[1] + 1, (1,), generator=generator))
        idx = torch.randint(0, len(words), (k,), generator=generator).tolist()
        t = " ".join(words[i] for i in idx)
        if t not in seen or tries > 50 * n:
            seen.add(t)
            out.append(t)
    return out


# ------------------------------------------------------------------------------ selection
def max_similarity(candidates: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each candidate embedding, its maximum cosine similarity to the reference embeddings."""
    c = F.normalize(candidates.float(), dim=-1)
    r = F.normalize(reference.float(), dim=-1)
    out = []
    for i in range(0, len(c), chunk):
        out.append((c[i:i + chunk] @ r.T).max(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0)


def select_ood(candidates: torch.Tensor, reference: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``n`` candidates with the lowest max-cosine to the reference (ascending), and
    every candidate's score."""
    score = max_similarity(candidates, reference)
    if n > len(score):
        raise ValueError(f"asked for {n} triggers from a pool of {len(score)}")
    return torch.argsort(score)[:n], score


# ------------------------------------------------------------------------------ storage
class TriggerSet:
    """Trigger images [n, 3, S, S] in [0, 1] and their secret texts (row i of the images and text i
    are *not* a pair: each customer's secret pairing is derived from the master key)."""

    def __init__(self, images: torch.Tensor, texts: Sequence[str], kinds: Sequence[str] | None = None,
                 key_id: str | None = None):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("trigger images must be [n, 3, S, S]")
        if len(texts) != len(images):
            raise ValueError("one secret text per trigger image is needed")
        self.images = images.float().clamp(0, 1)
        self.texts = list(texts)
        self.kinds = list(kinds) if kinds is not None else ["?"] * len(texts)
        self.key_id = key_id

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:  # never the texts or pixels
        return f"TriggerSet(n={len(self)}, size={self.images.shape[-1]})"

    __str__ = __repr__

    def save(self, path: str | Path) -> Path:
        import os

        from safetensors.torch import save_file

        p = Path(path)
        u8 = (self.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        meta = {"format": TRIGGER_FORMAT, "texts": json.dumps(self.texts), "kinds": json.dumps(self.kinds),
                "key_id": self.key_id or ""}
        save_file({"images": u8}, str(p), metadata=meta)
        os.chmod(p, 0o600)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "TriggerSet":
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"trigger file {p} does not exist", "give the watermark folder written by `ipshield watermark apply`")
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                images = fh.get_tensor("images")
        except Exception:
            raise CheckpointError(f"trigger file {p} is not readable", "re-create the watermark with `ipshield watermark apply`") from None
        if meta.get("format") != TRIGGER_FORMAT:
            raise CheckpointError(f"{p} is not an ipshield trigger file", "give the watermark folder written by `ipshield watermark apply`")
        texts = json.loads(meta["texts"])
        kinds = json.loads(meta.get("kinds", "null"))
        return cls(images.permute(0, 3, 1, 2).float() / 255.0, texts, kinds, meta.get("key_id") or None)
