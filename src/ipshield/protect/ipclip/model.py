"""IP-CLIP's model: the visual statistics read from the frozen image tower, the trained parts
(IP projector, style-enhancement branch, feature banks), the per-image prompts and the ``IPCLIP``
module with its persistence (safetensors + JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.errors import CheckpointError, DataError
from ipshield.protect.ipclip.config import CLIPPED_TERMS, IPCLIPConfig
from ipshield.protect.prompting import ClassPromptTemplate, class_prompt_template


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
                logits = self.class_logits(part.features, text)
                head = getattr(self, "head", None)
                if self.config.gate and head is not None:  # [ours] rejected images: no information
                    accepted = (head.margin(part.to("cpu")) >= 0).to(logits.device)
                    logits = torch.where(accepted[:, None], logits, torch.zeros_like(logits))
                out.append(logits)
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
