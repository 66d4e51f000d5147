"""MAP, mask pruning for (source-free) model IP protection (Peng et al., CVPR 2024), as
reconstructed in ../shared/specs/map.md: the paper's code and body were not available, so every
detail below the abstract is this project's choice ([ours], see docs/map.md).

The source classifier is frozen. Every conv and linear weight gets a real-valued score tensor;
the forward pass uses the weight times the binary mask ``M = 1[score > 0]`` (straight-through
estimator in the backward pass, scores initialised positive so the protected model starts equal
to the source model; BatchNorm stays in eval mode with the source running statistics). Only the
scores are trained (Adam), with

    L = KL(p_src(x_s) || p_M(x_s)) - alpha * min(kl_cap, KL(p_src(x_t) || p_M(x_t)))

(+ an optional penalty on the pruned fraction). The three settings differ in x_s and x_t:

- ``sa`` (SA-MAP): real authorized and real unauthorized training images;
- ``sf`` (SF-MAP): pseudo-source images synthesised from the source model (a conditional
  generator trained so that its images match the source BatchNorm statistics, are classified as
  the requested class and are diverse) and real unauthorized images;
- ``df`` (DF-MAP): the pseudo-source images, and synthetic neighbour domains in place of the
  unknown unauthorized domains: strong pixel shifts of the pseudo-source
  (``ipshield.protect.shifts``) and/or pseudo-source batches moved to random shifts of the source
  BatchNorm statistics (``synthesize_stat_neighbours``).

Options the registry entries turn on (``SA_DEFAULTS``, ``SF_DEFAULTS``, ``DF_DEFAULTS``; measured
in docs/map.md): mixtures of source images in the preservation term, a top-2 push and held-out
mask selection (SA); a BatchNorm-feature preservation term and unauthorized images moved to the
source statistics (SF); both kinds of neighbour domains (DF).

``export`` folds the mask into the weights: the protected model is an ordinary classifier with
pruned (zero) weights and no inference overhead.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator
from torch.func import functional_call

from ipshield.distributed import average_gradients, init_from_env, shard
from ipshield.data.domain import Domain
from ipshield.errors import IPShieldError
from ipshield.protect.restrict import (
    BatchStream,
    RestrictionConfig,
    RestrictionMethod,
    calibrate_watermark_opacity,
    evaluate,
    finish_run,
    prepare_run,
    kl_to_reference,
    ownership_watermark,
    tensor_accuracy,
    train_tensors,
)
from ipshield.registry import METHODS
from ipshield.utils import progress, seed_everything

MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class MAPConfig(RestrictionConfig):
    setting: Literal["sa", "sf", "df"] = "sa"
    steps: int = 300
    batch_size: int = 32
    #: Adam learning rate of the mask scores
    lr: float = 1e-2
    #: initial score of every weight (> 0: the mask starts all ones)
    score_init: float = 0.3
    #: weight of the unauthorized (divergence) term
    alpha: float = 0.1
    #: the divergence term is capped at this value (nats), per sample [ours: the spec's cap of
    #: 1 nat on the batch mean does not make the unauthorized prediction wrong; capping each
    #: sample at 5 nats keeps pushing the samples that are still classified as by the source]
    kl_cap: float = 5.0
    #: cap each sample's divergence (True) or the batch mean (False, as in NTL)
    cap_per_sample: bool = True
    #: divergence on the unauthorized data: "ce" = KL(onehot(source prediction) || p_M), i.e. the
    #: cross-entropy to the source's predicted class [ours: unlike the soft KL it has a gradient
    #: at the start, where p_M = p_src]; "kl" = KL(p_src || p_M) as in the spec's sketch
    target_loss: Literal["ce", "kl"] = "ce"
    #: random shifts (up to 2 px) of the training batches, so the mask generalises beyond the
    #: training images [ours]
    augment: bool = True
    #: penalty on the pruned fraction (keeps the mask close to all ones)
    sparsity_penalty: float = 0.0
    #: extra source-preservation images per step, as a fraction of the batch: mixtures
    #: lam * x_i + (1 - lam) * x_j of two source images (lam ~ U(0, 1)), whose source outputs the
    #: mask must also keep [ours: the training images alone are fitted confidently by the source
    #: model, so keeping them says little about the borderline test images; mixtures keep the
    #: decision boundaries between the classes]
    preserve_mix: float = 0.0
    #: weight of an extra cross-entropy to the source's predicted class on the source images
    #: [ours: the KL to the source has no gradient while p_M = p_src, i.e. until weights are
    #: already pruned; the cross-entropy has one (on the less confident images, e.g. the
    #: mixtures), so weights the source needs resist the unauthorized term from the start]
    source_ce: float = 0.0
    #: with target_loss "ce": push the unauthorized prediction away from the source's top-k
    #: classes, D = -log(sum of p_M over them) [ours; 1 = the source's predicted class only]
    target_topk: int = 1
    #: weight of a feature-preservation term on the source images: the mean squared difference
    #: between the masked and the source model's BatchNorm outputs (every BN layer; they are
    #: normalised by the source running statistics, so the layers weigh alike) [ours: the output
    #: KL is flat on images the source classifies confidently (e.g. synthesised pseudo-source
    #: images), so the mask can prune what the real source images need before the KL notices;
    #: the features notice]
    preserve_features: float = 0.0
    #: SA/SF: if the source model's accuracy on the (labelled) unauthorized training images is
    #: within this many points of chance, no mask is trained and the model stays unpruned (the
    #: model is already unusable there, and pushing its outputs away from its own guesses only
    #: prunes what the authorized domain needs) [ours]; 0 = off
    skip_at_chance: float = 0.0
    # --- checkpoint selection [ours]
    #: "last": keep the final mask; "val": every ``val_every`` steps evaluate the mask on
    #: images held out of training, and keep, among the evaluated masks whose held-out
    #: unauthorized accuracy is within ``val_tolerance`` points of the lowest one, the mask that
    #: agrees best with the source model on mixtures of held-out authorized images
    select: Literal["last", "val"] = "last"
    #: images held out of each training pool for the selection (removed from training)
    n_val: int = 500
    val_every: int = 25
    val_tolerance: float = 2.0
    # --- pseudo-source synthesis (sf, df)
    #: generator steps [ours: 1000 measured better than 200 for DF-MAP on the grey-digit sources,
    #: MNIST -> USPS 22.5 % vs 49.5 % left in the full digits benchmark; see docs/map.md]
    gen_steps: int = 1000
    gen_batch_size: int = 64
    gen_lr: float = 1e-3
    z_dim: int = 64
    #: generator width (channels at 8 px = 2 x width; small so that synthesis stays cheap on CPU)
    gen_width: int = 32
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    diversity_weight: float = 1.0
    n_pseudo: int = 2000
    #: SF only: also move this many unauthorized training images to the source model's BatchNorm
    #: statistics (pixel optimisation from the image, keeping the source's predicted class) and add
    #: them to the pseudo-source [ours: the generator's images cover a source such as MNIST-M
    #: poorly (colour noise), and the mask then prunes what the real source needs; see
    #: docs/map.md]; 0 = off
    translate_target: int = 0
    translate_steps: int = 50
    translate_lr: float = 0.1
    #: only unauthorized images the source model classifies with at least this probability are
    #: moved (the class it predicts is what the moved image must keep; a weak guess would teach
    #: the mask a wrong class)
    translate_min_confidence: float = 0.9
    # --- neighbour domains (df)
    n_shift_compose: int = 2
    #: DF: where the neighbour domains come from. "shifts" = pixel-space shifts of the
    #: pseudo-source (``ipshield.protect.shifts``); "stats" = feature-statistics shifts: batches
    #: of pseudo-source images optimised in pixel space so that their statistics at the source
    #: model's BatchNorm layers match randomly shifted copies of the running statistics (one
    #: random shift per batch = one neighbour domain), keeping the requested class; "both" = half
    #: of each unauthorized batch from each [ours]
    neighbours: Literal["shifts", "stats", "both"] = "shifts"
    #: size of the random shift of each BatchNorm layer's statistics (means move by this many
    #: running standard deviations per channel, variances are scaled by exp(+-this))
    stat_shift: float = 3.0
    #: pixel-optimisation steps per neighbour domain (Adam at ``translate_lr``)
    stat_steps: int = 25
    #: images per synthesised neighbour domain (one random statistics shift each)
    stat_domain_size: int = 64

    @model_validator(mode="after")
    def _check_setting_options(self) -> "MAPConfig":
        if self.translate_target < 0 or self.translate_steps < 1:
            raise ValueError("translate_target must be >= 0 and translate_steps >= 1")
        if self.translate_target > 0 and self.setting != "sf":
            raise ValueError(f"translate_target moves unauthorized training images, which only SF-MAP uses; "
                             f"setting is '{self.setting}': set translate_target=0 or setting=sf")
        if self.neighbours != "shifts" and self.setting != "df":
            raise ValueError(f"neighbours='{self.neighbours}' chooses DF-MAP's synthetic neighbour domains; setting is "
                             f"'{self.setting}', which trains on real unauthorized images: leave neighbours at 'shifts' or use setting=df")
        if self.stat_shift <= 0 or self.stat_steps < 1 or self.stat_domain_size < 2:
            raise ValueError("stat_shift must be > 0, stat_steps >= 1 and stat_domain_size >= 2")
        return self


# --------------------------------------------------------------------------------------------- masks


class _STEMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, score: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (score > 0).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def maskable_weights(model: nn.Module) -> list[str]:
    """Names of the weights MAP masks: every conv and linear weight (biases and BN stay unmasked)."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, MASKABLE)]


class MaskedClassifier(nn.Module):
    """A frozen classifier whose conv/linear weights are gated by learned binary masks."""

    def __init__(self, model: nn.Module, score_init: float = 0.05):
        super().__init__()
        names = maskable_weights(model)
        if not names:
            raise IPShieldError(
                f"the model ({type(model).__name__}) has no maskable layers: MAP masks the weights of conv and linear layers",
                "give a classifier built from nn.Conv*/nn.Linear layers (e.g. `ipshield train-source --arch vgg_small`)",
            )
        if score_init <= 0:
            raise IPShieldError(f"score_init must be > 0 (got {score_init})", "the mask must start as all ones; use e.g. 0.05")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = names
        params = dict(self.model.named_parameters())
        self.scores = nn.ParameterList([nn.Parameter(torch.full_like(params[n], score_init)) for n in names])

    def train(self, mode: bool = True) -> "MaskedClassifier":
        super().train(mode)
        self.model.eval()  # BN always uses the source running statistics
        return self

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: _STEMask.apply(s) for n, s in zip(self.names, self.scores)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        gated = {n: params[n] * m for n, m in self.masks().items()}
        return functional_call(self.model, gated, (images,))

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.model, "classes", None)

    @torch.no_grad()
    def sparsity(self) -> dict[str, Any]:
        """Pruned fraction per masked weight and overall."""
        per = {n: float((s <= 0).float().mean()) for n, s in zip(self.names, self.scores)}
        total = sum(s.numel() for s in self.scores)
        pruned = sum(int((s <= 0).sum()) for s in self.scores)
        return {"per_layer": per, "overall": pruned / max(1, total), "pruned": pruned, "total": total}

    @torch.no_grad()
    def export(self) -> nn.Module:
        """An ordinary copy of the model with the mask folded into the weights (pruned weights = 0)."""
        out = copy.deepcopy(self.model)
        params = dict(out.named_parameters())
        for n, s in zip(self.names, self.scores):
            params[n].mul_((s > 0).to(params[n].dtype))
        for p in out.parameters():
            p.requires_grad_(True)
        return out.eval()


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


class _FeatureTap:
    """Records the output of every BatchNorm layer of a model on each forward pass (the masked
    model runs the same modules through ``functional_call``, so one tap serves both)."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))
                        for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
    device = torch.device(config.device)
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
    device = torch.device(config.device)
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
    device = torch.device(config.device)
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


# --------------------------------------------------------------------------------------------- training


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 512) -> torch.Tensor:
    return torch.cat([F.softmax(model(x[s:s + bs].to(device)), -1).cpu() for s in range(0, len(x), bs)])


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    from ipshield.models.classifiers import _random_shift as shift

    return shift(x, max_shift, g)


def train_masks(masked: MaskedClassifier, source_model: nn.Module, x_src: torch.Tensor, x_tgt: torch.Tensor | None,
                config: MAPConfig, neighbour: bool = False,
                val: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                x_stat: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Learn the mask scores. ``x_tgt`` is the unauthorized pool (or, with ``neighbour``, None:
    each step's unauthorized batch is a strong shift of another pseudo-source batch).

    ``val`` = (authorized images, labels, unauthorized images, labels) held out of training:
    with ``config.select == "val"`` the mask is evaluated on them every ``val_every`` steps and
    the best evaluated mask is kept (see ``MAPConfig.select``); the history records the choice.
    """
    device = torch.device(config.device)
    init_from_env()
    g = torch.Generator().manual_seed(config.seed + 7)
    p_src = _probs(source_model, x_src, device)
    src = BatchStream(x_src, p_src, batch_size=config.batch_size, generator=g)
    if neighbour:
        tgt = BatchStream(x_src, batch_size=config.batch_size, generator=g)
    elif x_tgt is not None:
        tgt = BatchStream(x_tgt, _probs(source_model, x_tgt, device), batch_size=config.batch_size, generator=g)
    elif x_stat is not None:
        tgt = None
    else:
        raise ValueError("train_masks needs unauthorized images (x_tgt), neighbour=True or x_stat")
    stat = None if x_stat is None else BatchStream(x_stat, _probs(source_model, x_stat, device),
                                                     batch_size=config.batch_size, generator=g)
    opt = torch.optim.Adam(masked.scores.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.steps))
    masked.train()
    use_val = config.select == "val" and val is not None
    tap = None
    if config.preserve_features > 0:
        from ipshield.models.classifiers import has_batchnorm

        if not has_batchnorm(source_model):
            raise IPShieldError("preserve_features compares BatchNorm outputs, and the source model has no BatchNorm layer",
                                "set preserve_features=0, or use a source model with BatchNorm (e.g. --arch vgg_small)")
        tap = _FeatureTap(source_model)
    try:
        history = _mask_steps(masked, source_model, src, tgt, opt, sched, config, neighbour, g, device, val, use_val, tap,
                              stat)
    finally:
        if tap is not None:
            tap.remove()
    masked.eval()
    return history


def _mask_steps(masked, source_model, src, tgt, opt, sched, config, neighbour, g, device, val, use_val, tap, stat):
    """The optimisation loop of ``train_masks`` (``tap``: the BatchNorm-output tap of the feature
    term or None; ``stat``: the stream of statistics neighbours or None)."""
    from ipshield.protect.shifts import neighbour_shift

    history: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    for step in progress(range(config.steps), desc=f"{config.setting}-map masks"):
        xs, ps = src.next()
        if stat is not None and not neighbour:
            xt, pt = stat.next()
        elif neighbour:
            (xn,) = tgt.next()
            xt = neighbour_shift(xn, g, n_compose=config.n_shift_compose)
            pt = _probs(source_model, xt, device)
            if stat is not None:  # "both": half of the batch from each source of neighbours
                xq, pq = stat.next()
                h = len(xt) // 2
                xt, pt = torch.cat([xt[:h], xq[: len(xq) - h]]), torch.cat([pt[:h], pq[: len(xq) - h]])
        else:
            xt, pt = tgt.next()
        if config.augment:
            xs, xt = _random_shift(xs, 2, g), _random_shift(xt, 2, g)
        n_mix = int(round(config.preserve_mix * len(xs)))
        if n_mix > 0:
            i = torch.randint(0, len(xs), (n_mix,), generator=g)
            j = torch.randint(0, len(xs), (n_mix,), generator=g)
            lam = torch.rand(n_mix, 1, 1, 1, generator=g)
            xm = lam * xs[i] + (1 - lam) * xs[j]
            xs, ps = torch.cat([xs, xm]), torch.cat([ps, _probs(source_model, xm, device)])
        # several processes (torchrun): each keeps its slice of the same batch; gradients are
        # averaged below (BatchNorm runs on the source statistics, so the slices are independent)
        full = len(xs)
        part, part_t = shard(torch.arange(full)), shard(torch.arange(len(xt)))
        if len(part) < full:
            xs, ps, xt, pt = xs[part], ps[part], xt[part_t], pt[part_t]
        xs, ps, xt, pt = xs.to(device), ps.to(device), xt.to(device), pt.to(device)
        if tap is not None:
            with torch.no_grad():
                tap.take()
                source_model(xs)
                f_ref = tap.take()
        logits = masked(torch.cat([xs, xt]))
        l_src = kl_to_reference(ps, logits[: len(xs)])
        if tap is not None:
            f_m = tap.take()
            l_src = l_src + config.preserve_features * torch.stack(
                [F.mse_loss(a[: len(xs)], b) for a, b in zip(f_m, f_ref)]).mean()
        if config.source_ce > 0:
            l_src = l_src + config.source_ce * F.cross_entropy(logits[: len(xs)], ps.argmax(-1))
        lt_logits = logits[len(xs):]
        if config.target_loss == "ce" and config.target_topk > 1:
            top = pt.topk(min(config.target_topk, pt.shape[-1]), dim=-1).indices
            per = -torch.logsumexp(F.log_softmax(lt_logits, -1).gather(1, top), -1)
        elif config.target_loss == "ce":
            per = F.cross_entropy(lt_logits, pt.argmax(-1), reduction="none")
        else:
            per = (pt * (torch.log(pt.clamp_min(1e-8)) - F.log_softmax(lt_logits, -1))).sum(-1)
        l_tgt = per.mean()
        capped = torch.clamp(per, max=config.kl_cap).mean() if config.cap_per_sample else torch.clamp(l_tgt, max=config.kl_cap)
        loss = l_src - config.alpha * capped
        if config.sparsity_penalty > 0:
            loss = loss + config.sparsity_penalty * torch.stack([torch.relu(-s).mean() for s in masked.scores]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(list(masked.scores.parameters()), len(part) / full)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == config.steps - 1:
            history.append({"step": step, "kl_src": l_src.item(), "kl_tgt": l_tgt.item()})
        if use_val and ((step + 1) % config.val_every == 0 or step == config.steps - 1):
            masked.eval()
            acc_a = tensor_accuracy(masked, val[0], val[1], device)
            acc_u = tensor_accuracy(masked, val[2], val[3], device)
            masked.train()
            checkpoints.append({"step": step + 1, "acc_a": acc_a, "acc_u": acc_u,
                                "scores": [sc.detach().clone() for sc in masked.scores]})
    if checkpoints:
        lowest = min(c["acc_u"] for c in checkpoints)
        near = [c for c in checkpoints if c["acc_u"] <= lowest + config.val_tolerance]
        best = max(near, key=lambda c: (c["acc_a"], -c["acc_u"], c["step"]))
        with torch.no_grad():
            for sc, saved in zip(masked.scores, best["scores"]):
                sc.copy_(saved)
        history.append({"selected_step": best["step"], "val": [{"step": c["step"], "agreement_a": c["acc_a"],
                                                                "acc_u": c["acc_u"]} for c in checkpoints]})
    return history


def _hold_out(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``n`` images (at most a quarter of the pool) off a training pool: (train x, y, held-out x, y)."""
    n = min(n, len(x) // 4)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 13))
    keep, held = perm[n:], perm[:n]
    return x[keep], y[keep], x[held], y[held]


def protect(source_model: nn.Module, config: MAPConfig, authorized: Domain | None = None,
            unauthorized: Sequence[Domain] = (), pseudo_source: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[MaskedClassifier, dict[str, Any]]:
    """Learn the MAP mask for ``source_model`` (library entry point without a run folder).

    SA needs ``authorized`` and ``unauthorized`` training data, SF only ``unauthorized``, DF
    neither. ``pseudo_source`` (images, labels) reuses an earlier synthesis (SF/DF).
    """
    from ipshield.models.classifiers import has_batchnorm

    seed_everything(config.seed)
    device = torch.device(config.device)
    source_model = source_model.to(device).eval()
    masked = MaskedClassifier(source_model, config.score_init).to(device)  # checks for maskable layers first
    num_classes = len(getattr(source_model, "classes", None) or []) or _out_features(source_model)
    info: dict[str, Any] = {"setting": config.setting}
    if config.setting in ("sf", "df"):
        if not has_batchnorm(source_model):
            require_batchnorm(source_model, f"{config.setting.upper()}-MAP")
        if pseudo_source is None:
            x_src, y_src, ginfo = synthesize_pseudo_source(source_model, num_classes, config)
            info["pseudo_source"] = ginfo
        else:
            x_src, y_src = pseudo_source
            info["pseudo_source"] = {"reused": True, "n": len(x_src)}
    else:
        if authorized is None:
            raise IPShieldError("SA-MAP needs the authorized (source) training data", "pass the authorized domain, or use setting=sf / df")
        x_src, y_src = train_tensors(authorized, config.n_train, config.image_size, config.seed)
    x_tgt = y_tgt = None
    owner_pseudo = config.scenario == "ownership" and config.setting in ("sf", "df")
    if owner_pseudo:
        # [ours] ownership without data: the owner's own watermark on the pseudo-source images is
        # the unauthorized domain (known exactly, so DF needs no synthetic neighbours here)
        opacity = config.watermark_opacity
        if opacity == "auto":  # calibrated on the pseudo-source (run() passes the opacity it evaluates with)
            opacity, info["watermark_calibration"] = calibrate_watermark_opacity(
                source_model, x_src[:1000].to(device), y_src[:1000].long(), config.watermark_stride, config.watermark_keep)
        x_tgt, y_tgt = ownership_watermark(x_src, config.watermark_stride, float(opacity)), y_src.long().clone()
        info["unauthorized_data"] = "ownership watermark on the pseudo-source"
    elif config.setting in ("sa", "sf"):
        if not unauthorized:
            raise IPShieldError(f"{config.setting.upper()}-MAP needs unauthorized training data", "name an unauthorized domain, or use setting=df")
        pools = [train_tensors(d, config.n_train, config.image_size, config.seed) for d in unauthorized]
        x_tgt, y_tgt = torch.cat([p[0] for p in pools]), torch.cat([p[1] for p in pools])
        if config.skip_at_chance > 0:
            acc = 100.0 * float((_probs(source_model, x_tgt, device).argmax(-1) == y_tgt.long()).float().mean())
            chance = 100.0 / num_classes
            if acc <= chance + config.skip_at_chance:
                info.update(skipped={"source_acc_u": round(acc, 2), "chance": round(chance, 2),
                                     "reason": "the source model is already at chance on the unauthorized training "
                                               "images: there is nothing to remove, the model is kept unpruned"},
                            history=[], selected=None, sparsity=masked.sparsity())
                return masked, info
    val = None
    if config.select == "val":
        # held-out images for choosing the mask (authorized: real or pseudo-source with their
        # labels; unauthorized: real, or in DF a fixed neighbour shift of held-out pseudo-source)
        from ipshield.protect.shifts import neighbour_shift

        gv = torch.Generator().manual_seed(config.seed + 17)
        x_src, y_src, xa_val, ya_val = _hold_out(x_src, y_src.long(), config.n_val, config.seed)
        if x_tgt is not None:
            x_tgt, y_tgt, xu_val, yu_val = _hold_out(x_tgt, y_tgt, config.n_val, config.seed + 1)
        else:
            xu_val = neighbour_shift(xa_val, gv, n_compose=config.n_shift_compose)
            yu_val = ya_val
        # the authorized criterion: agreement with the source model on mixtures of two held-out
        # images (the source model fits its own training images confidently, so agreement on
        # them barely moves; on mixtures it follows the test accuracy)
        i = torch.randint(0, len(xa_val), (len(xa_val),), generator=gv)
        lam = 0.3 + 0.4 * torch.rand(len(xa_val), 1, 1, 1, generator=gv)
        xa_mix = lam * xa_val + (1 - lam) * xa_val[i]
        val = (xa_mix, _probs(source_model, xa_mix, device).argmax(-1), xu_val, yu_val)
    if config.setting == "sf" and config.translate_target > 0 and not owner_pseudo:
        assert x_tgt is not None  # after the hold-out: only unauthorized *training* images are moved
        conf = _probs(source_model, x_tgt, device).amax(-1)
        pool = x_tgt[conf >= config.translate_min_confidence][:config.translate_target]
        if len(pool):
            x_tr, y_tr, info["translated"] = translate_to_source(source_model, pool, config)
            x_src, y_src = torch.cat([x_src, x_tr]), torch.cat([y_src.long(), y_tr.long()])
        else:
            info["translated"] = {"n": 0, "note": "no unauthorized image reached translate_min_confidence"}
    x_stat = None
    if config.setting == "df" and config.neighbours in ("stats", "both") and not owner_pseudo:
        x_stat, info["neighbours"] = synthesize_stat_neighbours(source_model, x_src, y_src.long(), config)
    info["history"] = train_masks(masked, source_model, x_src, x_tgt, config,
                                  neighbour=config.setting == "df" and config.neighbours != "stats" and not owner_pseudo,
                                  val=val, x_stat=x_stat)
    info["selected"] = next((h["selected_step"] for h in info["history"] if "selected_step" in h), None)
    info["sparsity"] = masked.sparsity()
    return masked, info


def _out_features(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise IPShieldError("cannot tell the number of classes of the model", "give a Classifier with class names")
    return last[-1].out_features


def run(config: MAPConfig, source_model, authorized: Domain, unauthorized: list[Domain], out=None,
        pseudo_source: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Protect ``source_model`` with MAP, evaluate before/after, write the run folder at ``out``.

    In SF and DF the authorized domain is used only for evaluation (and in DF the unauthorized
    domains too): the mask never sees their training images.
    """
    t0 = time.time()
    maskable = maskable_weights(source_model)
    if not maskable:
        MaskedClassifier(source_model)  # raises the clear error
    unauth, before = prepare_run(config, source_model, authorized, unauthorized)
    if config.scenario == "ownership":  # train on the watermark the evaluation uses (an "auto" opacity is resolved now)
        config = config.model_copy(update={"watermark_opacity": unauth[0].meta["opacity"]})
    masked, info = protect(source_model, config, authorized, unauth, pseudo_source)
    protected = masked.export()
    name = f"{config.setting}-map"
    extra_domains = [d for d in unauthorized if d.name not in {u.name for u in unauth}] if config.scenario == "ownership" else []
    if extra_domains:
        before.update(evaluate(source_model, {d.name: d for d in extra_domains}, config.n_test, config.seed, config.image_size))
    return finish_run(name, config, source_model, protected, authorized, unauth, out, t0, extra_domains=extra_domains,
                      before=before, sparsity=info["sparsity"], setting=config.setting,
                      pseudo_source=info.get("pseudo_source"), history=info["history"],
                      **{k: info[k] for k in ("skipped", "unauthorized_data") if k in info})


#: what the ``sa-map`` entry (CLI ``protect map --setting sa``, ``bench digits``) sets on top of the
#: MAPConfig defaults [ours, measured per pair in docs/map.md: mixtures in the preservation term,
#: top-2 push, held-out checkpoint selection, scores starting at 0.2 so that the unauthorized
#: collapse comes early and leaves steps to repair the authorized accuracy, 450 steps].
SA_DEFAULTS: dict[str, Any] = {"setting": "sa", "preserve_mix": 1.0, "target_topk": 2, "select": "val", "score_init": 0.2,
                               "steps": 450, "skip_at_chance": 3.0}
#: what the ``sf-map`` entry sets [ours, measured per pair in docs/map.md: the feature-preservation
#: term, unauthorized images moved to the source statistics, a stronger unauthorized term]
SF_DEFAULTS: dict[str, Any] = {"setting": "sf", "preserve_features": 10.0, "translate_target": 2000, "translate_steps": 25,
                               "alpha": 0.2, "skip_at_chance": 3.0}

METHODS.register("sa-map")(RestrictionMethod("sa-map", MAPConfig, run, dict(SA_DEFAULTS), ("source", "target"),
                                              "MAP with source and unauthorized data"))
METHODS.register("sf-map")(RestrictionMethod("sf-map", MAPConfig, run, dict(SF_DEFAULTS), ("target",),
                                              "MAP with unauthorized data and synthesised pseudo-source data"))
#: what the ``df-map`` entry sets [ours, measured in docs/map.md: half of each unauthorized batch
#: from the pixel shifts, half from random shifts of the source BatchNorm statistics]
DF_DEFAULTS: dict[str, Any] = {"setting": "df", "neighbours": "both", "stat_shift": 3.0}

METHODS.register("df-map")(RestrictionMethod("df-map", MAPConfig, run, dict(DF_DEFAULTS), (),
                                              "MAP without data: pseudo-source and synthetic neighbour domains"))
