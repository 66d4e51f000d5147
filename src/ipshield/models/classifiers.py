"""Image classifiers for the domain-restriction methods that protect a whole model (MAP, NTL,
CUTI-domain), sized for 32 px RGB digits.

Every architecture is a ``ClassifierNet``: an ordered list of feature ``stages`` (each ends with
a down-sampling step) followed by a ``head`` (flatten + MLP). The stage boundaries are what
NTL's feature map (the output of the first stages) and CUTI-domain's per-stage restyling use.

``Classifier`` wraps a net with its class names and its input normalisation, so that
``classifier.predict_logits(images in [0, 1])`` works with ``ipshield.models.evaluation.accuracy``.
Checkpoints are a folder with ``model.safetensors`` + ``classifier.json`` (arch name and
arguments, classes, image size, normalisation): nothing is pickled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.config import BaseConfig
from ipshield.errors import CheckpointError, DataError, IPShieldError
from ipshield.registry import CLASSIFIERS

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_INFO = "classifier.json"


class ClassifierNet(nn.Module):
    """``stages`` (feature extractor, split where NTL/CUTI need it) then ``head``."""

    stages: nn.ModuleList
    head: nn.Module

    def features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        for stage in list(self.stages)[: upto if upto is not None else len(self.stages)]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGSmall(ClassifierNet):
    """VGG-style CNN with BatchNorm for 32 px inputs: conv blocks (3x3 conv-BN-ReLU, max-pool)
    and the 256-256-C head of the NTL protocol. ``widths`` lists each block's convs, e.g.
    ``[[16], [32], [64, 64], [64]]`` (a block per 2x down-sampling; the default is narrow so that
    the whole digits benchmark fits 30 CPU minutes [ours])."""

    def __init__(self, num_classes: int, image_size: int = 32, widths: Sequence[Sequence[int]] = ((16,), (32,), (64, 64), (64,)),
                 hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        cin = 3
        stages = []
        for block in widths:
            layers: list[nn.Module] = []
            for cout in block:
                layers += _conv_bn(cin, cout)
                cin = cout
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        side = image_size // (2 ** len(widths))
        if side < 1:
            raise IPShieldError(f"image size {image_size} is too small for {len(widths)} pooling blocks", "use fewer blocks or larger images")
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(ClassifierNet):
    """A small ResNet with BatchNorm (a stem and one basic block per stage, stride 2 after the
    first), global average pooling and a linear head."""

    def __init__(self, num_classes: int, image_size: int = 32, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        stem = nn.Sequential(*_conv_bn(3, widths[0]))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            block = _BasicBlock(cin, w, stride=1 if i == 0 else 2)
            stages.append(nn.Sequential(stem, block) if i == 0 else block)
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


@CLASSIFIERS.register("vgg-small")
def vgg_small(num_classes: int, image_size: int = 32, **kw: Any) -> ClassifierNet:
    return VGGSmall(num_classes, image_size, **kw)


@CLASSIFIERS.register("vgg-tiny")
def vgg_tiny(num_classes: int, image_size: int = 32, **kw: Any) -> ClassifierNet:
    """Half-width ``vgg_small`` for fast tests."""
    kw.setdefault("widths", ((8,), (16,), (32,), (32,)))
    kw.setdefault("hidden", 64)
    return VGGSmall(num_classes, image_size, **kw)


@CLASSIFIERS.register("resnet-small")
def resnet_small(num_classes: int, image_size: int = 32, **kw: Any) -> ClassifierNet:
    return ResNetSmall(num_classes, image_size, **kw)


def canonical_arch(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def build_net(arch: str, num_classes: int, image_size: int = 32, **kw: Any) -> ClassifierNet:
    factory = CLASSIFIERS.get(arch).obj
    return factory(num_classes, image_size, **kw)


class Classifier(nn.Module):
    """A classifier over named classes. ``forward`` takes images in [0, 1] (resized to
    ``image_size`` and normalised inside) and returns logits."""

    def __init__(self, net: nn.Module, classes: Sequence[str], arch: str = "custom", image_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 arch_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.classes = list(classes)
        self.arch = arch
        self.image_size = int(image_size)
        self.arch_kwargs = dict(arch_kwargs or {})
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)

    def info(self) -> dict[str, Any]:
        return {
            "format": "ipshield-classifier/1",
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``classifier.json`` into folder ``out``."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / CHECKPOINT_WEIGHTS), metadata={"format": "ipshield-classifier/1", "arch": self.arch})
        info = self.info()
        info.update(extra or {})
        (out / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return out


def create_classifier(arch: str, classes: Sequence[str], image_size: int = 32, **arch_kwargs: Any) -> Classifier:
    net = build_net(arch, len(classes), image_size, **arch_kwargs)
    return Classifier(net, classes, arch=canonical_arch(arch), image_size=image_size, arch_kwargs=arch_kwargs)


def load_classifier(path: str | Path, classes: Sequence[str] | None = None, arch: str | None = None,
                    device: str | torch.device = "cpu") -> Classifier:
    """Load a classifier folder written by ``Classifier.save``. ``classes`` / ``arch``, when given,
    must match the checkpoint (a ``CheckpointError`` says what differs)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.name in (CHECKPOINT_WEIGHTS, CHECKPOINT_INFO):
        p = p.parent
    info_path, weights_path = p / CHECKPOINT_INFO, p / CHECKPOINT_WEIGHTS
    if not info_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{p} is not a classifier folder (needs {CHECKPOINT_INFO} and {CHECKPOINT_WEIGHTS})",
                              "give a folder written by `ipshield train-source` or a protection run")
    try:
        info = json.loads(info_path.read_text())
        net_arch, net_classes, size = info["arch"], list(info["classes"]), int(info["image_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{info_path} is not a valid classifier description ({exc})", "re-create the checkpoint with ipshield") from None
    if arch is not None and canonical_arch(arch) != canonical_arch(net_arch):
        raise CheckpointError(f"checkpoint {p} holds a '{net_arch}' classifier, not '{arch}'", f"use --arch {net_arch} or another checkpoint")
    if classes is not None and list(classes) != net_classes:
        raise CheckpointError(
            f"checkpoint {p} was trained on classes {net_classes}, the data has {list(classes)}",
            "use a source model trained on the same classes, in the same order",
        )
    net = build_net(net_arch, len(net_classes), size, **info.get("arch_kwargs", {}))
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({exc})", "re-create the checkpoint") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"the weights in {weights_path} do not fit a '{net_arch}' with {len(net_classes)} classes: {' '.join(first[:3])[:400]}",
            "the checkpoint and classifier.json disagree; re-create the checkpoint",
        ) from None
    clf = Classifier(net, net_classes, arch=net_arch, image_size=size, mean=info.get("mean", (0.5,) * 3),
                     std=info.get("std", (0.5,) * 3), arch_kwargs=info.get("arch_kwargs", {}))
    return clf.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Training a source model


class SourceTrainConfig(BaseConfig):
    arch: str = "vgg_small"
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    #: training images used (None = all); the digits benchmark uses a subset to fit its time budget
    n_train: int | None = None
    image_size: int = 32
    #: light augmentation (random shifts of up to 2 px) during source training
    augment: bool = True
    seed: int = 0
    device: str = "cpu"


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation: shift the batch by one random (dx, dy) in [-max_shift, max_shift]
    (replicate padding), drawn from ``generator``."""
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


#: the old private name, kept importable
_random_shift = random_shift


def random_domain_shift(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Per image, a random small domain shift of ``x`` ([B, 3, H, W] in [0, 1]): colour/contrast
    jitter per channel, inversion (probability 0.3 * strength), a smooth random coloured texture
    blended in, Gaussian noise and a shift of up to 2 pixels [ours]."""
    b, c, h, w = x.shape
    s = float(strength)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    contrast = 1.0 + s * (2 * u(b, c, 1, 1) - 1) * 0.5
    bright = s * (2 * u(b, c, 1, 1) - 1) * 0.3
    y = (x - 0.5) * contrast + 0.5 + bright
    inv = (u(b, 1, 1, 1) < 0.3 * s).float()
    y = inv * (1 - y) + (1 - inv) * y
    texture = F.interpolate(u(b, c, 4, 4), size=(h, w), mode="bilinear", align_corners=False)
    alpha = s * 0.6 * u(b, 1, 1, 1)
    y = (1 - alpha) * y + alpha * texture
    y = y + s * 0.08 * u(b, 1, 1, 1) * torch.randn(y.shape, generator=g)
    return random_shift(y.clamp(0, 1), 2, g)


def fit_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int = 64,
                   lr: float = 1e-3, weight_decay: float = 5e-4, augment: bool = True, seed: int = 0,
                   desc: str = "train", log: Callable[[str], None] | None = None) -> list[float]:
    """Plain supervised training (Adam, cosine schedule); returns the mean loss per epoch."""
    from ipshield.utils import progress

    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(labels)
    steps = max(1, epochs * ((n + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = []
    model.train()
    for ep in progress(range(epochs), desc=desc):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            if augment:
                x = random_shift(x, 2, g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        if log:
            log(f"{desc} epoch {ep + 1}/{epochs}: loss {losses[-1]:.4f}")
    model.eval()
    return losses


def train_source(arch: str, domain: Any, epochs: int = 4, config: SourceTrainConfig | None = None,
                 out: str | Path | None = None, **overrides: Any) -> Classifier:
    """Train a classifier of architecture ``arch`` on ``domain`` (an ``ipshield.data.Domain``).
    With ``out``, the model is saved there (``classifier.json`` + ``model.safetensors``) with its
    test accuracy and the training settings."""
    from ipshield.models.evaluation import accuracy
    from ipshield.utils import seed_everything

    cfg = config or SourceTrainConfig.build({"arch": arch, "epochs": epochs, **overrides})
    seed_everything(cfg.seed)
    split = domain.train
    if cfg.n_train is not None and cfg.n_train < len(split):
        split = split.subset(balanced_subset(split.labels, cfg.n_train, cfg.seed))
    if len(split) == 0:
        raise DataError(f"domain '{domain.name}' has no training images", "check the data source")
    images = split.to_tensor(cfg.image_size)
    labels = torch.as_tensor(split.labels)
    if int(labels.max()) >= len(domain.classes) or int(labels.min()) < 0:
        raise DataError(f"labels of '{domain.name}' fall outside its {len(domain.classes)} classes", "check the data source")
    model = create_classifier(cfg.arch, domain.classes, cfg.image_size).to(cfg.device)
    t0 = time.time()
    losses = fit_classifier(model, images, labels, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.augment, cfg.seed,
                            desc=f"train-source {domain.name}")
    acc = accuracy(model, domain.test, size=cfg.image_size)
    model.train_info = {"domain": domain.name, "test_accuracy": acc, "n_train": len(split), "losses": losses,  # type: ignore[attr-defined]
                        "seconds": round(time.time() - t0, 1), "config": cfg.to_dict()}
    if out is not None:
        model.save(out, extra={"trained_on": model.train_info})  # type: ignore[attr-defined]
    return model


def balanced_subset(labels, n: int, seed: int = 0):
    """Indices of about ``n`` samples with the classes as balanced as the data allow."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    out: list[int] = []
    i = 0
    while len(out) < n and any(i < len(p) for p in per):
        for p in per:
            if i < len(p) and len(out) < n:
                out.append(int(p[i]))
        i += 1
    return np.sort(np.asarray(out, dtype=np.int64))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
