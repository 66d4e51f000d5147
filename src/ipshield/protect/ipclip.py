"""IP-CLIP: prompt-based domain restriction of a frozen CLIP (../shared/specs/ip-clip.md).

From the output tokens of every visual block the *style* ((mean + std) / 2 over tokens) and the
*content* (mean over tokens) of each image are read; the IP projector turns them into L domain
tokens and ``n_img`` image tokens; each image gets its own prompt per class

    [SOS] + [L domain tokens] + [the same L domain tokens] + [n_img image tokens] + "<class>." + [EOS]

run through the frozen text encoder. Training pushes the authorized domain's predictions to the
labels and the unauthorized domain's away from them, helped by a style-enhancement branch over
two class-prototype feature banks. One trainer serves the four scenarios:

- ``target-specified``: a labelled unauthorized domain;
- ``ownership``: the authorized domain with the grid watermark is the unauthorized domain;
- ``target-free``: strong augmentation of the authorized domain stands in for unknown domains;
- ``authorization`` (applicability authorization): only watermarked inputs are served.

Speed (all exact): the frozen image tower can run once per image and view (``cache_features``),
text sequences are cut after the longest real prompt (``truncate_text``, exact because the text
transformer is causal), bf16 autocast on GPU (``amp``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.distributed import average_gradients, init_from_env, shard
from ipshield.config import BaseConfig
from ipshield.data.domain import Domain, ImageSplit, check_same_classes
from ipshield.errors import CheckpointError, ConfigError, DataError
from ipshield.protect.prompting import ClassPromptTemplate, class_prompt_template
from ipshield.protect.training import cosine_with_warmup, epoch_batches, subsample, train_augment
from ipshield.registry import METHODS
from ipshield.utils import progress, resolve_device, seed_everything

Scenario = Literal["target-specified", "ownership", "target-free", "authorization"]
SCENARIOS: tuple[str, ...] = ("target-specified", "ownership", "target-free", "authorization")

#: suffix of the name under which a domain's watermarked test split is reported
WATERMARK_SUFFIX = "+watermark"

#: [ref] signed loss weights per scenario: L = sum_k w_k * L_k (a negative weight maximises the term)
SCENARIO_WEIGHTS: dict[str, dict[str, float]] = {
    "target-specified": {"a": 1.0, "u": -1.0, "self": -1.0, "cross": -1.0, "dom": -0.1, "ent": 0.01, "kl": -1.0},
    "target-free": {"a": 1.0, "u": -1.0, "self": 1.0, "cross": -1.0, "dom": -5.0, "ent": 1.0, "kl": -5.0},
}
SCENARIO_WEIGHTS["ownership"] = dict(SCENARIO_WEIGHTS["target-specified"])
SCENARIO_WEIGHTS["authorization"] = dict(SCENARIO_WEIGHTS["target-free"])
LOSS_TERMS = ("a", "u", "self", "cross", "dom", "ent", "kl")
#: terms clipped at ``clip_value`` (no gradient once clipped) [ref]
CLIPPED_TERMS = ("u", "self", "cross", "dom")


class IPCLIPConfig(BaseConfig):
    """Every knob of IP-CLIP. Defaults follow the reference ([ref]) unless marked [ours]."""

    scenario: Scenario = "target-specified"
    # optimisation [ref]: Adam, lr 0.01, wd 5e-4, 50 epochs, 1 warm-up epoch, batch 8 + 8
    epochs: int = 50
    batch_size: int = 8
    lr: float = 0.01
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    #: [ours] at most this many training images per domain (the reference uses random subsets)
    max_train: int | None = 2000
    #: random resized crop of the training images [ref] (scale 0.6-1, no flip for digits [ours])
    augment: bool = True
    # speed (exact)
    #: run the frozen image tower once per training image and view, not once per step
    cache_features: bool = True
    #: views cached per training image when ``augment``: view 0 plain, the others random crops [ours]
    cache_views: int = 4
    #: cut text sequences after the longest real prompt (exact: the text transformer is causal)
    truncate_text: bool = True
    #: run the [SOS + context] prefix, identical for every class of one image, once per image and
    #: let the C class suffixes attend to its keys/values (exact: the text transformer is causal) [ours];
    #: Hugging Face CLIP backend only (others fall back to one sequence per image and class)
    share_prefix: bool = True
    #: bf16 autocast on GPU (ignored on CPU)
    amp: bool = True
    #: the grid watermark of the ownership / authorization scenarios whitens every pixel whose row
    #: or column index is a multiple of this [ref: 2, i.e. even]; a larger stride is a sparser
    #: pattern [ours] (at 32 px stride 2 whitens 75 % of the image, stride 4 44 %, stride 8 23 %)
    watermark_stride: int = 2
    # IP projector [ref]
    n_img_tokens: int = 4
    #: [ref] the n_img image tokens are copies of one token; True gives each its own mixing weights [ours]
    distinct_image_tokens: bool = False
    proj_hidden: int = 256
    #: epsilon inside the square root of the per-layer std [ours]
    stat_eps: float = 1e-6
    #: ablations: replace the image-conditioned domain / image tokens by learned static tokens [ours]
    style_tokens: bool = True
    content_tokens: bool = True
    # style-enhancement branch and feature banks [ref]
    branch: bool = True
    #: [ours] the attention module is trained (the reference never gives it to the optimiser: False)
    branch_trainable: bool = True
    bank_k: int = 5
    attn_hidden: int = 64
    attn_scale: float = 0.1
    # signed loss weights; None = the scenario's default (SCENARIO_WEIGHTS)
    w_a: float | None = None
    w_u: float | None = None
    w_self: float | None = None
    w_cross: float | None = None
    w_dom: float | None = None
    w_ent: float | None = None
    w_kl: float | None = None
    #: the clipped terms stop at this value [ref: 5]
    clip_value: float = 5.0
    #: [ours] clip the cross-entropy terms (L_u, L_self, L_cross) per sample before the batch mean,
    #: so a batch whose mean is past the clip still pushes its samples that are not (the reference
    #: clips the batch mean: False)
    clip_per_sample: bool = False
    # [ours] model selection on a validation split held out of the TRAINING images (never the test
    # split); off by default (the reference keeps the last epoch)
    #: after every epoch score the prompt generator on the validation split and, at the end,
    #: restore the epoch with the best score: among the epochs whose every unauthorized validation
    #: accuracy is <= ``select_max_unauthorized``, the highest authorized validation accuracy
    #: (ties: lower worst unauthorized accuracy, then the later epoch); if no epoch qualifies, the
    #: one with the smallest excess over that bound
    select_best: bool = False
    #: validation images per domain, drawn from the domain's training images outside the
    #: ``max_train`` subset (so the training set is unchanged) when there are that many ...
    val_size: int = 300
    #: ... otherwise this fraction of the training subset is held out (and not trained on)
    val_fraction: float = 0.2
    #: bound (percent) on every unauthorized validation accuracy; None = 1.5 x chance (the issue's bound)
    select_max_unauthorized: float | None = None
    eval_batch_size: int = 64
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def loss_weights(self) -> dict[str, float]:
        base = SCENARIO_WEIGHTS[self.scenario]
        return {k: float(getattr(self, f"w_{k}") if getattr(self, f"w_{k}") is not None else base[k]) for k in LOSS_TERMS}

    def check(self) -> "IPCLIPConfig":
        for name in ("epochs", "batch_size", "watermark_stride", "n_img_tokens", "proj_hidden", "bank_k", "cache_views", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}", f"set {name}=1 or more")
        if self.batch_size < 2 and self.branch:
            raise ConfigError("the style-enhancement branch (BatchNorm) needs batch_size >= 2", "set batch_size=2 or more")
        if self.warmup_epochs < 0 or self.warmup_epochs >= max(self.epochs, 1) and self.epochs > 1:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs)", "lower warmup_epochs")
        if self.select_best and (self.val_size < 1 or not 0.0 < self.val_fraction < 1.0):
            raise ConfigError(f"select_best needs val_size >= 1 and 0 < val_fraction < 1 (got {self.val_size}, "
                              f"{self.val_fraction})", "set e.g. val_size=300 val_fraction=0.2")
        return self

    def unauthorized_bound(self, n_classes: int) -> float:
        """The model-selection bound on unauthorized validation accuracy (percent)."""
        if self.select_max_unauthorized is not None:
            return float(self.select_max_unauthorized)
        return 150.0 / n_classes


# ---------------------------------------------------------------------------- visual statistics
@dataclass
class VisualStats:
    """What IP-CLIP reads from the frozen image tower: normalised features [B, D] and, per
    visual block, style and content [B, L, W]."""

    features: torch.Tensor
    style: torch.Tensor
    content: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def index(self, idx: torch.Tensor) -> "VisualStats":
        return VisualStats(self.features[idx], self.style[idx], self.content[idx])

    def to(self, device) -> "VisualStats":
        return VisualStats(self.features.to(device), self.style.to(device), self.content.to(device))

    @staticmethod
    def cat(parts: Sequence["VisualStats"]) -> "VisualStats":
        return VisualStats(torch.cat([p.features for p in parts]), torch.cat([p.style for p in parts]),
                           torch.cat([p.content for p in parts]))


def layer_statistics(layer: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(style, content) of one block's tokens [B, T, W]: mu = mean over tokens, sigma = sqrt(mean
    of (x - mu)^2 + eps); style = (mu + sigma) / 2, content = mu."""
    x = layer.float()
    mu = x.mean(dim=1)
    sigma = torch.sqrt(((x - mu[:, None]) ** 2).mean(dim=1) + eps)
    return (mu + sigma) / 2, mu


@torch.no_grad()
def visual_stats(adapter, images: torch.Tensor, eps: float = 1e-6, amp: bool = False) -> VisualStats:
    """Run the frozen image tower on images [B, 3, H, W] in [0, 1] and read every block."""
    dev = adapter.device
    with _autocast(dev, amp):
        feats, layers = adapter.encode_image_with_layers(adapter.preprocess(images.to(dev)), normalize=True)
    styles, contents = zip(*(layer_statistics(h, eps) for h in layers))
    return VisualStats(feats.float(), torch.stack(styles, 1), torch.stack(contents, 1))


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bool(enabled and device.type == "cuda"))


# ---------------------------------------------------------------------------- the trained parts
def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # what nn.Linear's default initialisation gives
    return nn.init.uniform_(t, -bound, bound)


class IPProjector(nn.Module):
    """Style [B, L, W] and content [B, L, W] -> prompt context [B, 2L + n_img, D_text].

    Domain tokens: per layer Linear(W, hidden) then Linear(hidden, D_text), no activation [ref].
    Image tokens: per layer Linear(W, D_text), then one Linear(L, 1) across layers, repeated
    ``n_img`` times [ref] (``distinct_image_tokens``: Linear(L, n_img) [ours]). The per-layer
    linears are stored stacked ([L, in, out]) so all layers run in one batched matmul.
    """

    def __init__(self, n_layers: int, width: int, text_width: int, hidden: int = 256, n_img: int = 4,
                 distinct_image_tokens: bool = False, style_tokens: bool = True, content_tokens: bool = True):
        super().__init__()
        L = n_layers
        self.n_layers, self.width, self.text_width, self.n_img = L, width, text_width, n_img
        self.distinct_image_tokens = distinct_image_tokens
        self.style_tokens, self.content_tokens = style_tokens, content_tokens
        if style_tokens:
            self.dom_w1 = nn.Parameter(_uniform_(torch.empty(L, width, hidden), width))
            self.dom_b1 = nn.Parameter(_uniform_(torch.empty(L, hidden), width))
            self.dom_w2 = nn.Parameter(_uniform_(torch.empty(L, hidden, text_width), hidden))
            self.dom_b2 = nn.Parameter(_uniform_(torch.empty(L, text_width), hidden))
        else:  # ablation: learned tokens that do not depend on the image (CoOp-like)
            self.dom_static = nn.Parameter(torch.randn(L, text_width) * 0.02)
        if content_tokens:
            self.img_w = nn.Parameter(_uniform_(torch.empty(L, width, text_width), width))
            self.img_b = nn.Parameter(_uniform_(torch.empty(L, text_width), width))
            self.layer_mix = nn.Linear(L, n_img if distinct_image_tokens else 1)
        else:
            self.img_static = nn.Parameter(torch.randn(n_img, text_width) * 0.02)

    @property
    def n_ctx(self) -> int:
        return 2 * self.n_layers + self.n_img

    def domain_tokens(self, style: torch.Tensor) -> torch.Tensor:
        if not self.style_tokens:
            return self.dom_static.unsqueeze(0).expand(style.shape[0], -1, -1)
        h = torch.einsum("blw,lwh->blh", style, self.dom_w1) + self.dom_b1
        return torch.einsum("blh,lhd->bld", h, self.dom_w2) + self.dom_b2

    def image_tokens(self, content: torch.Tensor) -> torch.Tensor:
        if not self.content_tokens:
            return self.img_static.unsqueeze(0).expand(content.shape[0], -1, -1)
        t = torch.einsum("blw,lwd->bld", content, self.img_w) + self.img_b  # [B, L, D]
        t = self.layer_mix(t.transpose(1, 2)).transpose(1, 2)  # [B, 1 or n_img, D]
        return t if self.distinct_image_tokens else t.expand(-1, self.n_img, -1)

    def forward(self, style: torch.Tensor, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dom = self.domain_tokens(style)
        return torch.cat([dom, dom, self.image_tokens(content)], dim=1), dom


class StyleBranch(nn.Module):
    """Attention of image features over class prototypes [ref]: a pre-projection MLP gives q, k, v
    (D -> 64 -> 64 -> 3D with BatchNorm + ReLU), a post-projection Linear(D, D);
    out = normalise(F + post(softmax(scale * q(F) k(P)^T) v(P)))."""

    def __init__(self, dim: int, hidden: int = 64, scale: float = 0.1):
        super().__init__()
        self.dim, self.scale = dim, scale
        self.pre = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 3 * dim))
        self.post = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        D = self.dim
        q = self.pre(features)[:, :D]
        kv = self.pre(prototypes)
        k, v = kv[:, D:2 * D], kv[:, 2 * D:]
        attn = torch.softmax(self.scale * q @ k.t(), dim=-1)
        return F.normalize(features + self.post(attn @ v), dim=-1)


def fill_bank(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None, k: int) -> torch.Tensor:
    """A feature bank [C, K, D] [ref]: per class the K most confident samples' features. With
    ``labels`` (authorized bank) only correctly predicted samples count, keyed by their label;
    without (unauthorized bank) samples are keyed by the predicted label. Unfilled slots stay 0."""
    C, D = logits.shape[1], features.shape[1]
    bank = torch.zeros(C, k, D)
    prob = logits.float().softmax(-1)
    conf, pred = prob.max(-1)
    keep = (pred == labels) if labels is not None else torch.ones_like(pred, dtype=torch.bool)
    for c in range(C):
        idx = torch.nonzero(keep & (pred == c)).flatten()
        if len(idx):
            top = idx[conf[idx].argsort(descending=True)[:k]]
            bank[c, : len(top)] = features[top].float().cpu()
    return bank


# ---------------------------------------------------------------------------- the model
def assemble_prompts(template: ClassPromptTemplate, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image contexts [B, n_ctx, D] -> prompts [B * C, T', D] (image-major) and their EOS positions."""
    B, n_ctx, D = ctx.shape
    C, S = template.suffix.shape[0], template.suffix.shape[1]
    dtype = template.prefix.dtype
    prompts = torch.cat([
        template.prefix.unsqueeze(0).expand(B, C, 1, D),
        ctx.to(dtype).unsqueeze(1).expand(B, C, n_ctx, D),
        template.suffix.unsqueeze(0).expand(B, C, S, D),
    ], dim=2)
    return prompts.reshape(B * C, 1 + n_ctx + S, D), template.eos.repeat(B)


def supports_shared_prefix(adapter) -> bool:
    """True for the Hugging Face backend, whose text blocks ``shared_prefix_text_features`` runs."""
    try:
        layer = adapter.model.text_model.encoder.layers[0]
        return getattr(adapter, "backend", "") == "hf" and all(
            hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"))
    except AttributeError:
        return False


def shared_prefix_text_features(adapter, prefix: torch.Tensor, suffix: torch.Tensor, suffix_eos: torch.Tensor
                                ) -> torch.Tensor:
    """Text features [B, C, D] (normalised) of the B x C prompts ``prefix[b] + suffix[c]`` without
    running the shared prefix C times.

    ``prefix`` [B, P, W]: per-image embeddings (SOS + context); ``suffix`` [C, S, W]: per-class
    embeddings (class tokens, EOS, ...), ``suffix_eos`` [C] the EOS index inside the suffix. In a
    causal transformer the prefix positions never see the suffix, so their hidden states are the
    same for every class: they are computed once per image, and each class suffix attends to them
    (keys/values) plus causally to itself. Exact up to floating-point reordering.
    """
    tm = adapter.model.text_model
    dtype = adapter.dtype
    B, P, W = prefix.shape
    C, S, _ = suffix.shape
    pos = tm.embeddings.position_embedding.weight
    hp = prefix.to(dtype) + pos[:P]
    hs = (suffix.to(dtype) + pos[P:P + S]).unsqueeze(0).expand(B, C, S, W)
    # suffix query i may see every prefix key and suffix keys j <= i
    allowed = torch.ones(S, P + S, dtype=torch.bool, device=prefix.device)
    allowed[:, P:] = torch.tril(torch.ones(S, S, dtype=torch.bool, device=prefix.device))
    for layer in tm.encoder.layers:
        at = layer.self_attn
        H = at.num_heads
        d = W // H
        xp, xs = layer.layer_norm1(hp), layer.layer_norm1(hs)

        def heads(x: torch.Tensor, proj: nn.Module) -> torch.Tensor:  # [..., T, W] -> [..., H, T, d]
            y = proj(x)
            return y.view(*y.shape[:-1], H, d).transpose(-3, -2)

        qp, kp, vp = heads(xp, at.q_proj), heads(xp, at.k_proj), heads(xp, at.v_proj)  # [B, H, P, d]
        qs, ks, vs = heads(xs, at.q_proj), heads(xs, at.k_proj), heads(xs, at.v_proj)  # [B, C, H, S, d]
        op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        k_all = torch.cat([kp.unsqueeze(1).expand(B, C, H, P, d), ks], dim=-2)
        v_all = torch.cat([vp.unsqueeze(1).expand(B, C, H, P, d), vs], dim=-2)
        os_ = F.scaled_dot_product_attention(qs, k_all, v_all, attn_mask=allowed)
        hp = hp + at.out_proj(op.transpose(-3, -2).reshape(B, P, W))
        hs = hs + at.out_proj(os_.transpose(-3, -2).reshape(B, C, S, W))
        hp = hp + layer.mlp(layer.layer_norm2(hp))
        hs = hs + layer.mlp(layer.layer_norm2(hs))
    idx = suffix_eos.to(hs.device).view(1, C, 1, 1).expand(B, C, 1, W)
    pooled = tm.final_layer_norm(hs.gather(2, idx).squeeze(2))
    return F.normalize(adapter.model.text_projection(pooled), dim=-1)


class IPCLIP(nn.Module):
    """A frozen CLIP adapter + the IP prompt generator (projector, branch, banks) for ``classes``."""

    def __init__(self, adapter, classes: Sequence[str], config: IPCLIPConfig | None = None):
        super().__init__()
        self.config = (config or IPCLIPConfig()).check()
        cfg = self.config
        self.adapter = adapter
        self.classes = list(classes)
        if len(self.classes) < 2:
            raise DataError(f"IP-CLIP needs at least 2 classes, got {len(self.classes)}", "use a domain with 2+ classes")
        self.projector = IPProjector(adapter.vision_layers, adapter.vision_width, adapter.text_width, cfg.proj_hidden,
                                     cfg.n_img_tokens, cfg.distinct_image_tokens, cfg.style_tokens, cfg.content_tokens)
        n_ctx = self.projector.n_ctx
        self.template = class_prompt_template(adapter, self.classes, n_ctx, truncate=True)
        self.template_full = class_prompt_template(adapter, self.classes, n_ctx, truncate=False)
        C, D = len(self.classes), adapter.embed_dim
        self.branch = StyleBranch(D, cfg.attn_hidden, cfg.attn_scale) if cfg.branch else None
        if self.branch is not None and not cfg.branch_trainable:
            self.branch.requires_grad_(False)
        self._shared_prefix_ok = supports_shared_prefix(adapter)
        self.register_buffer("bank_authorized", torch.zeros(C, cfg.bank_k, D))
        self.register_buffer("bank_unauthorized", torch.zeros(C, cfg.bank_k, D))
        self.to(adapter.device)

    # -- sizes, written next to the saved generator and checked when it is loaded again
    def backbone_sizes(self) -> dict[str, int]:
        a = self.adapter
        return {"vision_layers": a.vision_layers, "vision_width": a.vision_width, "text_width": a.text_width,
                "embed_dim": a.embed_dim, "context_length": a.context_length, "image_size": a.image_size}

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.projector.parameters())
        if self.branch is not None and self.config.branch_trainable:
            params += list(self.branch.parameters())
        return params

    def train(self, mode: bool = True):  # noqa: D102  (the frozen CLIP stays in eval mode)
        super().train(mode)
        self.adapter.eval()
        return self

    def text_features(self, stats: VisualStats, truncate: bool | None = None, share_prefix: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised text features [B, C, D] of every image's prompts, domain tokens [B, L, D_text])."""
        truncate = self.config.truncate_text if truncate is None else truncate
        share = self.config.share_prefix if share_prefix is None else share_prefix
        ctx, dom = self.projector(stats.style, stats.content)
        template = self.template if truncate else self.template_full
        if share and self._shared_prefix_ok:
            prefix = torch.cat([template.prefix[:1].expand(ctx.shape[0], 1, -1), ctx.to(template.prefix.dtype)], 1)
            text = shared_prefix_text_features(self.adapter, prefix, template.suffix, template.eos - prefix.shape[1])
            return text.float(), dom
        prompts, eos = assemble_prompts(template, ctx)
        text = self.adapter.encode_text_embeddings(prompts, eos, normalize=True)
        return text.float().view(ctx.shape[0], len(self.classes), -1), dom

    def class_logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(image feature, text feature of that image's prompt for class c)."""
        return self.adapter.logit_scale.exp().float() * torch.einsum("bd,bcd->bc", features.float(), text)

    @torch.no_grad()
    def logits_from_stats(self, stats: VisualStats) -> torch.Tensor:
        out = []
        bs = self.config.eval_batch_size
        with _autocast(self.adapter.device, self.config.amp):
            for s in range(0, len(stats), bs):
                part = stats.index(torch.arange(s, min(len(stats), s + bs)))
                text, _ = self.text_features(part)
                out.append(self.class_logits(part.features, text))
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> class logits [B, C] (the branch is not used at inference [ref])."""
        bs = self.config.eval_batch_size
        parts = [self.logits_from_stats(visual_stats(self.adapter, images[s:s + bs], self.config.stat_eps,
                                                     self.config.amp))
                 for s in range(0, images.shape[0], bs)]
        return torch.cat(parts) if parts else torch.zeros(0, len(self.classes))

    # -- the objective
    def loss(self, sa: VisualStats, ya: torch.Tensor, su: VisualStats, yu: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Signed sum of the loss terms of ../shared/specs/ip-clip.md for one authorized batch
        ``sa`` and one unauthorized batch ``su`` (paired by index)."""
        cfg = self.config
        w = cfg.loss_weights()
        cv = cfg.clip_value
        B = len(sa)
        both = VisualStats.cat([sa, su])
        text, dom = self.text_features(both)  # one text-encoder call for both halves
        text_a, text_u = text[:B], text[B:]
        dom_a, dom_u = dom[:B], dom[B:]
        z_a = self.class_logits(sa.features, text_a)
        z_u = self.class_logits(su.features, text_u)
        per_sample = cfg.clip_per_sample

        def clipped_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if not per_sample:
                return F.cross_entropy(z, y)
            return torch.clamp(F.cross_entropy(z, y, reduction="none"), max=cv).mean()

        terms: dict[str, torch.Tensor] = {
            "a": F.cross_entropy(z_a, ya),
            "u": clipped_ce(z_u, yu),
            "dom": F.mse_loss(dom_a.float(), dom_u.float()),
            # KL(softmax_c(T_u) || softmax_c(T_a)) over the class axis, batch mean
            "kl": F.kl_div(F.log_softmax(text_a, dim=1), F.softmax(text_u, dim=1), reduction="batchmean"),
            "ent": -(F.softmax(z_u, -1) * F.log_softmax(z_u, -1)).sum(-1).mean(),
        }
        if self.branch is not None and (w["self"] != 0 or w["cross"] != 0):
            protos_a = self.bank_authorized.mean(1)
            protos_u = self.bank_unauthorized.mean(1)
            s_self = self.branch(sa.features.float(), protos_a)
            s_cross = self.branch(sa.features.float(), protos_u)
            terms["self"] = clipped_ce(self.class_logits(s_self, text_a), ya)
            terms["cross"] = clipped_ce(self.class_logits(s_cross, text_u), ya)
        for k in CLIPPED_TERMS:
            if k in terms:
                terms[k] = torch.clamp(terms[k], max=cv)  # no gradient once clipped
        total = sum(w[k] * v for k, v in terms.items() if w[k] != 0)
        parts = {k: float(v.detach()) for k, v in terms.items()}
        parts["total"] = float(total.detach())
        parts["acc_a"] = float((z_a.argmax(-1) == ya).float().mean() * 100)
        parts["acc_u"] = float((z_u.argmax(-1) == yu).float().mean() * 100)
        return total, parts

    # -- persistence (safetensors + JSON, never pickle)
    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("adapter.")}
        save_file(tensors, str(folder / GENERATOR_FILE))
        meta = {"method": "ip-clip", "classes": self.classes, "config": self.config.to_dict(),
                "backbone": self.backbone_sizes(),
                "model_path": str(self.adapter.path) if getattr(self.adapter, "path", None) else None,
                "n_parameters": sum(p.numel() for p in self.projector.parameters())}
        meta.update(extra or {})
        (folder / GENERATOR_META).write_text(json.dumps(meta, indent=2) + "\n")
        return folder / GENERATOR_FILE

    @classmethod
    def load(cls, folder: str | Path, adapter) -> "IPCLIP":
        from ipshield.runs import load_tensors

        folder = Path(folder)
        meta = read_generator_meta(folder)
        want = meta.get("backbone", {})
        have = {k: getattr(adapter, k) for k in want}
        diff = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
        if diff:
            desc = ", ".join(f"{k} {a} (saved) vs {b} (this CLIP)" for k, (a, b) in diff.items())
            raise CheckpointError(f"the prompt generator in {folder} was trained on a different CLIP backbone: {desc}",
                                  f"load it with the checkpoint it was trained on ({meta.get('model_path') or 'see prompt_generator.json'})")
        model = cls(adapter, meta["classes"], IPCLIPConfig.build(meta["config"]))
        tensors = load_tensors(folder / GENERATOR_FILE)
        try:
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"the prompt generator in {folder} does not match its config ({str(exc)[:300]})",
                                  "re-run `ipshield protect ip-clip`") from None
        missing = [k for k in model.state_dict() if not k.startswith("adapter.") and k not in tensors]
        if missing:
            raise CheckpointError(f"the prompt generator in {folder} lacks {missing[:3]}", "re-run `ipshield protect ip-clip`")
        return model.eval()


GENERATOR_FILE = "prompt_generator.safetensors"
GENERATOR_META = "prompt_generator.json"


def read_generator_meta(folder: str | Path) -> dict:
    p = Path(folder) / GENERATOR_META
    if not p.is_file():
        raise CheckpointError(f"{folder} holds no {GENERATOR_META}", "give a run folder written by `ipshield protect ip-clip`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p} is not valid JSON ({exc})", "re-run `ipshield protect ip-clip`") from None


# ---------------------------------------------------------------------------- training data per scenario
ImageFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _watermark(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    from ipshield.data.transforms import grid_watermark

    return grid_watermark(x, stride=stride)


def watermark_fn(stride: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
    """The scenario's watermark as a one-argument transform (``stride`` 2 is the spec's pattern)."""
    return _watermark if stride == 2 else (lambda x: _watermark(x, stride))


def _strong(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from ipshield.data.transforms import strong_augment

    return strong_augment(x, g)


def _authorization_mix(x: torch.Tensor, g: torch.Generator, stride: int = 2) -> torch.Tensor:
    """[ref] unauthorized mix of the applicability-authorization scenario: 40% watermark +
    augment, 20% clean, 40% augment only (augment = the strong augmentation)."""
    r = torch.rand(x.shape[0], generator=g)
    aug = _strong(x, g)
    wm_aug = _strong(_watermark(x, stride), g)
    out = x.clone()
    out[r < 0.4] = wm_aug[r < 0.4]
    sel = r >= 0.6
    out[sel] = aug[sel]
    return out


@dataclass
class TrainStream:
    """Training images of one side (authorized or unauthorized): images [N, 3, H, W] in [0, 1] at
    the data's resolution, labels, and the scenario's transform (watermark, strong augment ...),
    applied after the random crop so the pattern keeps the data's pixel grid, as at test time."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    transform: ImageFn | None = None
    random_transform: bool = False

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor, g: torch.Generator, augment: bool) -> torch.Tensor:
        x = self.images[idx]
        if augment:
            x = train_augment(x, x.shape[-1], g)
        if self.transform is not None:
            x = self.transform(x, g)
        return x


def build_streams(authorized: Domain, unauthorized: Sequence[Domain], scenario: str, max_train: int | None,
                  seed: int, size: int = 224, watermark_stride: int = 2) -> tuple[TrainStream, TrainStream]:
    """The authorized and unauthorized training streams of a scenario (checks the domains).
    ``size``: the resolution file-based splits are read at (in-memory splits keep theirs);
    ``watermark_stride``: the grid watermark's stride (2 = the spec's pattern)."""
    a, u, _, _ = build_streams_with_validation(authorized, unauthorized, scenario, max_train, seed, size,
                                               watermark_stride)
    return a, u


def holdout_split(split: ImageSplit, max_train: int | None, seed: int, val_size: int = 0, val_fraction: float = 0.2
                  ) -> tuple[ImageSplit, ImageSplit | None]:
    """(training subset, validation split or None) of a domain's TRAINING split [ours].

    The training subset is what ``subsample(split, max_train, seed)`` keeps. With ``val_size`` > 0
    the validation images are ``val_size`` of the training images outside that subset when there
    are enough (the training subset is then unchanged); otherwise ``val_fraction`` of the subset is
    held out and the rest is trained on. The test split is never touched."""
    from ipshield.protect.training import subsample_indices

    keep = subsample_indices(len(split), max_train, seed)
    if val_size <= 0:
        return (split if len(keep) == len(split) else split.subset(keep)), None
    rng = np.random.default_rng(seed + 104729)
    rest = np.setdiff1d(np.arange(len(split)), keep)
    if len(rest) >= val_size:
        val = np.sort(rng.choice(rest, val_size, replace=False))
        return (split if len(keep) == len(split) else split.subset(keep)), split.subset(val)
    n_val = min(len(keep) - 1, max(1, int(round(val_fraction * len(keep)))))
    if n_val < 1:
        raise DataError(f"too few training images ({len(split)}) to hold out a validation split",
                        "turn select_best off or give more training images")
    perm = rng.permutation(keep)
    return split.subset(np.sort(perm[n_val:])), split.subset(np.sort(perm[:n_val]))


def build_streams_with_validation(authorized: Domain, unauthorized: Sequence[Domain], scenario: str,
                                  max_train: int | None, seed: int, size: int = 224, watermark_stride: int = 2,
                                  val_size: int = 0, val_fraction: float = 0.2
                                  ) -> tuple[TrainStream, TrainStream, TrainStream | None, list[TrainStream]]:
    """``build_streams`` plus, with ``val_size`` > 0, validation streams held out of the training
    images (``holdout_split``): the authorized one and one per unauthorized test condition (each
    unauthorized domain in target-specified; the watermarked / strongly augmented / mixed
    authorized validation images in the other scenarios)."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario '{scenario}'", f"choose one of: {', '.join(SCENARIOS)}")
    unauthorized = list(unauthorized)
    for d in unauthorized:
        if d.name.lower() == authorized.name.lower():
            raise DataError(f"domain '{d.name}' is given as both authorized and unauthorized",
                            "name a different unauthorized domain (or use --scenario target-free / ownership)")
    if unauthorized:
        check_same_classes([authorized, *unauthorized])
    if len(authorized.train) == 0:
        raise DataError(f"authorized domain '{authorized.name}' has no training images", "check the data source")

    def tensors(split: ImageSplit, size: int | None = None):
        tr, va = holdout_split(split, max_train, seed, val_size, val_fraction)
        out = (tr.to_tensor(size), torch.from_numpy(tr.labels))
        val = (va.to_tensor(size), torch.from_numpy(va.labels)) if va is not None else None
        return out, val

    (xa, ya), va = tensors(authorized.train, size if not authorized.train.in_memory else None)
    wm = lambda x, g: _watermark(x, watermark_stride)  # noqa: E731
    if scenario == "target-specified":
        if not unauthorized:
            raise DataError("the target-specified scenario needs at least one unauthorized domain",
                            "give --unauthorized D2 (or use --scenario target-free)")
        parts = [tensors(d.train, xa.shape[-1]) for d in unauthorized]
        xu = torch.cat([p[0][0] for p in parts])
        yu = torch.cat([p[0][1] for p in parts])
        name = "+".join(d.name for d in unauthorized)
        val_u = [TrainStream(d.name, *p[1]) for d, p in zip(unauthorized, parts) if p[1] is not None]
        return (TrainStream(authorized.name, xa, ya), TrainStream(name, xu, yu),
                TrainStream(authorized.name, *va) if va else None, val_u)
    val_a = TrainStream(authorized.name, *va) if va else None
    if scenario == "ownership":
        return (TrainStream(authorized.name, xa, ya), TrainStream(authorized.name + WATERMARK_SUFFIX, xa, ya, wm),
                val_a, [TrainStream(authorized.name + WATERMARK_SUFFIX, *va, wm)] if va else [])
    if scenario == "target-free":
        strong = authorized.name + "+strong-augment"
        return (TrainStream(authorized.name, xa, ya), TrainStream(strong, xa, ya, _strong, random_transform=True),
                val_a, [TrainStream(strong, *va, _strong, random_transform=True)] if va else [])
    # authorization: only watermarked inputs are served
    mix = lambda x, g: _authorization_mix(x, g, watermark_stride)  # noqa: E731
    return (TrainStream(authorized.name + WATERMARK_SUFFIX, xa, ya, wm),
            TrainStream(authorized.name + "+mix", xa, ya, mix, random_transform=True),
            TrainStream(authorized.name + WATERMARK_SUFFIX, *va, wm) if va else None,
            [TrainStream(authorized.name + "+mix", *va, mix, random_transform=True)] if va else [])


class StatsSource:
    """Visual statistics of a training stream's batches: computed per step (naive path) or looked
    up in a cache filled once (``cache_features``): view 0 is the plain image, views 1..V-1
    random crops (and, for random scenario transforms, fresh draws of them)."""

    def __init__(self, model: IPCLIP, stream: TrainStream, cache: bool, views: int, augment: bool,
                 g: torch.Generator, verbose: bool = False):
        self.model, self.stream, self.augment = model, stream, augment
        self.cfg = model.config
        #: [V, N, ...] statistics of every cached view, or None (naive path)
        self.cache: VisualStats | None = None
        if cache:
            n_views = views if (augment or stream.random_transform) else 1
            per_view = []
            for v in range(n_views):
                parts = []
                for s in progress(range(0, len(stream), 256), desc=f"caching {stream.name} view {v + 1}/{n_views}",
                                  enabled=verbose):
                    idx = torch.arange(s, min(len(stream), s + 256))
                    x = stream.batch(idx, g, augment=augment and v > 0)
                    parts.append(visual_stats(model.adapter, x, self.cfg.stat_eps, self.cfg.amp))
                per_view.append(VisualStats.cat(parts))
            self.cache = VisualStats(*(torch.stack([getattr(p, f) for p in per_view])
                                       for f in ("features", "style", "content")))

    def _lookup(self, view: torch.Tensor | int, idx: torch.Tensor) -> VisualStats:
        c = self.cache
        return VisualStats(c.features[view, idx], c.style[view, idx], c.content[view, idx])

    def plain(self, idx: torch.Tensor, g: torch.Generator) -> VisualStats:
        """Stats of the images without random crop (the bank pass)."""
        if self.cache is not None:
            return self._lookup(0, idx)
        return visual_stats(self.model.adapter, self.stream.batch(idx, g, augment=False), self.cfg.stat_eps, self.cfg.amp)

    def sample(self, idx: torch.Tensor, g: torch.Generator) -> VisualStats:
        if self.cache is None:
            return visual_stats(self.model.adapter, self.stream.batch(idx, g, self.augment), self.cfg.stat_eps, self.cfg.amp)
        n_views = self.cache.features.shape[0]
        view = torch.randint(n_views, (len(idx),), generator=g) if n_views > 1 else 0
        return self._lookup(view, idx)


@torch.no_grad()
def fill_banks(model: IPCLIP, src_a: StatsSource, src_u: StatsSource, g: torch.Generator) -> None:
    """One pass over each training set with the untrained prompt generator [ref]."""
    def pass_over(src: StatsSource) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = [], []
        n = len(src.stream)
        for s in range(0, n, model.config.eval_batch_size):
            st = src.plain(torch.arange(s, min(n, s + model.config.eval_batch_size)), g)
            logits.append(model.logits_from_stats(st).cpu())
            feats.append(st.features.cpu())
        return torch.cat(logits), torch.cat(feats)

    la, fa = pass_over(src_a)
    lu, fu = pass_over(src_u)
    k = model.config.bank_k
    model.bank_authorized.copy_(fill_bank(la, fa, src_a.stream.labels, k).to(model.bank_authorized.device))
    model.bank_unauthorized.copy_(fill_bank(lu, fu, None, k).to(model.bank_unauthorized.device))


class EpochSelector:
    """[ours] Model selection on a validation split held out of the training images.

    The validation images' visual statistics are computed once (the frozen tower; random scenario
    transforms are drawn once from a generator of their own, so the training draws are those of a
    run without selection). After every epoch the prompt generator is scored on them; the state
    of the best epoch (``IPCLIPConfig.select_best``) is kept in memory and restored at the end.
    With several processes every one scores the same full validation set with the same weights;
    rank 0's decision is broadcast so they cannot diverge."""

    def __init__(self, model: IPCLIP, val_a: TrainStream | None, val_u: Sequence[TrainStream], config: IPCLIPConfig):
        import time

        if val_a is None:
            raise DataError("select_best found no validation images", "turn select_best off")
        t0 = time.perf_counter()
        self.model, self.config = model, config
        self.bound = config.unauthorized_bound(len(model.classes))
        g = torch.Generator().manual_seed(config.seed + 2)

        def stats(stream: TrainStream) -> tuple[VisualStats, torch.Tensor]:
            parts = [visual_stats(model.adapter, stream.batch(torch.arange(s, min(len(stream), s + 256)), g, False),
                                  config.stat_eps, config.amp) for s in range(0, len(stream), 256)]
            return VisualStats.cat(parts), stream.labels

        self.val_a = stats(val_a)
        self.val_u = {s.name: stats(s) for s in val_u}
        self.sizes = {"authorized": len(val_a), **{s.name: len(s) for s in val_u}}
        self.best_key: tuple | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_scores: dict[str, float] = {}
        self.seconds = time.perf_counter() - t0

    def accuracy(self, data: tuple[VisualStats, torch.Tensor]) -> float:
        st, y = data
        logits = self.model.logits_from_stats(st.to(self.model.adapter.device)).cpu()
        return int((logits.argmax(-1) == y).sum()) * 100.0 / max(1, len(y))  # exact: 45 / 300 is 15.0

    def key(self, acc_a: float, worst_u: float, epoch: int) -> tuple:
        """Larger is better: qualifying epochs first by authorized accuracy, the others by their
        excess over the bound; then the lower worst unauthorized accuracy; then the later epoch."""
        excess = max(0.0, worst_u - self.bound)
        if excess == 0.0:
            return (1, acc_a, -worst_u, epoch)
        return (0, -excess, acc_a, epoch)

    def score_epoch(self, epoch: int) -> dict[str, float]:
        import time

        from ipshield.distributed import world_size

        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        acc_a = self.accuracy(self.val_a)
        acc_u = {name: self.accuracy(d) for name, d in self.val_u.items()}
        self.model.train(was_training)
        worst_u = max(acc_u.values()) if acc_u else 0.0
        key = self.key(acc_a, worst_u, epoch)
        better = self.best_key is None or key > self.best_key
        if world_size() > 1:  # every rank computed the same; rank 0 decides
            import torch.distributed as dist

            flag = torch.tensor([int(better)], device=self.model.adapter.device)
            dist.broadcast(flag, 0)
            better = bool(flag.item())
        scores = {"val_acc_a": acc_a, **{f"val_acc_u:{k}": v for k, v in acc_u.items()}}
        if better:
            self.best_key, self.best_epoch, self.best_scores = key, epoch, scores
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                               if not k.startswith("adapter.")}
        self.seconds += time.perf_counter() - t0
        return scores

    def restore_best(self) -> dict:
        """Load the best epoch's state into the model; returns what was selected (for the run's record)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)
        return {"epoch": self.best_epoch, "criterion": "max authorized val acc s.t. every unauthorized val acc <= bound",
                "bound": self.bound, "qualified": bool(self.best_key and self.best_key[0] == 1),
                "scores": self.best_scores, "val_sizes": self.sizes}


# ---------------------------------------------------------------------------- the trainer
def train_ipclip(adapter, authorized: Domain, unauthorized: Sequence[Domain] = (), config: IPCLIPConfig | None = None,
                 verbose: bool = True) -> IPCLIP:
    """Learn IP-CLIP's prompt generator for ``authorized`` against the scenario's unauthorized
    data; returns the model in eval mode with ``model.history`` (per-epoch means of every term)
    and ``model.timing`` (seconds, images/s)."""
    import time

    config = (config or IPCLIPConfig()).check()
    init_from_env()
    g = seed_everything(config.seed)
    device = resolve_device(config.device)
    adapter.to(device)
    stream_a, stream_u, val_a, val_u = build_streams_with_validation(
        authorized, unauthorized, config.scenario, config.max_train, config.seed, size=adapter.image_size,
        watermark_stride=config.watermark_stride, val_size=config.val_size if config.select_best else 0,
        val_fraction=config.val_fraction)
    model = IPCLIP(adapter, authorized.classes, config)
    t0 = time.perf_counter()
    src_a = StatsSource(model, stream_a, config.cache_features, config.cache_views, config.augment, g, verbose)
    src_u = StatsSource(model, stream_u, config.cache_features, config.cache_views, config.augment, g, verbose)
    selector = EpochSelector(model, val_a, val_u, config) if config.select_best else None
    t_cache = time.perf_counter() - t0
    if model.branch is not None:
        fill_banks(model, src_a, src_u, g)
    t_bank = time.perf_counter() - t0 - t_cache

    bs = min(config.batch_size, len(stream_a))
    steps_per_epoch = max(1, len(stream_a) // bs)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # stepped once per optimisation step, warm-up and horizon counted in steps (the reference
    # stepped a per-epoch schedule every iteration)
    sched = cosine_with_warmup(opt, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
    model.train()
    history: list[dict[str, float]] = []
    n_seen = 0
    t_train = time.perf_counter()
    bar = progress(range(config.epochs), desc=f"ip-clip {config.scenario}", enabled=verbose)
    for epoch in bar:
        sums: dict[str, float] = {}
        n_steps = 0
        for idx_a in epoch_batches(len(stream_a), bs, g):
            idx_u = torch.randint(len(stream_u), (len(idx_a),), generator=g)
            sa = src_a.sample(idx_a, g)
            su = src_u.sample(idx_u, g)
            # several processes (torchrun): every one draws the same batch, keeps its slice, and the
            # gradients are averaged below; with one process ``part`` is the whole batch
            part = shard(torch.arange(len(idx_a)))
            if len(part) < len(idx_a):
                sa, su, idx_a, idx_u = sa.index(part), su.index(part), idx_a[part], idx_u[part]
            sa, su = sa.to(device), su.to(device)
            ya = stream_a.labels[idx_a].to(device)
            yu = stream_u.labels[idx_u].to(device)
            with _autocast(device, config.amp):
                loss, parts = model.loss(sa, ya, su, yu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model.trainable_parameters(), len(part) / bs)
            opt.step()
            sched.step()
            n_seen += len(idx_a)
            n_steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        row = {k: v / max(1, n_steps) for k, v in sums.items()}
        row["epoch"] = epoch + 1
        row["lr"] = opt.param_groups[0]["lr"]
        if selector is not None:
            row.update(selector.score_epoch(epoch + 1))
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row.get('total', 0):.3f}", acc_a=f"{row.get('acc_a', 0):.0f}",
                            acc_u=f"{row.get('acc_u', 0):.0f}")
    t_train = time.perf_counter() - t_train
    model.eval()
    model.selection = selector.restore_best() if selector is not None else None
    model.history = history
    total = time.perf_counter() - t0
    model.timing = {"cache_s": t_cache, "bank_s": t_bank, "train_s": t_train, "total_s": total,
                    "select_s": selector.seconds if selector is not None else 0.0,
                    "steps": steps_per_epoch * config.epochs,
                    "images_per_s": n_seen / total if total > 0 else float("nan")}
    return model


METHODS.register("ip-clip")(train_ipclip)


# ---------------------------------------------------------------------------- evaluation
def evaluation_sets(domains: dict[str, Domain], authorized: str, scenario: str, watermark_stride: int = 2
                    ) -> tuple[str, dict[str, tuple[ImageSplit, Callable | None]]]:
    """The test sets of a scenario: every domain clean, plus the authorized domain watermarked in
    the ownership and authorization scenarios. Returns (name of the authorized set, sets)."""
    sets: dict[str, tuple[ImageSplit, Callable | None]] = {name: (d.test, None) for name, d in domains.items()}
    if scenario in ("ownership", "authorization"):
        sets[authorized + WATERMARK_SUFFIX] = (domains[authorized].test, watermark_fn(watermark_stride))
    auth_name = authorized + WATERMARK_SUFFIX if scenario == "authorization" else authorized
    return auth_name, sets


def accuracy_on_sets(model, sets: dict[str, tuple[ImageSplit, Callable | None]], adapter) -> dict[str, float]:
    """Accuracy (percent) of ``model`` on each set; file-based splits are read at the CLIP's size."""
    from ipshield.protect.base import accuracy

    return {name: accuracy(model, split, transform=tf, size=None if split.in_memory else adapter.image_size,
                           batch_size=256, device=adapter.device)
            for name, (split, tf) in sets.items()}


