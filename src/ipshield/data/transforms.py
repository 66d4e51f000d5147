"""Image transforms on batch tensors ``[B, 3, H, W]`` with values in [0, 1], in plain torch (no
torchvision). A single image ``[3, H, W]`` is accepted too and returned in the same shape.

Every random transform takes an optional ``torch.Generator``; with a seeded generator the result is
deterministic. Inputs are never modified in place.

- geometry: ``resize`` and ``resize_crop`` (THE resize of every image on its way to a model:
  bicubic, anti-aliased when shrinking, clamped; see docs/data.md), ``center_crop``,
  ``random_resized_crop``, ``random_hflip``; ``normalize``;
- the two transforms of the IP-CLIP scenarios (spec ip-clip.md): ``grid_watermark`` (every pixel
  whose row or column index is even set to white) and ``strong_augment`` / ``RandAugment``
  (10 ops, each applied with p 0.5 at a random magnitude 1..10, plus cutout).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Size = int | tuple[int, int]


def _batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError("transforms expect a float tensor in [0, 1] (convert uint8 images with .float() / 255)")
    if x.dim() == 3:
        return x[None], True
    if x.dim() != 4:
        raise ValueError(f"expected an image [3, H, W] or a batch [B, 3, H, W], got shape {tuple(x.shape)}")
    return x, False


def _pair(size: Size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


# --------------------------------------------------------------------------- geometry
def _interpolate(xb: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The one resampling of ipshield: bicubic (a = -0.75, torch's), anti-aliased when either side
    shrinks, clamped to [0, 1]. It is what CLIP's own preprocessing does (OpenAI's and Hugging
    Face's resample=3) and what the small CLIP was pretrained on."""
    shrink = h < xb.shape[-2] or w < xb.shape[-1]
    return F.interpolate(xb, size=(h, w), mode="bicubic", align_corners=False, antialias=shrink).clamp(0.0, 1.0)


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Resize to ``size`` (int: square, or (H, W); the aspect ratio is not kept) with the one
    resampling of ipshield: bicubic, anti-aliased when shrinking, clamped to [0, 1]."""
    xb, single = _batch(x)
    h, w = _pair(size)
    out = xb.clone() if xb.shape[-2:] == (h, w) else _interpolate(xb, h, w)
    return out[0] if single else out


def resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images of any size -> ``size`` x ``size``: the shorter side resized to ``size`` (bicubic,
    anti-aliased when shrinking, clamped; the aspect ratio kept), then the centre crop: CLIP's
    ``Resize(size) + CenterCrop(size)``. Every path that hands images to a model goes through this
    function (``ImageSplit.to_tensor(size)`` and ``CLIPAdapter.preprocess``), so identical pixels
    give identical model inputs whether they come from an array, an archive or image files.
    Differentiable; an image already ``size`` x ``size`` is returned unchanged (a copy)."""
    xb, single = _batch(x)
    s = int(size)
    h, w = xb.shape[-2:]
    if (h, w) == (s, s):
        out = xb.clone()
    else:
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        out = _interpolate(xb, nh, nw)
        top, left = (nh - s) // 2, (nw - s) // 2
        out = out[..., top:top + s, left:left + s]
    return out[0] if single else out


def center_crop(x: torch.Tensor, size: Size) -> torch.Tensor:
    """The central ``size`` crop (the image must be at least that large)."""
    xb, single = _batch(x)
    h, w = _pair(size)
    H, W = xb.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"crop {h}x{w} is larger than the image {H}x{W}")
    top, left = (H - h) // 2, (W - w) // 2
    out = xb[..., top:top + h, left:left + w].clone()
    return out[0] if single else out


def random_resized_crop(x: torch.Tensor, size: Size, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None) -> torch.Tensor:
    """A random crop per image (area fraction in ``scale``, aspect ratio in ``ratio``), resized to ``size``."""
    xb, single = _batch(x)
    b = xb.shape[0]
    H, W = xb.shape[-2:]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator) * H * W
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).round().clamp(1, W).long()
    ch = torch.sqrt(area / r).round().clamp(1, H).long()
    u = torch.rand(b, 2, generator=generator)
    top = (u[:, 0] * (H - ch + 1).float()).floor().long()
    left = (u[:, 1] * (W - cw + 1).float()).floor().long()
    oh, ow = _pair(size)
    out = torch.empty(b, xb.shape[1], oh, ow, dtype=xb.dtype, device=xb.device)
    for i in range(b):  # crops differ in size: one interpolate each (cheap at these resolutions)
        crop = xb[i:i + 1, :, top[i]:top[i] + ch[i], left[i]:left[i] + cw[i]]
        out[i:i + 1] = F.interpolate(crop, size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)
    out.clamp_(0, 1)
    return out[0] if single else out


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    xb, single = _batch(x)
    flip = (_rand(xb.shape[0], generator, xb.device) < p).view(-1, 1, 1, 1)
    out = torch.where(flip, xb.flip(-1), xb)
    return out[0] if single else out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    xb, single = _batch(x)
    m = torch.as_tensor(mean, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=xb.dtype, device=xb.device).view(1, -1, 1, 1)
    out = (xb - m) / s
    return out[0] if single else out


# --------------------------------------------------------------------------- IP-CLIP transforms
def grid_watermark(x: torch.Tensor, stride: int = 2, value: float = 1.0) -> torch.Tensor:
    """The ownership-verification pattern (spec ip-clip.md): every pixel whose row or column index
    is a multiple of ``stride`` (even, for the default 2; indices from 0) is set to ``value`` (white)."""
    xb, single = _batch(x)
    if stride < 1:
        raise ValueError("stride must be >= 1")
    H, W = xb.shape[-2:]
    rows = torch.arange(H, device=xb.device) % stride == 0
    cols = torch.arange(W, device=xb.device) % stride == 0
    mask = rows[:, None] | cols[None, :]
    out = xb.masked_fill(mask, value)
    return out[0] if single else out


_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """b + (a - b) * factor: factor 1 gives a, 0 gives b, > 1 extrapolates away from b."""
    return b + (a - b) * factor.view(-1, 1, 1, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill * (1 - inside)


def _gauss_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    r = max(1, int(math.ceil(3 * float(sigma.max()))))
    r = min(r, (min(h, w) - 1) // 2) if min(h, w) > 2 else 1
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(k[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, g[:, None, None, :], groups=b * c)
    y = F.conv2d(y, g[:, None, :, None], groups=b * c)
    return y.view(b, c, h, w)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image (256 levels)."""
    b, c, h, w = x.shape
    v = (x * 255).round().clamp(0, 255).long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.float32, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float32))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).amin(1, keepdim=True)
    denom = (h * w - cdf_min)
    lut = ((cdf - cdf_min) / denom.clamp_min(1) * 255).round().clamp(0, 255)
    out = lut.gather(1, v) / 255.0
    flat = denom <= 0  # a constant channel stays as it is
    out = torch.where(flat, v.float() / 255.0, out)
    return out.view(b, c, h, w).to(x.dtype)


def _op_brightness(x, level, sign):
    return x * (1 + sign * 0.9 * level).view(-1, 1, 1, 1)


def _op_contrast(x, level, sign):
    mean = _gray(x).mean((1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), 1 + sign * 0.9 * level)


def _op_color(x, level, sign):
    return _blend(x, _gray(x).expand_as(x), 1 + sign * 0.9 * level)


def _op_sharpness(x, level, sign):
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13.0
    c = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    return _blend(x, smooth, 1 + sign * 0.9 * level)


def _op_posterize(x, level, sign):
    shift = (level * 4).round().long().view(-1, 1, 1, 1)  # keep 8 - shift bits (4..8)
    v = (x * 255).round().clamp(0, 255).long()
    return ((v >> shift) << shift).to(x.dtype) / 255.0


def _op_solarize(x, level, sign):
    thr = (1 - level).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1 - x, x)


def _op_autocontrast(x, level, sign):
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-6, (x - lo) / span.clamp_min(1e-6), x)


def _op_equalize(x, level, sign):
    return _equalize(x)


def _op_invert(x, level, sign):
    return 1 - x


def _theta(n: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.zeros(n, 2, 3, dtype=like.dtype, device=like.device)
    t[:, 0, 0] = 1
    t[:, 1, 1] = 1
    return t


def _op_rotate(x, level, sign, fill=0.5):
    a = torch.deg2rad(sign * 30 * level).to(x.dtype)
    t = _theta(len(x), x)
    t[:, 0, 0], t[:, 0, 1] = torch.cos(a), -torch.sin(a)
    t[:, 1, 0], t[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, t, fill)


def _op_shear_x(x, level, sign, fill=0.5):
    t = _theta(len(x), x)
    t[:, 0, 1] = (sign * 0.3 * level).to(x.dtype)
    return _affine(x, t, fill)


def _op_shear_y(x, level, sign, fill=0.5):
    t = _theta(len(x), x)
    t[:, 1, 0] = (sign * 0.3 * level).to(x.dtype)
    return _affine(x, t, fill)


def _op_translate_x(x, level, sign, fill=0.5):
    t = _theta(len(x), x)
    t[:, 0, 2] = (sign * 2 * 0.3 * level).to(x.dtype)  # up to 30% of the width
    return _affine(x, t, fill)


def _op_translate_y(x, level, sign, fill=0.5):
    t = _theta(len(x), x)
    t[:, 1, 2] = (sign * 2 * 0.3 * level).to(x.dtype)
    return _affine(x, t, fill)


def _op_blur(x, level, sign):
    sigma = (0.2 + 1.3 * level) * min(x.shape[-2:]) / 32.0  # sigma in pixels at 32 px, scaled with the image
    return _gauss_blur(x, sigma)


#: the operations of ``RandAugment`` (name -> fn(x [k,3,H,W], level [k] in (0, 1], sign [k] of +-1))
RANDAUGMENT_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "brightness": _op_brightness,
    "contrast": _op_contrast,
    "color": _op_color,
    "sharpness": _op_sharpness,
    "posterize": _op_posterize,
    "solarize": _op_solarize,
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize,
    "invert": _op_invert,
    "rotate": _op_rotate,
    "shear_x": _op_shear_x,
    "shear_y": _op_shear_y,
    "translate_x": _op_translate_x,
    "translate_y": _op_translate_y,
    "blur": _op_blur,
}


class RandAugment:
    """Strong random augmentation of a batch.

    For each image, ``n_ops`` operations are drawn without repetition (in random order) from
    ``ops`` (default: the 15 of ``RANDAUGMENT_OPS``); each is applied with probability ``p`` at an
    integer magnitude drawn uniformly in ``magnitude`` (1..10 maps to strength 0.1..1.0) and a
    random direction where that makes sense. Then a square ``cutout`` hole is cut at a random
    centre (filled with ``fill``); its side is ``cutout`` pixels at ``cutout_ref`` pixels of image
    size, scaled to the actual image (16 px at 224 px, 2 px at 32 px). ``cutout=0`` disables it.
    Work is vectorised per (slot, op) over the images that drew it.
    """

    def __init__(self, n_ops: int = 10, p: float = 0.5, magnitude: tuple[int, int] = (1, 10), cutout: int = 16,
                 cutout_ref: int = 224, ops: Sequence[str] | None = None, fill: float = 0.5, max_magnitude: int = 10):
        names = list(RANDAUGMENT_OPS) if ops is None else list(ops)
        unknown = [o for o in names if o not in RANDAUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {list(RANDAUGMENT_OPS)}")
        if not names:
            raise ValueError("RandAugment needs at least one op")
        lo, hi = int(magnitude[0]), int(magnitude[1])
        if not 0 <= lo <= hi <= max_magnitude:
            raise ValueError(f"magnitude range must satisfy 0 <= lo <= hi <= {max_magnitude} (got {magnitude})")
        self.ops = names
        self.n_ops = min(int(n_ops), len(names))
        self.p = float(p)
        self.magnitude = (lo, hi)
        self.max_magnitude = max_magnitude
        self.cutout = int(cutout)
        self.cutout_ref = int(cutout_ref)
        self.fill = float(fill)

    def __repr__(self) -> str:
        return (f"RandAugment(n_ops={self.n_ops}, p={self.p}, magnitude={self.magnitude}, cutout={self.cutout}"
                f"@{self.cutout_ref}px, ops={len(self.ops)})")

    def cutout_side(self, image_size: int) -> int:
        return 0 if self.cutout <= 0 else max(1, int(round(self.cutout * image_size / self.cutout_ref)))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        xb, single = _batch(x)
        xb = xb.clone()
        b = xb.shape[0]
        k = self.n_ops
        # all random draws up front, from the generator, so results depend only on its state
        order = torch.rand(b, len(self.ops), generator=generator).argsort(1)[:, :k]
        active = torch.rand(b, k, generator=generator) < self.p
        mags = torch.randint(self.magnitude[0], self.magnitude[1] + 1, (b, k), generator=generator)
        signs = torch.where(torch.rand(b, k, generator=generator) < 0.5, -1.0, 1.0)
        centres = torch.rand(b, 2, generator=generator)
        levels = (mags.float() / self.max_magnitude).to(xb.device)
        signs = signs.to(xb.device)
        for slot in range(k):
            for oi, name in enumerate(self.ops):
                sel = torch.nonzero(active[:, slot] & (order[:, slot] == oi)).squeeze(1)
                if sel.numel() == 0:
                    continue
                sel = sel.to(xb.device)
                fn = RANDAUGMENT_OPS[name]
                y = fn(xb[sel], levels[sel, slot], signs[sel, slot])
                xb[sel] = y.clamp(0, 1).to(xb.dtype)
        side = self.cutout_side(min(xb.shape[-2:]))
        if side > 0:
            H, W = xb.shape[-2:]
            cy = (centres[:, 0] * H).long().to(xb.device)
            cx = (centres[:, 1] * W).long().to(xb.device)
            ys = torch.arange(H, device=xb.device)[None, :]
            xs = torch.arange(W, device=xb.device)[None, :]
            y0, x0 = (cy - side // 2)[:, None], (cx - side // 2)[:, None]
            in_y = (ys >= y0) & (ys < y0 + side)
            in_x = (xs >= x0) & (xs < x0 + side)
            hole = (in_y[:, :, None] & in_x[:, None, :])[:, None]
            xb = xb.masked_fill(hole, self.fill)
        return xb[0] if single else xb


_STRONG = RandAugment()


def strong_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The target-free scenario's augmentation (spec ip-clip.md): RandAugment with 10 ops, p 0.5
    each, magnitude 1..10, plus a 16 px (at 224 px) cutout."""
    return _STRONG(x, generator)
