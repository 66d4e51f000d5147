"""MAP without source data: pseudo-source images synthesised from the source model's BatchNorm
statistics (SF, DF), unauthorized images moved to those statistics (SF) and neighbour domains
from randomly shifted statistics (DF)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.errors import IPShieldError
from ipshield.protect.map.config import MAPConfig
from ipshield.utils import progress, resolve_device, seed_everything


# --------------------------------------------------------------------------------------------- pseudo-source synthesis


class PseudoSourceGenerator(nn.Module):
    """Conditional generator G(z, y) -> image in [0, 1]."""

    def __init__(self, num_classes: int, z_dim: int = 64, image_size: int = 32, width: int = 32):
        super().__init__()
        if image_size % 4:
            raise IPShieldError(f"image size {image_size} is not a multiple of 4", "use 32 px images")
        self.num_classes, self.z_dim, self.side = num_classes, z_dim, image_size // 4
        self.fc = nn.Linear(z_dim + num_classes, 2 * width * self.side * self.side)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, 3, 3, padding=1),
        )
        self.width = width

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1))
        h = h.view(len(z), 2 * self.width, self.side, self.side)
        return torch.sigmoid(self.body(h))


class _BNStatHook:
    """Collects, for every BatchNorm layer of the frozen source model, the distance between the
    batch statistics of its input and the layer's running statistics."""

    def __init__(self, model: nn.Module):
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        #: optional per-layer (mean, var) targets in place of the running statistics
        self.targets: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        t_mean, t_var = self.targets.get(module, (module.running_mean, module.running_var))
        self.losses.append(torch.norm(mean - t_mean, 2) + torch.norm(var - t_var, 2))

    def pop(self) -> torch.Tensor:
        out = torch.stack(self.losses).sum()
        self.losses = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _bn_matching(model: nn.Module):
    """The frozen source model in eval mode with a ``_BNStatHook`` on it; restores the parameters'
    ``requires_grad`` and removes the hook on exit."""
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    hook = _BNStatHook(model.eval())
    try:
        yield hook
    finally:
        hook.remove()
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)


def require_batchnorm(model: nn.Module, what: str) -> None:
    from ipshield.models.classifiers import has_batchnorm

    if not has_batchnorm(model):
        raise IPShieldError(
            f"{what} needs BatchNorm layers in the source model, because its pseudo-source images are synthesised "
            "by matching the batch statistics the source model stored in its BatchNorm layers (running mean and variance); "
            f"{type(model).__name__} has none",
            "use a source model with BatchNorm (e.g. --arch vgg_small or resnet_small), or SA-MAP with real source data",
        )


def synthesize_pseudo_source(source_model: nn.Module, num_classes: int, config: MAPConfig,
                             log_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train a generator against the frozen source model and sample ``n_pseudo`` class-balanced
    pseudo-source images. Returns images [N, 3, S, S] in [0, 1], their requested labels, and info
    (losses, the source model's accuracy on the requested labels)."""
    require_batchnorm(source_model, "synthesising pseudo-source data (SF-MAP / DF-MAP)")
    g = seed_everything(config.seed + 101)
    device = resolve_device(config.device)
    model = source_model.eval()
    gen = PseudoSourceGenerator(num_classes, config.z_dim, config.image_size, config.gen_width).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=config.gen_lr, betas=(0.5, 0.999))
    half = max(1, config.gen_batch_size // 2)
    history = []
    t0 = time.time()
    with _bn_matching(model) as hook:
        for step in progress(range(config.gen_steps), desc="pseudo-source generator"):
            y_half = torch.randint(0, num_classes, (half,), generator=g).to(device)
            y = torch.cat([y_half, y_half])
            z = torch.randn(2 * half, config.z_dim, generator=g).to(device)
            x = gen(z, y)
            hook.losses = []
            logits = model(x)
            l_bn = hook.pop()
            l_ce = F.cross_entropy(logits, y)
            # mode seeking: same class, different noise -> different images
            dx = (x[:half] - x[half:]).abs().mean((1, 2, 3))
            dz = (z[:half] - z[half:]).abs().mean(1)
            l_div = -(dx / dz).mean()
            loss = config.bn_weight * l_bn + config.ce_weight * l_ce + config.diversity_weight * l_div
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step == config.gen_steps - 1:
                history.append({"step": step, "bn": l_bn.item(), "ce": l_ce.item(), "div": l_div.item()})
        images, labels = [], []
        n = config.n_pseudo
        y_all = torch.arange(n) % num_classes
        y_all = y_all[torch.randperm(n, generator=g)]
        with torch.no_grad():
            for s in range(0, n, config.gen_batch_size):
                y = y_all[s:s + config.gen_batch_size].to(device)
                z = torch.randn(len(y), config.z_dim, generator=g).to(device)
                images.append(gen(z, y).cpu())  # generator in train mode: batch statistics as in training
                labels.append(y.cpu())
    x_all, y_all = torch.cat(images), torch.cat(labels)
    with torch.no_grad():
        pred = torch.cat([model(x_all[s:s + 256].to(device)).argmax(-1).cpu() for s in range(0, len(x_all), 256)])
    info = {"history": history, "source_agreement": float((pred == y_all).float().mean() * 100),
            "seconds": round(time.time() - t0, 1)}
    return x_all, y_all, info


def _optimise_pixels(model: nn.Module, hook: _BNStatHook, x: torch.Tensor, y: torch.Tensor, steps: int,
                     config: MAPConfig) -> tuple[torch.Tensor, float]:
    """Move a batch in pixel space (Adam at ``translate_lr`` on the pixel logits) to the statistics
    ``hook`` measures against (the running statistics, or ``hook.targets``), with a cross-entropy
    to the classes ``y``. Returns the moved images and the last BatchNorm distance."""
    z = torch.logit(x.clamp(0.02, 0.98)).detach().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=config.translate_lr)
    last = float("nan")
    for _ in range(steps):
        hook.losses = []
        logits = model(torch.sigmoid(z))
        l_bn = hook.pop()
        loss = config.bn_weight * l_bn + config.ce_weight * F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(l_bn.detach())
    return torch.sigmoid(z).detach(), last


def translate_to_source(source_model: nn.Module, images: torch.Tensor, config: MAPConfig,
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Pseudo-source images made from other images (SF: the unauthorized training images): each
    batch is optimised in pixel space (logits of the pixels, Adam, ``translate_steps`` steps of
    ``translate_lr``) so that the batch statistics at the source model's BatchNorm layers match the
    stored running statistics, with a cross-entropy to the class the source model predicted on the
    original image. Returns the images, those classes and info (the final BatchNorm distance)."""
    require_batchnorm(source_model, "translating images to the source statistics (SF-MAP)")
    device = resolve_device(config.device)
    model = source_model.eval()
    out, labels, last = [], [], float("nan")
    t0 = time.time()
    with _bn_matching(model) as hook:
        for s in progress(range(0, len(images), batch_size), desc="translate to source statistics"):
            x = images[s:s + batch_size].to(device)
            with torch.no_grad():
                y = model(x).argmax(-1)
            moved, last = _optimise_pixels(model, hook, x, y, config.translate_steps, config)
            out.append(moved.cpu())
            labels.append(y.cpu())
    return torch.cat(out), torch.cat(labels), {"n": len(images), "bn_distance": last, "seconds": round(time.time() - t0, 1)}


def synthesize_stat_neighbours(source_model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: MAPConfig
                               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """DF-MAP neighbour domains from feature-statistics shifts: each batch of
    ``stat_domain_size`` pseudo-source images is optimised in pixel space so that its statistics
    at every BatchNorm layer of the source model match a random shift of the running statistics
    (mean + stat_shift * N(0, 1) * running std per channel, var * exp(stat_shift * N(0, 1))),
    with a cross-entropy to the requested class: images the source model still recognises, from
    a domain whose feature statistics differ from the source's. Returns the images and info."""
    require_batchnorm(source_model, "DF-MAP neighbour domains from feature statistics")
    device = resolve_device(config.device)
    model = source_model.eval()
    g = torch.Generator().manual_seed(config.seed + 23)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    out, t0 = [], time.time()
    with _bn_matching(model) as hook:
        for s in progress(range(0, len(images), config.stat_domain_size), desc="neighbour domains (statistics)"):
            x, y = images[s:s + config.stat_domain_size].to(device), labels[s:s + config.stat_domain_size].to(device)
            for m in bns:  # every layer gets a new random target: one neighbour domain per batch
                c = m.running_mean.shape[0]
                sd = m.running_var.sqrt()
                mean = m.running_mean + config.stat_shift * torch.randn(c, generator=g).to(device) * sd
                var = m.running_var * torch.exp(config.stat_shift * torch.randn(c, generator=g).to(device))
                hook.targets[m] = (mean, var)
            out.append(_optimise_pixels(model, hook, x, y, config.stat_steps, config)[0].cpu())
    return torch.cat(out), {"n": len(images), "domains": -(-len(images) // config.stat_domain_size),
                            "seconds": round(time.time() - t0, 1)}
