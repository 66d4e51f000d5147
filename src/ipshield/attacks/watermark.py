"""Attacks on embedding watermarks: steal the service (model extraction), then try to hide the theft.

Registered in ``ATTACKS`` (the thief's side; all choices [ours], the papers' setups are unknown),
each with its config class (its budget field in brackets) and ``run(target, config, public=...)``:

- ``wm-extract`` [``n_queries``]: a student CLIP (the same small ViT architecture with a fresh
  random initialisation, the public tokenizer) trained to reproduce the service's embeddings of a
  public image-text set (``ExtractConfig.loss``: cosine or MSE, both towers), with ``n_queries``
  pairs queried once and cached (a budget sweep = several students).
  ``extract_student(service, public, arch_dir, cfg)``; its run also needs ``arch_dir=``.
- ``wm-rotate`` / ``wm-permute`` / ``wm-signed-permute`` [``strength``: the fraction of the
  embedding dimensions mixed, 1 = all]: the thief applies one secret random orthogonal matrix (or
  coordinate permutation, or permutation with random sign flips) to every embedding it serves, both
  modalities (cross-modal cosines are unchanged).
- ``wm-noise`` [``strength``]: Gaussian noise of total norm about ``strength`` added to each unit
  embedding, renormalised.
- ``wm-dim-removal`` [``strength``]: project out the top-``strength`` principal directions of the
  thief's own embeddings of public data (pooled images and texts, centred), renormalise (CSE-like).
- ``wm-finetune`` [``strength``]: contrastive (CLIP loss) fine-tuning of the student on public
  image-caption pairs for ``strength`` steps.
- ``wm-prune`` [``strength``]: global magnitude pruning of a fraction ``strength`` of the
  student's linear weights.

Every target is an "embedder" (``AttackSpec.target``): an embedding service, a ``CleanEncoder``, or
a CLIP adapter (a student). Embedding-level attacks wrap it (``embed_images``/``embed_texts``);
weight-level attacks (prune, finetune) need the weights (a CLIP adapter or a ``CleanEncoder`` of
one) and return the same kind they were given. Each run returns ``{"attack", <budget>, ...,
"model": the attacked target}``. ``apply_attack(name, target, strength, ...)`` dispatches by name
through the spec. The functions ``rotate``, ``permute``, ``noise``, ``dim_removal``, ``prune``,
``finetune`` and ``extract_student`` are the implementations (and the older call style).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field

from ipshield.attacks.domain import AttackConfig, as_config, check_target
from ipshield.errors import ConfigError, IPShieldError
from ipshield.registry import ATTACKS
from ipshield.watermark.base import CleanEncoder, ReferenceSample, embed_in_batches


# ------------------------------------------------------------------------------ extraction
class ExtractConfig(AttackConfig):
    """Model extraction (a student trained on the service's outputs)."""

    budget_field: ClassVar[str] = "n_queries"

    n_queries: int = Field(6000, ge=16, description="public image-text pairs sent to the service (2 queries each)")
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    loss: Literal["cosine", "mse"] = "cosine"
    relation_weight: float = Field(1.0, ge=0, description="weight of the in-batch similarity distillation (KL of "
                                   "image-to-text softmaxes, student vs service)")
    relation_temperature: float = Field(0.05, gt=0)
    seed: int = 0
    max_minutes: float | None = Field(None, description="stop early after this wall time")


def _fresh_student(arch_dir: str | Path, seed: int):
    """A randomly initialised CLIP of the architecture in ``arch_dir`` (config.json and tokenizer
    are public knowledge for the thief; the weights are not read)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from ipshield.models.clip import CLIPAdapter, quiet_transformers

    p = Path(arch_dir)
    with quiet_transformers():
        cfg = CLIPConfig.from_pretrained(str(p))
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    mean = std = None
    pre = p / "preprocessor_config.json"
    if pre.is_file():
        import json

        d = json.loads(pre.read_text())
        mean, std = d.get("image_mean"), d.get("image_std")
    return CLIPAdapter(model, tok, image_mean=mean, image_std=std, path=None, frozen=False)


def save_student(adapter, arch_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the student as an ordinary HF CLIP folder (loadable with ``load_clip``)."""
    import shutil

    from ipshield.models.clip import quiet_transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        adapter.model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json"):
        src = Path(arch_dir) / name
        if src.is_file():
            shutil.copy(src, out / name)
    return out


def query_service(service, public: ReferenceSample, n_queries: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """The thief's one pass over the service: ``n_queries`` public images and as many captions."""
    n = min(n_queries, len(public.images), len(public.texts))
    imgs, texts = public.images[:n], public.texts[:n]
    ti = embed_in_batches(service.embed_images, imgs)
    tt = embed_in_batches(lambda t: service.embed_texts(list(t)), texts)
    return imgs, texts, ti, tt


def extract_student(service, public: ReferenceSample, arch_dir: str | Path, config: ExtractConfig | None = None,
                    out_dir: str | Path | None = None, verbose: bool = False, targets=None):
    """Train a student on the service's embeddings of ``public`` (see the module docstring).
    Returns ``(student adapter (frozen), info dict)``; with ``out_dir`` also saves it there.
    ``targets``: already queried ``(images, texts, image_emb, text_emb)`` (a budget sweep queries once)."""
    from ipshield.utils import progress, seed_everything

    cfg = as_config(ExtractConfig, config)
    t0 = time.time()
    if targets is None:
        if public is None:
            raise IPShieldError("model extraction needs public image-caption pairs to query the service with",
                                "pass public=ReferenceSample (e.g. reference_from_synthetic)")
        service = as_embedder(check_target("wm-extract", "embedder", service))
        imgs, texts, ti, tt = query_service(service, public, cfg.n_queries)
    else:
        imgs, texts, ti, tt = targets
        n = min(cfg.n_queries, len(imgs))
        imgs, texts, ti, tt = imgs[:n], texts[:n], ti[:n], tt[:n]
    n = len(imgs)
    student = _fresh_student(arch_dir, cfg.seed)
    if student.embed_dim != ti.shape[1]:
        raise IPShieldError(f"the student architecture gives {student.embed_dim}-d embeddings, the service {ti.shape[1]}",
                            "pick an architecture with the service's embedding size")
    g = seed_everything(cfg.seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-n // cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warm) / max(1, total - warm)))))
    student.train()
    losses = []
    step = 0
    stopped_early = False
    for epoch in progress(range(cfg.epochs), desc="extract", enabled=verbose):
        perm = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            si = student.encode_image(student.preprocess(imgs[idx]), normalize=cfg.loss == "cosine")
            st = student.encode_text([texts[i] for i in idx.tolist()], normalize=cfg.loss == "cosine")
            if cfg.loss == "cosine":
                loss = (2 - (si * ti[idx]).sum(-1).mean() - (st * tt[idx]).sum(-1).mean()) / 2
            else:
                loss = (F.mse_loss(si, ti[idx]) + F.mse_loss(st, tt[idx])) / 2 * ti.shape[1]
            if cfg.relation_weight > 0:
                # the service's in-batch image-text similarity structure, which plain regression of
                # tightly clustered embeddings learns slowly
                tau = cfg.relation_temperature
                ls = F.normalize(si, dim=-1) @ F.normalize(st, dim=-1).T / tau
                lt = ti[idx] @ tt[idx].T / tau
                kl = (F.kl_div(ls.log_softmax(1), lt.log_softmax(1), log_target=True, reduction="batchmean")
                      + F.kl_div(ls.T.log_softmax(1), lt.T.log_softmax(1), log_target=True, reduction="batchmean")) / 2
                loss = loss + cfg.relation_weight * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if cfg.max_minutes and (time.time() - t0) > 60 * cfg.max_minutes:
                stopped_early = True
                break
        if stopped_early:
            break
    student.freeze()
    info = {"n_pairs": n, "queries": 2 * n, "steps": step, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "seconds": round(time.time() - t0, 1), "stopped_early": stopped_early}
    if out_dir is not None:
        save_student(student, arch_dir, out_dir)
    return student, info


@ATTACKS.register("wm-extract", config=ExtractConfig, target="embedder", budget="n_queries",
                  description="model extraction: a student CLIP trained on the service's embeddings of public pairs")
def run_extract(target, config: ExtractConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample,
                arch_dir: str | Path, out_dir: str | Path | None = None, targets=None, verbose: bool = False) -> dict:
    """``run(service, config, public=, arch_dir=)`` of ``wm-extract``: the student under ``"model"``
    (a frozen CLIP adapter; with ``out_dir`` also saved there) and the extraction info."""
    cfg = as_config(ExtractConfig, config)
    student, info = extract_student(target, public, arch_dir, cfg, out_dir=out_dir, verbose=verbose, targets=targets)
    return {"attack": "wm-extract", "n_queries": cfg.n_queries, **info, "model": student}


# ------------------------------------------------------------------------------ embedding-level attacks
class TransformedEmbedder:
    """``normalise(f(x) @ M)`` for both modalities (the thief's post-processing)."""

    def __init__(self, base, matrix: torch.Tensor, name: str = "transformed", center: torch.Tensor | None = None):
        self.base = base
        self.matrix = matrix.float()
        self.center = center
        self.name = name

    def _t(self, e: torch.Tensor) -> torch.Tensor:
        e = e.float()
        return F.normalize(e @ self.matrix, dim=-1)

    def embed_images(self, images):
        return self._t(torch.as_tensor(self.base.embed_images(images)))

    def embed_texts(self, texts):
        return self._t(torch.as_tensor(self.base.embed_texts(list(texts))))

    def __repr__(self) -> str:
        return f"TransformedEmbedder({self.name})"


class NoisyEmbedder:
    """Unit embeddings plus Gaussian noise of expected norm ``strength``, renormalised. Noise is drawn
    per call from a generator seeded once (a fresh draw for every query, as a noisy API would)."""

    def __init__(self, base, strength: float, seed: int = 0):
        self.base = base
        self.strength = float(strength)
        self.g = torch.Generator().manual_seed(seed)

    def _t(self, e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(torch.as_tensor(e).float(), dim=-1)
        noise = torch.randn(e.shape, generator=self.g) * (self.strength / e.shape[1] ** 0.5)
        return F.normalize(e + noise, dim=-1)

    def embed_images(self, images):
        return self._t(self.base.embed_images(images))

    def embed_texts(self, texts):
        return self._t(self.base.embed_texts(list(texts)))


def _n_mixed(dim: int, strength: float) -> int:
    """How many of ``dim`` dimensions a rotation or permutation of ``strength`` (a fraction) mixes."""
    s = float(strength)
    if not 0 < s <= 1:
        raise ConfigError(f"strength must be a fraction of the dimensions in (0, 1] (got {s})", "e.g. strength=1 (all)")
    return max(1, min(dim, round(s * dim)))


def random_rotation(dim: int, seed: int = 12345, strength: float = 1.0) -> torch.Tensor:
    """A random orthogonal matrix; with ``strength`` < 1, one that rotates a random subspace of
    ``round(strength * dim)`` dimensions and leaves its complement as it is."""
    g = torch.Generator().manual_seed(seed)
    m = _n_mixed(dim, strength)
    if m >= dim:
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()
    u, _ = torch.linalg.qr(torch.randn(dim, m, generator=g, dtype=torch.float64))  # basis of the subspace
    rot = random_rotation(m, seed + 1).double()
    return (torch.eye(dim, dtype=torch.float64) - u @ u.T + u @ rot @ u.T).float()


def random_permutation(dim: int, seed: int = 12345, signs: bool = False, strength: float = 1.0) -> torch.Tensor:
    """A random permutation matrix; with ``signs``, each coordinate's sign is also flipped with
    probability 1/2 (a signed permutation). With ``strength`` < 1 only ``round(strength * dim)``
    random coordinates are permuted (and sign-flipped) among themselves."""
    g = torch.Generator().manual_seed(seed)
    n = _n_mixed(dim, strength)
    if n >= dim:
        m = torch.eye(dim)[torch.randperm(dim, generator=g)]
        if signs:
            m = m * torch.where(torch.rand(dim, generator=g) < 0.5, -1.0, 1.0).unsqueeze(0)
        return m
    idx = torch.randperm(dim, generator=g)[:n]
    order = torch.arange(dim)
    order[idx] = idx[torch.randperm(n, generator=g)]
    m = torch.eye(dim)[order]
    if signs:
        flip = torch.ones(dim)
        flip[idx] = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        m = m * flip.unsqueeze(0)
    return m


def rotate(target, strength: float = 1.0, seed: int = 12345, dim: int | None = None, **_):
    """The thief's own random rotation of the embedding space (of a fraction ``strength`` of its
    dimensions; 1: a full random rotation)."""
    d = dim or _dim_of(target)
    return TransformedEmbedder(target, random_rotation(d, seed, strength), "wm-rotate")


def permute(target, strength: float = 1.0, seed: int = 12345, dim: int | None = None, signs: bool = False, **_):
    """The thief's own random permutation of the coordinates (``signs``: and random sign flips; of a
    fraction ``strength`` of the coordinates, 1: all)."""
    d = dim or _dim_of(target)
    return TransformedEmbedder(target, random_permutation(d, seed, signs, strength),
                               "wm-signed-permute" if signs else "wm-permute")


def noise(target, strength: float, seed: int = 0, **_):
    return NoisyEmbedder(target, strength, seed)


def dim_removal(target, strength: int, public: ReferenceSample | None = None, **_):
    """Project out the top-``strength`` principal directions of the thief's embeddings of ``public``."""
    k = int(strength)
    if public is None:
        raise IPShieldError("dim-removal needs public data to find the principal directions", "pass public=ReferenceSample")
    e = torch.cat([torch.as_tensor(target.embed_images(public.images)).float(),
                   torch.as_tensor(target.embed_texts(list(public.texts))).float()])
    e = F.normalize(e, dim=-1)
    d = e.shape[1]
    if k <= 0:
        return TransformedEmbedder(target, torch.eye(d), "wm-dim-removal-0")
    _, _, vt = torch.linalg.svd(e - e.mean(0), full_matrices=False)
    top = vt[:k]
    proj = torch.eye(d) - top.T @ top
    return TransformedEmbedder(target, proj, f"wm-dim-removal-{k}")


def _dim_of(target) -> int:
    for attr in ("embed_dim", "dim"):
        v = getattr(target, attr, None)
        if isinstance(v, int):
            return v
    base = getattr(target, "base", None)
    if base is not None:
        return _dim_of(base)
    raise IPShieldError("cannot tell the embedding size of the attack target", "pass dim=")


# ------------------------------------------------------------------------------ weight-level attacks
def prune(student, strength: float, **_):
    """Global magnitude pruning: zero the fraction ``strength`` of smallest-magnitude weights of every
    linear layer of both towers (a copy; the input is untouched)."""
    amount = float(strength)
    if not 0 <= amount < 1:
        raise IPShieldError(f"pruning amount must be in [0, 1), got {amount}", "e.g. 0.3")
    s = copy.deepcopy(student)
    weights = [m.weight for m in s.model.modules() if isinstance(m, torch.nn.Linear)]
    if amount > 0 and weights:
        allw = torch.cat([w.detach().abs().flatten() for w in weights])
        k = int(amount * allw.numel())
        thr = allw.kthvalue(max(1, k)).values
        with torch.no_grad():
            for w in weights:
                w.mul_((w.abs() > thr).to(w.dtype))
    return s


def finetune(student, strength: int, public: ReferenceSample | None = None, lr: float = 1e-4, batch_size: int = 64,
             seed: int = 0, **_):
    """Contrastive fine-tuning of a copy of the student on public image-caption pairs for
    ``strength`` steps (the thief adapting the stolen model to its own data)."""
    if public is None:
        raise IPShieldError("finetune needs public image-caption pairs", "pass public=ReferenceSample")
    steps = int(strength)
    s = copy.deepcopy(student)
    s.unfreeze()
    s.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=lr)
    n = min(len(public.images), len(public.texts))
    scale = float(s.logit_scale.detach().exp().clamp(max=100))
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        ie = s.encode_image(s.preprocess(public.images[idx]))
        te = s.encode_text([public.texts[i] for i in idx.tolist()])
        logits = scale * ie @ te.T
        lab = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    s.freeze()
    return s


def as_embedder(obj):
    """Adapters become clean encoders; embedders pass through."""
    if hasattr(obj, "embed_images") and hasattr(obj, "embed_texts"):
        return obj
    return CleanEncoder(obj)


# ------------------------------------------------------------------------------ the registered entries
class RotateConfig(AttackConfig):
    """``wm-rotate``: one secret random rotation of every embedding."""

    budget_field: ClassVar[str] = "strength"

    strength: float = Field(1.0, le=1, description="fraction of the embedding dimensions the rotation mixes (1: all)")
    seed: int = 12345
    dim: int | None = Field(None, ge=1, description="embedding size (default: read from the target)")


class PermuteConfig(AttackConfig):
    """``wm-permute`` / ``wm-signed-permute``: one secret permutation of the coordinates (with sign
    flips for the signed one)."""

    budget_field: ClassVar[str] = "strength"

    strength: float = Field(1.0, le=1, description="fraction of the coordinates permuted (1: all)")
    seed: int = 12345
    dim: int | None = Field(None, ge=1, description="embedding size (default: read from the target)")


class NoiseConfig(AttackConfig):
    """``wm-noise``: fresh Gaussian noise on every answer."""

    budget_field: ClassVar[str] = "strength"

    strength: float = Field(1.0, description="expected norm of the noise added to each unit embedding")
    seed: int = 0


class DimRemovalConfig(AttackConfig):
    """``wm-dim-removal``: the top principal directions of the thief's own embeddings projected out."""

    budget_field: ClassVar[str] = "strength"

    strength: int = Field(8, description="principal directions removed")


class PruneConfig(AttackConfig):
    """``wm-prune``: global magnitude pruning of the student's linear weights."""

    budget_field: ClassVar[str] = "strength"

    strength: float = Field(0.3, lt=1, description="fraction of the linear weights set to zero")


class WMFinetuneConfig(AttackConfig):
    """``wm-finetune``: contrastive fine-tuning of the student on public image-caption pairs."""

    budget_field: ClassVar[str] = "strength"

    strength: int = Field(100, description="fine-tuning steps")
    lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0


def _embedder_target(name: str, target):
    return as_embedder(check_target(name, "embedder", target))


def _weights_target(name: str, target):
    """The CLIP adapter behind ``target`` (an adapter, or a ``CleanEncoder`` of one)."""
    check_target(name, "embedder", target)
    if hasattr(target, "encode_image") and hasattr(target, "model"):
        return target, False
    inner = getattr(target, "adapter", None)
    if inner is not None and hasattr(inner, "encode_image") and hasattr(inner, "model"):
        return inner, True
    raise IPShieldError(f"attack '{name}' changes the model's weights; {type(target).__name__} is a black-box embedder",
                        "give the student's CLIP adapter (load_clip) or a CleanEncoder of it")


def _need_public(name: str, public) -> ReferenceSample:
    if public is None:
        raise IPShieldError(f"attack '{name}' needs public image-caption pairs", "pass public=ReferenceSample "
                            "(e.g. ipshield.watermark.base.reference_from_synthetic)")
    return public


@ATTACKS.register("wm-rotate", config=RotateConfig, target="embedder", budget="strength",
                  description="a secret random rotation of every embedding (both modalities)")
def run_rotate(target, config: RotateConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample | None = None) -> dict:
    cfg = as_config(RotateConfig, config)
    emb = _embedder_target("wm-rotate", target)
    return {"attack": "wm-rotate", "strength": cfg.strength, "model": rotate(emb, cfg.strength, cfg.seed, cfg.dim)}


@ATTACKS.register("wm-permute", config=PermuteConfig, target="embedder", budget="strength",
                  description="a secret permutation of the embedding coordinates")
def run_permute(target, config: PermuteConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample | None = None) -> dict:
    cfg = as_config(PermuteConfig, config)
    emb = _embedder_target("wm-permute", target)
    return {"attack": "wm-permute", "strength": cfg.strength, "model": permute(emb, cfg.strength, cfg.seed, cfg.dim)}


@ATTACKS.register("wm-signed-permute", config=PermuteConfig, target="embedder", budget="strength",
                  description="a secret permutation of the embedding coordinates with random sign flips")
def run_signed_permute(target, config: PermuteConfig | Mapping[str, Any] | None = None, *,
                       public: ReferenceSample | None = None) -> dict:
    cfg = as_config(PermuteConfig, config)
    emb = _embedder_target("wm-signed-permute", target)
    return {"attack": "wm-signed-permute", "strength": cfg.strength,
            "model": permute(emb, cfg.strength, cfg.seed, cfg.dim, signs=True)}


@ATTACKS.register("wm-noise", config=NoiseConfig, target="embedder", budget="strength",
                  description="fresh Gaussian noise of norm about strength on every answer")
def run_noise(target, config: NoiseConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample | None = None) -> dict:
    cfg = as_config(NoiseConfig, config)
    emb = _embedder_target("wm-noise", target)
    return {"attack": "wm-noise", "strength": cfg.strength, "model": noise(emb, cfg.strength, cfg.seed)}


@ATTACKS.register("wm-dim-removal", config=DimRemovalConfig, target="embedder", budget="strength",
                  description="the top principal directions of the thief's public embeddings projected out")
def run_dim_removal(target, config: DimRemovalConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample) -> dict:
    cfg = as_config(DimRemovalConfig, config)
    emb = _embedder_target("wm-dim-removal", target)
    d = _dim_of(emb) if _has_dim(emb) else None
    if d is not None and cfg.strength >= d:
        raise ConfigError(f"strength={cfg.strength} directions to remove, but the embeddings have only {d}",
                          f"use a strength below {d}")
    return {"attack": "wm-dim-removal", "strength": cfg.strength,
            "model": dim_removal(emb, cfg.strength, public=_need_public("wm-dim-removal", public))}


@ATTACKS.register("wm-prune", config=PruneConfig, target="embedder", budget="strength",
                  description="global magnitude pruning of a fraction strength of the student's linear weights")
def run_prune(target, config: PruneConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample | None = None) -> dict:
    cfg = as_config(PruneConfig, config)
    adapter, wrapped = _weights_target("wm-prune", target)
    pruned = prune(adapter, cfg.strength)
    return {"attack": "wm-prune", "strength": cfg.strength, "model": CleanEncoder(pruned) if wrapped else pruned}


@ATTACKS.register("wm-finetune", config=WMFinetuneConfig, target="embedder", budget="strength",
                  description="contrastive fine-tuning of the student on public pairs for strength steps")
def run_wm_finetune(target, config: WMFinetuneConfig | Mapping[str, Any] | None = None, *, public: ReferenceSample) -> dict:
    cfg = as_config(WMFinetuneConfig, config)
    adapter, wrapped = _weights_target("wm-finetune", target)
    tuned = finetune(adapter, cfg.strength, public=_need_public("wm-finetune", public), lr=cfg.lr,
                     batch_size=cfg.batch_size, seed=cfg.seed)
    return {"attack": "wm-finetune", "strength": cfg.strength, "model": CleanEncoder(tuned) if wrapped else tuned}


def _has_dim(target) -> bool:
    try:
        _dim_of(target)
    except IPShieldError:
        return False
    return True


def apply_attack(name: str, target, strength, **kw):
    """Run the registered attack ``name`` on ``target`` with its budget set to ``strength`` and
    return the attacked target. ``kw``: fields of its config (``seed=``, ``dim=``) and its inputs
    (``public=``), told apart by the config class."""
    spec = ATTACKS.get(name)
    fields = set(spec.config.model_fields)
    cfg = spec.make_config({spec.budget: strength, **{k: v for k, v in kw.items() if k in fields}})
    return spec.run(target, cfg, **{k: v for k, v in kw.items() if k not in fields})["model"]


__all__ = ["ExtractConfig", "extract_student", "save_student", "query_service", "rotate", "permute", "noise",
           "dim_removal", "prune", "finetune", "apply_attack", "as_embedder", "TransformedEmbedder", "NoisyEmbedder",
           "random_rotation", "random_permutation", "RotateConfig", "PermuteConfig", "NoiseConfig", "DimRemovalConfig",
           "PruneConfig", "WMFinetuneConfig"]
