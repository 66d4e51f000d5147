"""The embedded default dataset: procedurally rendered digits in several visually distinct styles.

Every style draws the same 10 classes (``DIGIT_CLASSES``) from stroke templates (polylines per
digit, a few variants for some digits), deformed per image by a smooth random warp and an affine
map (scale, aspect, rotation, slant, translation), and rasterised as anti-aliased strokes from a
distance-to-segment field (vectorised in torch, no per-image Python loop). The styles differ in
how strokes and background are painted (see ``STYLE_DESCRIPTIONS``), not in the digit shapes,
so a model trained on one style meets a genuine domain shift on the others while the digit stays
clearly legible everywhere.

Deterministic: the same ``(style, n_train, n_test, seed, size)`` gives identical arrays.
"""

from __future__ import annotations

import math
import os
import random as _pyrandom
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ipshield.data.domain import Domain, ImageSplit
from ipshield.errors import DataError

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: bump when the rendering changes, so on-disk caches of older renderings are not reused
GENERATOR_VERSION = 1

STYLES = ["clean", "inverted", "color", "texture", "noisy", "outline"]

STYLE_DESCRIPTIONS: dict[str, str] = {
    "clean": "white strokes on a black background",
    "inverted": "dark ink strokes on light paper",
    "color": "coloured strokes on a flat background of another colour",
    "texture": "solid strokes over a striped or checkered background",
    "noisy": "grey strokes, blurred and covered in gaussian noise",
    "outline": "hollow outlined strokes in a bright colour on a dark gradient",
}

# Phrases used in captions, several per style so captions vary.
_STYLE_PHRASES: dict[str, list[str]] = {
    "clean": ["in white on black", "written in white on a black background", "drawn with clean white strokes",
              "in white ink on black"],
    "inverted": ["in dark ink on light paper", "written in black on white paper", "drawn with a pen on paper",
                 "in dark ink on a light background"],
    "color": ["in colour", "drawn in colour on a coloured background", "in bright colours",
              "painted in colour on a flat background"],
    "texture": ["on a textured background", "over a patterned background", "on a striped or checkered pattern",
                "drawn over a pattern"],
    "noisy": ["noisy and blurred", "with heavy noise and blur", "blurry and grainy", "in a noisy blurred picture"],
    "outline": ["in outline", "drawn as a hollow outline", "in a bright outline on a dark background",
                "with outlined strokes"],
}

_STYLE_ADJECTIVES: dict[str, list[str]] = {
    "clean": ["clean", "white", "simple"],
    "inverted": ["handwritten", "ink", "paper"],
    "color": ["colourful", "coloured", "bright"],
    "texture": ["textured", "patterned"],
    "noisy": ["noisy", "blurred", "grainy"],
    "outline": ["outlined", "hollow", "neon"],
}

# Named colours (RGB in [0, 1]); the names appear in captions of the colour/outline styles.
_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.13, 0.65, 0.22),
    "blue": (0.15, 0.30, 0.85),
    "yellow": (0.97, 0.88, 0.15),
    "orange": (0.97, 0.55, 0.10),
    "purple": (0.52, 0.20, 0.70),
    "pink": (0.98, 0.55, 0.75),
    "cyan": (0.20, 0.85, 0.90),
    "brown": (0.50, 0.30, 0.12),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
    "navy": (0.07, 0.10, 0.35),
    "teal": (0.05, 0.45, 0.45),
}
_PALETTE_NAMES = list(_PALETTE)
_PALETTE_RGB = np.array([_PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)
_LUMA = _PALETTE_RGB @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
_BRIGHT = ["yellow", "cyan", "white", "pink", "orange", "green"]
_DARK_BG = [("black", "navy"), ("navy", "purple"), ("black", "teal"), ("black", "brown"), ("navy", "black"),
            ("purple", "black"), ("teal", "navy")]


# --------------------------------------------------------------------------- stroke templates
def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int = 14) -> list[tuple[float, float]]:
    """Points of an elliptic arc; angles in degrees, 0 = right, 90 = down (image coordinates)."""
    ts = np.radians(np.linspace(t0, t1, n))
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in ts]


def _bezier(p0, p1, p2, n: int = 10) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [tuple(p) for p in pts]


def _templates() -> list[tuple[int, list[list[tuple[float, float]]]]]:
    """(label, strokes) pairs; each stroke is a polyline in the unit square (x right, y down)."""
    t: list[tuple[int, list[list[tuple[float, float]]]]] = []
    # 0
    t.append((0, [_arc(0.5, 0.5, 0.29, 0.42, 0, 360, 26)]))
    t.append((0, [_arc(0.5, 0.5, 0.24, 0.42, -90, 270, 26)]))
    # 1
    t.append((1, [[(0.36, 0.25), (0.55, 0.08), (0.55, 0.92)]]))
    t.append((1, [[(0.36, 0.25), (0.54, 0.08), (0.54, 0.92)], [(0.34, 0.92), (0.74, 0.92)]]))
    t.append((1, [[(0.52, 0.08), (0.48, 0.92)]]))
    # 2
    t.append((2, [_arc(0.5, 0.3, 0.26, 0.22, 165, 375, 14) + [(0.22, 0.9), (0.82, 0.9)]]))
    t.append((2, [_arc(0.5, 0.3, 0.25, 0.21, 180, 360, 12) + _bezier((0.75, 0.3), (0.7, 0.55), (0.22, 0.9), 8)
                  + [(0.82, 0.88)]]))
    # 3
    t.append((3, [_arc(0.48, 0.29, 0.25, 0.2, 200, 450, 14) + _arc(0.48, 0.7, 0.28, 0.21, -90, 155, 14)]))
    t.append((3, [[(0.24, 0.1), (0.74, 0.1), (0.46, 0.44)] + _arc(0.48, 0.67, 0.28, 0.23, -95, 155, 14)]))
    # 4
    t.append((4, [[(0.66, 0.92), (0.66, 0.08), (0.18, 0.66), (0.84, 0.66)]]))
    t.append((4, [[(0.3, 0.08), (0.22, 0.6), (0.84, 0.6)], [(0.66, 0.3), (0.66, 0.92)]]))
    # 5
    arc5 = _arc(0.48, 0.66, 0.28, 0.25, -130, 150, 14)
    t.append((5, [[(0.77, 0.1), (0.32, 0.1), arc5[0]] + arc5]))
    t.append((5, [[(0.77, 0.1), (0.3, 0.1)], [(0.3, 0.1), arc5[0]] + arc5]))
    # 6
    t.append((6, [_bezier((0.7, 0.08), (0.24, 0.28), (0.24, 0.7), 9) + _arc(0.5, 0.69, 0.26, 0.22, 180, 540, 20)]))
    t.append((6, [[(0.62, 0.08), (0.3, 0.55)] + _arc(0.5, 0.7, 0.24, 0.21, 210, 570, 20)]))
    # 7
    t.append((7, [[(0.2, 0.1), (0.8, 0.1), (0.42, 0.92)]]))
    t.append((7, [[(0.2, 0.1), (0.8, 0.1), (0.42, 0.92)], [(0.46, 0.52), (0.78, 0.52)]]))
    t.append((7, [[(0.22, 0.18), (0.22, 0.1), (0.8, 0.1)] + _bezier((0.8, 0.1), (0.5, 0.45), (0.48, 0.92), 8)]))
    # 8
    t.append((8, [_arc(0.5, 0.29, 0.2, 0.19, 0, 360, 18), _arc(0.5, 0.7, 0.25, 0.22, 0, 360, 20)]))
    t.append((8, [_arc(0.5, 0.28, 0.22, 0.19, 90, 450, 18), _arc(0.5, 0.69, 0.27, 0.22, -90, 270, 20)]))
    # 9
    t.append((9, [_arc(0.5, 0.32, 0.24, 0.22, 0, 360, 20), [(0.74, 0.32), (0.68, 0.92)]]))
    t.append((9, [_arc(0.5, 0.32, 0.24, 0.22, 0, 360, 20), _bezier((0.74, 0.32), (0.76, 0.85), (0.34, 0.9), 8)]))
    return t


def _template_tensors() -> tuple[torch.Tensor, np.ndarray, dict[int, np.ndarray]]:
    """Segments of every template as a tensor [T, S_max, 2 (a/b), 2 (x/y)], padded by repeating
    the last segment (which leaves the distance field unchanged)."""
    temps = _templates()
    segs = []
    for _, strokes in temps:
        s = []
        for line in strokes:
            for a, b in zip(line[:-1], line[1:]):
                s.append((a, b))
        segs.append(np.array(s, dtype=np.float32))
    s_max = max(len(s) for s in segs)
    out = np.stack([np.concatenate([s, np.repeat(s[-1:], s_max - len(s), axis=0)]) for s in segs])
    labels = np.array([lab for lab, _ in temps], dtype=np.int64)
    by_label = {c: np.flatnonzero(labels == c) for c in range(10)}
    return torch.from_numpy(out), labels, by_label


_TEMPLATES, _TEMPLATE_LABELS, _TEMPLATES_BY_LABEL = _template_tensors()


# --------------------------------------------------------------------------- rasterisation
def _render_distance(labels: np.ndarray, rng: np.random.Generator, size: int, scale_range=(0.74, 0.92)) -> torch.Tensor:
    """Distance (in pixels) from every pixel to the nearest stroke of each image's digit: [N, S, S]."""
    n = len(labels)
    tid = np.array([rng.choice(_TEMPLATES_BY_LABEL[int(c)]) for c in labels], dtype=np.int64)
    # per-image geometry
    scale = rng.uniform(*scale_range, n)
    aspect = rng.uniform(0.82, 1.12, n)
    rot = np.radians(rng.uniform(-12, 12, n))
    slant = rng.uniform(-0.28, 0.28, n)
    shift = rng.uniform(-0.07, 0.07, (n, 2))
    warp_amp = rng.uniform(0.0, 0.035, (n, 2))
    warp_freq = rng.uniform(0.5, 1.4, (n, 2))
    warp_phase = rng.uniform(0, 2 * np.pi, (n, 2))

    sx, sy = scale * aspect, scale
    cos, sin = np.cos(rot), np.sin(rot)
    # M = R @ Shear @ diag(sx, sy); shear x += slant * (-y) so positive slant leans right
    m = np.empty((n, 2, 2), dtype=np.float32)
    m[:, 0, 0] = cos * sx
    m[:, 0, 1] = (cos * -slant - sin) * sy
    m[:, 1, 0] = sin * sx
    m[:, 1, 1] = (sin * -slant + cos) * sy

    p = _TEMPLATES[torch.from_numpy(tid)].clone()  # [N, S, 2, 2]
    amp = torch.from_numpy(warp_amp.astype(np.float32))[:, None, None, :]
    freq = torch.from_numpy(warp_freq.astype(np.float32))[:, None, None, :]
    phase = torch.from_numpy(warp_phase.astype(np.float32))[:, None, None, :]
    # smooth warp: x moves with y and y with x (sinusoids), keeping strokes connected
    other = p.flip(-1)
    p = p + amp * torch.sin(2 * math.pi * freq * other + phase)
    q = (p - 0.5) @ torch.from_numpy(m).transpose(1, 2)[:, None]  # [N, S, 2, 2]
    q = q * size + size / 2 + torch.from_numpy((shift * size).astype(np.float32))[:, None, None, :]

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    pix = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)  # [P, 2]

    out = torch.empty(n, size * size)
    chunk = max(1, 250_000 // (q.shape[1] * size * size))  # small chunks stay in cache
    px, py = pix[:, 0], pix[:, 1]
    for s in range(0, n, chunk):
        qc = q[s:s + chunk]
        ax, ay = qc[:, :, 0, 0, None], qc[:, :, 0, 1, None]  # [C, S, 1]
        abx, aby = qc[:, :, 1, 0, None] - ax, qc[:, :, 1, 1, None] - ay
        inv = 1.0 / (abx * abx + aby * aby).clamp_min(1e-8)
        apx = px - ax  # [C, S, P]
        apy = py - ay
        t = (apx * abx).add_(apy * aby).mul_(inv).clamp_(0, 1)
        apx.sub_(t * abx).square_()
        apy.sub_(t * aby).square_()
        out[s:s + chunk] = apx.add_(apy).amin(1)
    out.sqrt_()
    return out.view(n, size, size)


def _coverage(dist: torch.Tensor, width: np.ndarray) -> torch.Tensor:
    """Anti-aliased stroke coverage in [0, 1] for strokes of the given widths (pixels): [N, 1, S, S]."""
    w = torch.from_numpy(width.astype(np.float32))[:, None, None]
    return (w / 2 + 0.5 - dist).clamp_(0, 1)[:, None]


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Gaussian blur with one sigma per image (grouped convolution)."""
    n, c, h, w = x.shape
    r = 3
    k = torch.arange(-r, r + 1, dtype=torch.float32)
    s = torch.from_numpy(np.maximum(sigma, 1e-3).astype(np.float32))[:, None]
    g = torch.exp(-(k[None] ** 2) / (2 * s**2))
    g = g / g.sum(1, keepdim=True)  # [N, K]
    g = g.repeat_interleave(c, 0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, g[:, None, None, :], groups=n * c)
    y = F.conv2d(y, g[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


def _rgb(names: Sequence[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([_PALETTE_RGB[_PALETTE_NAMES.index(x)] for x in names]))


def _jitter(rng: np.random.Generator, rgb: torch.Tensor, amount: float = 0.06) -> torch.Tensor:
    return (rgb + torch.from_numpy(rng.uniform(-amount, amount, rgb.shape).astype(np.float32))).clamp(0, 1)


def _pick_colour_pairs(rng: np.random.Generator, n: int, min_contrast: float = 0.33) -> tuple[list[str], list[str]]:
    """(foreground, background) colour names with a luminance difference of at least ``min_contrast``."""
    k = len(_PALETTE_NAMES)
    ok = np.abs(_LUMA[:, None] - _LUMA[None, :]) >= min_contrast
    pairs = np.argwhere(ok)
    idx = rng.integers(0, len(pairs), n)
    fg = [_PALETTE_NAMES[pairs[i, 0]] for i in idx]
    bg = [_PALETTE_NAMES[pairs[i, 1]] for i in idx]
    del k
    return fg, bg


def _paint(style: str, dist: torch.Tensor, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Paint strokes (given as a distance field) and background in ``style``: float [N, 3, S, S]."""
    n = dist.shape[0]
    px = size / 32.0  # widths are specified at 32 px and scale with the image
    attrs: dict[str, list[str]] = {}
    if style == "clean":
        alpha = _coverage(dist, rng.uniform(1.8, 3.2, n) * px)
        bg = torch.from_numpy(rng.uniform(0.0, 0.08, n).astype(np.float32))[:, None, None, None]
        fg = torch.from_numpy(rng.uniform(0.85, 1.0, n).astype(np.float32))[:, None, None, None]
        img = (bg * (1 - alpha) + fg * alpha).expand(n, 3, size, size)
    elif style == "inverted":
        alpha = _coverage(dist, rng.uniform(1.4, 2.8, n) * px)
        paper = rng.uniform(0.80, 0.97, (n, 1)) + np.array([[0.02, 0.0, -0.04]]) * rng.uniform(0, 1.5, (n, 1))
        ink = rng.uniform(0.02, 0.22, (n, 1)) + np.array([[0.0, 0.02, 0.12]]) * rng.uniform(0, 1, (n, 1))
        paper_t = torch.from_numpy(paper.astype(np.float32))[:, :, None, None]
        ink_t = torch.from_numpy(ink.astype(np.float32))[:, :, None, None]
        # soft lighting gradient and paper grain
        ramp = torch.linspace(-1, 1, size)
        direction = torch.from_numpy(rng.uniform(-0.06, 0.06, (n, 2)).astype(np.float32))
        light = direction[:, 0, None, None] * ramp[None, :, None] + direction[:, 1, None, None] * ramp[None, None, :]
        grain = torch.from_numpy(rng.normal(0, 0.02, (n, 1, size, size)).astype(np.float32))
        bg = paper_t + light[:, None] + grain
        img = bg * (1 - alpha) + ink_t * alpha
    elif style == "color":
        alpha = _coverage(dist, rng.uniform(2.0, 3.4, n) * px)
        fg_names, bg_names = _pick_colour_pairs(rng, n)
        fg = _jitter(rng, _rgb(fg_names))[:, :, None, None]
        bg = _jitter(rng, _rgb(bg_names))[:, :, None, None]
        img = bg * (1 - alpha) + fg * alpha
        attrs = {"fg": fg_names, "bg": bg_names}
    elif style == "texture":
        alpha = _coverage(dist, rng.uniform(2.4, 3.6, n) * px)
        coords = torch.arange(size, dtype=torch.float32)
        gy, gx = torch.meshgrid(coords, coords, indexing="ij")
        kind = rng.integers(0, 3, n)  # 0 stripes, 1 checker, 2 dots
        period = torch.from_numpy((rng.uniform(3.0, 6.0, n) * px).astype(np.float32))[:, None, None]
        angle = torch.from_numpy(rng.uniform(0, np.pi, n).astype(np.float32))[:, None, None]
        u = gx[None] * torch.cos(angle) + gy[None] * torch.sin(angle)
        v = -gx[None] * torch.sin(angle) + gy[None] * torch.cos(angle)
        stripes = (torch.sin(2 * math.pi * u / period) > 0).float()
        checker = ((torch.floor(u / period) + torch.floor(v / period)) % 2).float()
        dots = ((torch.sin(math.pi * u / period) * torch.sin(math.pi * v / period)).abs() > 0.6).float()
        k = torch.from_numpy(kind)[:, None, None]
        pattern = torch.where(k == 0, stripes, torch.where(k == 1, checker, dots))[:, None]
        # two mid-tone background colours of modest contrast; strokes far brighter or darker
        base = rng.uniform(0.25, 0.75, (n, 3))
        base_l = base.mean(1, keepdims=True)
        c1 = torch.from_numpy(np.clip(base - 0.12, 0, 1).astype(np.float32))[:, :, None, None]
        c2 = torch.from_numpy(np.clip(base + 0.12, 0, 1).astype(np.float32))[:, :, None, None]
        bg = c1 * (1 - pattern) + c2 * pattern
        dark_ink = base_l[:, 0] > 0.5
        fg = np.where(dark_ink[:, None], rng.uniform(0.0, 0.08, (n, 1)), rng.uniform(0.92, 1.0, (n, 1)))
        fg = np.repeat(fg, 3, 1) + rng.uniform(-0.05, 0.05, (n, 3))
        fg_t = torch.from_numpy(np.clip(fg, 0, 1).astype(np.float32))[:, :, None, None]
        # a thin halo in the background's opposite tone keeps the digit apart from the pattern
        halo = _coverage(dist, (rng.uniform(2.4, 3.6, n) + 2.0) * px)
        halo_col = torch.from_numpy(np.where(dark_ink, 0.9, 0.1).astype(np.float32))[:, None, None, None]
        bg = bg * (1 - 0.5 * halo) + halo_col * 0.5 * halo
        img = bg * (1 - alpha) + fg_t * alpha
        attrs = {"pattern": [("stripes", "a checkerboard", "dots")[i] for i in kind]}
    elif style == "noisy":
        alpha = _coverage(dist, rng.uniform(2.2, 3.4, n) * px)
        bg = torch.from_numpy(rng.uniform(0.05, 0.35, n).astype(np.float32))[:, None, None, None]
        fg = torch.from_numpy(rng.uniform(0.75, 1.0, n).astype(np.float32))[:, None, None, None]
        img = (bg * (1 - alpha) + fg * alpha).expand(n, 3, size, size).contiguous()
        img = _blur(img, rng.uniform(0.5, 1.1, n) * px)
        sigma = torch.from_numpy(rng.uniform(0.06, 0.16, n).astype(np.float32))[:, None, None, None]
        colour_noise = torch.from_numpy(rng.normal(0, 1, (n, 3, size, size)).astype(np.float32))
        img = img + sigma * colour_noise
    elif style == "outline":
        width = rng.uniform(3.6, 5.0, n) * px
        line = rng.uniform(0.9, 1.4, n) * px
        w = torch.from_numpy(width.astype(np.float32))[:, None, None]
        lw = torch.from_numpy(line.astype(np.float32))[:, None, None]
        alpha = (lw / 2 + 0.5 - (dist - w / 2).abs()).clamp(0, 1)[:, None]
        fg_names = [str(x) for x in rng.choice(_BRIGHT, n)]
        pairs = [_DARK_BG[i] for i in rng.integers(0, len(_DARK_BG), n)]
        top = _jitter(rng, _rgb([a for a, _ in pairs]), 0.04)
        bottom = _jitter(rng, _rgb([b for _, b in pairs]), 0.04)
        angle = rng.uniform(0, 2 * np.pi, n)
        coords = torch.linspace(0, 1, size)
        gy, gx = torch.meshgrid(coords, coords, indexing="ij")
        ca = torch.from_numpy(np.cos(angle).astype(np.float32))[:, None, None]
        sa = torch.from_numpy(np.sin(angle).astype(np.float32))[:, None, None]
        ramp = ((gx - 0.5) * ca + (gy - 0.5) * sa + 0.5).clamp(0, 1)[:, None]
        bg = top[:, :, None, None] * (1 - ramp) + bottom[:, :, None, None] * ramp
        fg = _jitter(rng, _rgb(fg_names))[:, :, None, None]
        img = bg * (1 - alpha) + fg * alpha
        attrs = {"fg": fg_names}
    else:
        raise DataError(f"unknown synthetic style '{style}'", f"choose from: {', '.join(STYLES)}")
    return img.clamp(0, 1), attrs


def _style_seed(style: str, seed: int) -> list[int]:
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(style.encode()), GENERATOR_VERSION]


def render(style: str, labels: Sequence[int] | np.ndarray, seed: int = 0, size: int = 32) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Render one image per label in ``style``: uint8 [N, size, size, 3] and per-image attributes
    (colour names, background pattern) usable in captions."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(_style_seed(style, seed))
    if style not in STYLES:
        raise DataError(f"unknown synthetic style '{style}'", f"choose from: {', '.join(STYLES)}")
    if len(labels) == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8), {}
    with _one_thread():
        dist = _render_distance(labels, rng, size)
        img, attrs = _paint(style, dist, rng, size)
        arr = (img * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return arr, attrs


@contextmanager
def _one_thread():
    """Render on one torch thread: the work is many small memory-bound ops, and on 2 shared cores
    intra-op threading was measured 3-15x slower under load (see docs/data.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % len(DIGIT_CLASSES)).astype(np.int64)


def make_domain(style: str, n_train: int = 2000, n_test: int = 500, seed: int = 0, size: int = 32) -> Domain:
    """One synthetic domain: ``n_train`` + ``n_test`` images of ``style`` with balanced labels."""
    style = _canonical_style(style)
    if n_train < 0 or n_test < 0:
        raise DataError(f"n_train and n_test must be >= 0 (got {n_train}, {n_test})", "pass non-negative sizes")
    if size < 8:
        raise DataError(f"image size {size} is too small", "use size >= 8 (32 is the default)")
    rng = np.random.default_rng(_style_seed(style, seed) + [1])
    labels = _balanced_labels(n_train + n_test, rng)
    images, attrs = render(style, labels, seed=seed, size=size)
    domain = Domain(
        name=style,
        classes=list(DIGIT_CLASSES),
        train=ImageSplit(images[:n_train], labels[:n_train]),
        test=ImageSplit(images[n_train:], labels[n_train:]),
        meta={
            "source": "synthetic",
            "style": style,
            "description": STYLE_DESCRIPTIONS[style],
            "seed": seed,
            "train_attrs": {k: v[:n_train] for k, v in attrs.items()},
            "test_attrs": {k: v[n_train:] for k, v in attrs.items()},
        },
    )
    return domain


def _canonical_style(style: str) -> str:
    key = str(style).strip().lower().replace("colour", "color")
    if key not in STYLES:
        raise DataError(f"unknown synthetic domain '{style}'", f"choose from: {', '.join(STYLES)}")
    return key


_MEMO: dict[tuple, Domain] = {}


def load_synthetic(domains: Iterable[str] | None = None, n_train: int = 2000, n_test: int = 500, seed: int = 0,
                   size: int = 32, disk_cache: bool = False) -> dict[str, Domain]:
    """The synthetic domains (all ``STYLES`` by default), keyed by style name.

    Results are memoised in-process (the same Domain objects are returned again: treat their
    arrays as read-only). With ``disk_cache=True`` (or env ``IPSHIELD_DATA_CACHE=1``) they are also
    stored as ``.npz`` under ``ipshield.utils.cache_dir()/synthetic``.
    """
    names = list(STYLES) if domains is None else [_canonical_style(d) for d in domains]
    if not names:
        raise DataError("no synthetic domains requested", f"name at least one of: {', '.join(STYLES)}")
    use_disk = disk_cache or os.environ.get("IPSHIELD_DATA_CACHE") == "1"
    out: dict[str, Domain] = {}
    for name in names:
        key = (name, int(n_train), int(n_test), int(seed), int(size))
        if key not in _MEMO:
            dom = _load_disk(key) if use_disk else None
            if dom is None:
                dom = make_domain(name, n_train, n_test, seed=seed, size=size)
                if use_disk:
                    _save_disk(key, dom)
            _MEMO[key] = dom
        out[name] = _MEMO[key]
    return out


def _disk_path(key: tuple) -> Path:
    from ipshield.utils import cache_dir

    name, n_train, n_test, seed, size = key
    return cache_dir() / "synthetic" / f"{name}_tr{n_train}_te{n_test}_s{seed}_px{size}_v{GENERATOR_VERSION}.npz"


def _save_disk(key: tuple, dom: Domain) -> None:
    path = _disk_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays: dict[str, Any] = {
        "train_images": dom.train.images, "train_labels": dom.train.labels,
        "test_images": dom.test.images, "test_labels": dom.test.labels,
    }
    for split in ("train", "test"):
        for k, v in dom.meta[f"{split}_attrs"].items():
            arrays[f"{split}_attr_{k}"] = np.array(v, dtype=str)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: concurrent writers never leave a half-written file


def _load_disk(key: tuple) -> Domain | None:
    path = _disk_path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception:  # a damaged cache file is regenerated
        return None
    name, _, _, seed, _ = key
    meta: dict[str, Any] = {"source": "synthetic", "style": name, "description": STYLE_DESCRIPTIONS[name], "seed": seed}
    for split in ("train", "test"):
        prefix = f"{split}_attr_"
        meta[f"{split}_attrs"] = {k[len(prefix):]: [str(x) for x in v] for k, v in data.items() if k.startswith(prefix)}
    return Domain(name, list(DIGIT_CLASSES), ImageSplit(data["train_images"], data["train_labels"]),
                  ImageSplit(data["test_images"], data["test_labels"]), meta=meta)


def clear_memo() -> None:
    """Forget the in-process memo of ``load_synthetic``."""
    _MEMO.clear()


# --------------------------------------------------------------------------- captions
_TEMPLATES_PLAIN = [
    "a photo of the digit {c}",
    "a photo of the number {c}",
    "the digit {c}",
    "the number {c}",
    "a picture of {a}",
    "an image of the digit {c}",
    "{c}",
    "a drawing of {a}",
    "a close-up of the digit {c}",
    "a small image of {a}",
    "the handwritten digit {c}",
    "{a}",
]
_TEMPLATES_STYLED = [
    "the digit {c} {s}",
    "{a} {s}",
    "a photo of the digit {c}, {s}",
    "a {adj} image of the digit {c}",
    "a {adj} picture of {a}",
    "the number {c} {s}",
    "{c}, {s}",
]


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeio" and not word.startswith("one") else f"a {word}"  # "a one", "an eight"


def _pick(rng: Any, seq: Sequence[Any]) -> Any:
    if isinstance(rng, np.random.Generator):
        return seq[int(rng.integers(0, len(seq)))]
    if isinstance(rng, _pyrandom.Random):
        return seq[rng.randrange(len(seq))]
    if rng is None:
        return _pyrandom.choice(seq)
    raise TypeError("rng must be a numpy Generator or a random.Random")


def _rand(rng: Any) -> float:
    if isinstance(rng, np.random.Generator):
        return float(rng.random())
    if isinstance(rng, _pyrandom.Random):
        return rng.random()
    return _pyrandom.random()


def style_description(style: str) -> str:
    """One line saying what a style looks like."""
    return STYLE_DESCRIPTIONS[_canonical_style(style)]


def caption(label: int, style: str, rng: Any = None, attrs: dict[str, str] | None = None) -> str:
    """A varied natural caption for an image of digit ``label`` in ``style``; it always contains the
    class word (``DIGIT_CLASSES[label]``). ``rng``: numpy Generator or random.Random. ``attrs``
    (one image's entry of ``domain.meta['train_attrs']``, e.g. ``{"fg": "red", "bg": "blue"}``)
    lets the caption name the actual colours or background pattern."""
    c = DIGIT_CLASSES[int(label)]
    style_key = str(style).strip().lower().replace("colour", "color")
    a = _article(c)
    r = _rand(rng)
    if style_key not in _STYLE_PHRASES or r < 0.35:
        return _pick(rng, _TEMPLATES_PLAIN).format(c=c, a=a)
    if attrs and _rand(rng) < 0.6:
        specific = _attr_caption(c, style_key, attrs, rng)
        if specific:
            return specific
    s = _pick(rng, _STYLE_PHRASES[style_key])
    adj = _pick(rng, _STYLE_ADJECTIVES[style_key])
    return _pick(rng, _TEMPLATES_STYLED).format(c=c, a=a, s=s, adj=adj)


def _attr_caption(c: str, style: str, attrs: dict[str, str], rng: Any) -> str | None:
    if style == "color" and "fg" in attrs and "bg" in attrs:
        return _pick(rng, [
            "{c} written in {fg} on a {bg} background",
            "a {fg} {c} on {bg}",
            "the digit {c} in {fg} on a {bg} background",
            "a photo of a {fg} digit {c} on {bg}",
        ]).format(c=c, fg=attrs["fg"], bg=attrs["bg"])
    if style == "outline" and "fg" in attrs:
        return _pick(rng, [
            "a {fg} outline of the digit {c}",
            "the digit {c} drawn as a {fg} outline on a dark background",
            "{c} in {fg} outline",
        ]).format(c=c, fg=attrs["fg"])
    if style == "texture" and "pattern" in attrs:
        return _pick(rng, [
            "the digit {c} over {p}",
            "{c} on a background of {p}",
            "a photo of the digit {c} on {p}",
        ]).format(c=c, p=attrs["pattern"])
    return None


def image_attrs(domain: Domain, split: str, index: int) -> dict[str, str]:
    """The caption attributes of one synthetic image (empty for other sources)."""
    table = domain.meta.get(f"{split}_attrs", {})
    return {k: v[index] for k, v in table.items()}
