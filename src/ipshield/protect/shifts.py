"""Synthetic "neighbour domains" [ours]: strong, label-preserving domain shifts of a batch of
images in [0, 1]. DF-MAP uses them as stand-ins for the unknown unauthorized domains and
target-free NTL as its generated neighbourhood data.

Each image gets one randomly chosen shift family (with random parameters):
colour inversion, colour jitter / channel mixing, blur, noise, a smooth random coloured background
blended under the strokes (MNIST-M-like), random per-channel statistics (AdaIN-like re-styling
of the pixel statistics), low resolution (down-up sampling, USPS-like), and thicker strokes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

SHIFTS = ("invert", "colour", "blur", "noise", "background", "restyle", "lowres", "thicken")


def _rand(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device).view(n, 1, 1, 1)


def _invert(x, g):
    return 1.0 - x


def _colour(x, g):
    n = x.shape[0]
    mix = torch.rand(n, 3, 3, generator=g).to(x.device)
    mix = mix / mix.sum(-1, keepdim=True)
    y = torch.einsum("nij,njhw->nihw", mix, x)
    gain = (torch.rand(n, 3, 1, 1, generator=g) * 1.2 + 0.3).to(x.device)
    bias = (torch.rand(n, 3, 1, 1, generator=g) * 0.6 - 0.3).to(x.device)
    return y * gain + bias


def _blur(x, g):
    sigma = float(torch.rand(1, generator=g) * 1.5 + 0.8)
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _noise(x, g):
    std = _rand(x.shape[0], 0.1, 0.35, g, x.device)
    return x + torch.randn(x.shape, generator=g).to(x.device) * std


def _background(x, g):
    n, c, h, w = x.shape
    coarse = torch.rand(n, 3, 4, 4, generator=g).to(x.device)
    bg = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    bg = bg + torch.randn(n, 3, h, w, generator=g).to(x.device) * 0.05
    lum = x.mean(1, keepdim=True)
    # strokes: bright or dark relative to the image's own median, whichever is rarer
    med = lum.flatten(1).median(1).values.view(n, 1, 1, 1)
    alpha = (lum - med).abs()
    alpha = alpha / alpha.flatten(1).amax(1).clamp_min(1e-6).view(n, 1, 1, 1)
    stroke = torch.rand(n, 3, 1, 1, generator=g).to(x.device)
    return alpha * (1 - bg) * stroke.round() + alpha * bg * (1 - stroke.round()) + (1 - alpha) * bg


def _restyle(x, g):
    n = x.shape[0]
    mu = x.mean((2, 3), keepdim=True)
    sd = x.std((2, 3), keepdim=True).clamp_min(1e-3)
    new_mu = torch.rand(n, 3, 1, 1, generator=g).to(x.device)
    new_sd = (torch.rand(n, 3, 1, 1, generator=g) * 0.35 + 0.05).to(x.device)
    sign = torch.where(torch.rand(n, 3, 1, 1, generator=g) < 0.5, -1.0, 1.0).to(x.device)
    return (x - mu) / sd * new_sd * sign + new_mu


def _lowres(x, g):
    h = x.shape[-1]
    s = int(torch.randint(8, 15, (1,), generator=g))
    y = F.interpolate(x, size=(s, s), mode="area")
    return F.interpolate(y, size=(h, h), mode="bilinear", align_corners=False)


def _thicken(x, g):
    lum = x.mean(1, keepdim=True)
    bright = (lum.flatten(1).mean(1) < 0.5).view(-1, 1, 1, 1)
    dil = F.max_pool2d(x, 3, 1, 1)
    ero = -F.max_pool2d(-x, 3, 1, 1)
    return torch.where(bright, dil, ero)


_FNS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "invert": _invert, "colour": _colour, "blur": _blur, "noise": _noise, "background": _background,
    "restyle": _restyle, "lowres": _lowres, "thicken": _thicken,
}


def neighbour_shift(x: torch.Tensor, generator: torch.Generator, shifts: tuple[str, ...] = SHIFTS,
                    n_compose: int = 2) -> torch.Tensor:
    """Each image of ``x`` [B, 3, H, W] in [0, 1] goes through ``n_compose`` random shifts."""
    unknown = [s for s in shifts if s not in _FNS]
    if unknown:
        from ipshield.errors import ConfigError

        raise ConfigError(f"unknown neighbour shift(s) {unknown}", f"choose among {', '.join(SHIFTS)}")
    out = x.clone()
    for _ in range(n_compose):
        choice = torch.randint(0, len(shifts), (x.shape[0],), generator=generator)
        for i, name in enumerate(shifts):
            sel = (choice == i).nonzero().flatten()
            if len(sel):
                out[sel] = _FNS[name](out[sel], generator)
        out = out.clamp(0, 1)
    return out
