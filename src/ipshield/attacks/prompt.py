"""Attacks on CLIP prompt protections (IP-CLIP, NTL-prompt): how much unauthorized accuracy can an
attacker who holds the protected prompt model (and so the frozen CLIP under it) win back with
``k`` labelled unauthorized images?

- ``prompt-finetune``: re-learn the protected prompt. Cross-entropy on the k labelled images,
  training the protected model's own prompt parameters: IP-CLIP's prompt generator (the IP
  projector that turns each image's style / content statistics into its prompt tokens; the
  style-enhancement branch is a training-time device, unused at inference, so it is not
  trained), the learned context of a CoOp-like model (NTL-prompt, CoOp). The NTLBench
  ``finetune-direct-all`` of a prompt model: everything the protection learned, nothing else.
- ``prompt-coop``: learn a fresh CoOp context on top of the frozen protected model.
  [ours] "On top" means *prepended*: ``n_ctx`` new context vectors, shared by all classes and
  images, are inserted after SOS, in front of the protected model's own prompt tokens, which stay
  exactly as the protection computes them:

      IP-CLIP:            [SOS] [new ctx] [IP-CLIP's per-image domain + image tokens] <class>. [EOS]
      CoOp / NTL-prompt:  [SOS] [new ctx] [the protected context] <class>. [EOS]

  Why: it is the cheapest attack that *uses* the protected prompt without changing a protected
  weight (a thief who cannot or will not re-train the generator can still append text in front
  of it); replacing the protected tokens instead would throw the protected model away and be
  exactly the from-scratch CoOp reference below. The text transformer is causal, so the new
  tokens change every later position's output: they can re-steer the protected prompt.

The references (:mod:`ipshield.attacks.robust` has the grid, rows and margins shared with the
classifier attacks):

- *zero-shot*: the frozen backbone with the class-name prompt (``ZeroShotClassifier``): what a
  thief who holds the backbone gets with no labels at all;
- *scratch*: CoOp trained from scratch (random context, ``n_ctx`` tokens) on the same k labelled
  images with the same step budget (steps, batch size, lr): the "from scratch" of a prompt. The
  protection margin is attacked protected - scratch; at or below 0 the protected prompt leaves
  the attacker no better off than learning a prompt from nothing;
- *unprotected*: CoOp trained on the authorized domain (the unprotected prompt-learned model),
  attacked the same way (:func:`ipshield.attacks.robust.prompt_robust`).

Both attacks run on the device of the target's CLIP, whose frozen backbone is shared, never
copied nor changed; the image tower runs once per image (the features and, for IP-CLIP, the
visual statistics are computed once, no augmentation [ours]). The result holds the attacked copy
under ``"model"``: the target is not modified.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ipshield.data.domain import Domain
from ipshield.errors import DataError, IPShieldError
from ipshield.attacks.domain import AttackConfig, _check_domain, as_config, check_k, check_target
from ipshield.registry import ATTACKS
from ipshield.utils import progress, seed_everything

#: the prompt attacks, in table order
PROMPT_ATTACKS = ("prompt-finetune", "prompt-coop")


class PromptAttackConfig(AttackConfig):
    """The step budget of a prompt attack, shared by its from-scratch CoOp reference."""

    budget_field: ClassVar[str] = "k"

    #: labelled unauthorized training images the attacker holds (class-balanced)
    k: int = Field(16, description="labelled unauthorized images the attacker holds")
    #: optimisation steps (Adam, constant lr; the same for every k and for the scratch reference)
    steps: int = 100
    batch_size: int = 32
    lr: float = 0.002
    #: context tokens of the from-scratch CoOp reference (and of prompt-coop's new context)
    n_ctx: int = 4
    #: unauthorized test images evaluated (class-balanced; None: the whole test split)
    n_test: int | None = None
    #: also compute the references (zero-shot backbone, CoOp from scratch on the same k images with
    #: the same steps) and the margin into the result
    references: bool = True
    seed: int = 0


class PromptCoOpAttackConfig(PromptAttackConfig):
    """``prompt-coop``: a fresh context learned in front of the protected prompt."""

    #: initial phrase of the new context (its token count must be n_ctx), else N(0, 0.02) (CoOp)
    ctx_init: str | None = None


# ============================================================================ the prompt models
def _prompt_kind(name: str, model: Any) -> str:
    """"ip-clip" or "coop" (a CoOp-like context: NTL-prompt, CoOp); else a clear error."""
    from ipshield.protect.coop import CoOpModel
    from ipshield.protect.ipclip import IPCLIP, SwitchableIPCLIP

    if isinstance(model, SwitchableIPCLIP):
        # [ours] its per-image prompts classify every trained domain by design; what restricts it is
        # the authorization head's gate, which a thief holding the weights simply drops (no labels
        # needed), so re-learning the prompt measures nothing about it
        raise IPShieldError(f"attack '{name}' does not apply to a switchable IP-CLIP (authorization on demand): its "
                            "prompts classify every trained domain and only the deployment gate restricts it, which a "
                            "thief holding the weights removes without any labels",
                            "protect against weight theft with a target-specified, target-free or authorization IP-CLIP "
                            "(attack that run), or an NTL-prompt / CoOp prompt; keep a switchable model server-side")
    if isinstance(model, IPCLIP):
        return "ip-clip"
    if isinstance(model, CoOpModel):
        return "coop"
    raise IPShieldError(f"attack '{name}' needs a learned prompt, and a {type(model).__name__} has none",
                        "give an IP-CLIP or NTL-prompt (or CoOp) model: ipshield.protect.ipclip_run.load_run(run, "
                        "adapter), or the model train_ipclip / train_ntl_prompt returns")


def _check_classes(name: str, model: Any, domain: Domain) -> None:
    if list(domain.classes) != list(model.classes):
        raise DataError(f"attack '{name}': domain '{domain.name}' has classes {domain.classes[:5]}... but the prompt "
                        f"model was trained on {model.classes[:5]}...",
                        "attack with a domain of the model's classes, in the same order")


def copy_prompt_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its frozen CLIP (``model.adapter``): the learned prompt
    parts are the copy's own, the backbone (never trained) is not duplicated."""
    return copy.deepcopy(model, {id(model.adapter): model.adapter})


def _labelled(domain: Domain, k: int, seed: int, adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` class-balanced labelled training images of ``domain`` (images in [0, 1], labels)."""
    from ipshield.models.classifiers import balanced_subset

    split = domain.train
    if k < len(split):
        split = split.subset(balanced_subset(split.labels, k, seed))
    x = split.to_tensor(None if split.in_memory else adapter.image_size)
    return x, torch.as_tensor(split.labels, dtype=torch.long)


@torch.no_grad()
def _image_features(adapter, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    return torch.cat([adapter.encode_image(adapter.preprocess(x[s:s + bs].to(adapter.device)), normalize=True).float()
                      for s in range(0, len(x), bs)])


@torch.no_grad()
def _visual_stats(model, x: torch.Tensor, bs: int = 64):
    from ipshield.protect.ipclip.model import VisualStats, visual_stats

    cfg = model.config
    return VisualStats.cat([visual_stats(model.adapter, x[s:s + bs], cfg.stat_eps, cfg.amp) for s in range(0, len(x), bs)])


def evaluate(model, domain: Domain, n_test: int | None, seed: int) -> float:
    """Accuracy (percent) of a prompt model on ``domain``'s test split (``n_test`` class-balanced images)."""
    from ipshield.models.evaluation import accuracy
    from ipshield.protect.restrict import test_split

    split = test_split(domain, n_test, seed)
    adapter = model.adapter
    return accuracy(model, split, size=None if split.in_memory else adapter.image_size, batch_size=256,
                    device=adapter.device)


def train_prompt(params: list[nn.Parameter], logits: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
                 cfg: PromptAttackConfig, g: torch.Generator, desc: str) -> None:
    """Cross-entropy of ``logits(idx)`` (the logits of the labelled images ``idx``) to ``y[idx]``
    for ``cfg.steps`` steps of Adam at ``cfg.lr`` on ``params`` (batches of ``cfg.batch_size``).
    The one loop of every prompt attack and of the scratch reference: the same step budget."""
    opt = torch.optim.Adam(params, lr=cfg.lr)
    bs = min(cfg.batch_size, len(y))
    for _ in progress(range(cfg.steps), desc=desc):
        idx = torch.randperm(len(y), generator=g)[:bs]
        z = logits(idx)
        loss = F.cross_entropy(z.float(), y[idx].to(z.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class StackedPromptModel(nn.Module):
    """The result of ``prompt-coop``: a frozen protected prompt model with a learned context
    ``ctx`` [n_ctx, W] inserted after SOS, in front of its own prompt tokens (see the module doc)."""

    def __init__(self, protected: nn.Module, ctx: torch.Tensor):
        from ipshield.protect.prompting import class_prompt_template

        super().__init__()
        self.kind = _prompt_kind("prompt-coop", protected)
        self.protected = protected.eval().requires_grad_(False)
        self.adapter = protected.adapter
        self.classes = list(protected.classes)
        n_old = protected.projector.n_ctx if self.kind == "ip-clip" else protected.template.n_ctx
        self.template = class_prompt_template(self.adapter, self.classes, ctx.shape[0] + n_old, truncate=True)
        self.ctx = nn.Parameter(ctx.clone().to(self.adapter.device))

    def train(self, mode: bool = True):  # noqa: D102  (the protected model and the CLIP stay frozen, in eval mode)
        super().train(mode)
        self.protected.eval()
        self.adapter.eval()
        return self

    def inputs(self, images: torch.Tensor):
        """What the logits need from the frozen parts, per image: IP-CLIP's per-image prompt
        tokens and image features; a CoOp-like model's image features."""
        with torch.no_grad():
            if self.kind == "ip-clip":
                stats = _visual_stats(self.protected, images)
                tokens, _dom = self.protected.projector(stats.style, stats.content)
                return stats.features, tokens.float()
            return _image_features(self.adapter, images), None

    def logits(self, features: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Class logits [B, C] of images with ``features`` [B, D] (and IP-CLIP's tokens [B, n, W])."""
        t = self.template
        scale = self.adapter.logit_scale.exp().float()
        if self.kind == "coop":
            prompts = t.assemble(torch.cat([self.ctx, self.protected.ctx.detach()], 0))
            text = self.adapter.encode_text_embeddings(prompts, t.eos, normalize=True).float()
            return scale * features.float() @ text.t()
        from ipshield.protect.ipclip.model import assemble_prompts, shared_prefix_text_features

        B = features.shape[0]
        ctx = torch.cat([self.ctx.unsqueeze(0).expand(B, -1, -1), tokens.to(self.ctx.dtype)], 1)
        if self.protected._shared_prefix_ok:
            prefix = torch.cat([t.prefix[:1].expand(B, 1, -1), ctx.to(t.prefix.dtype)], 1)
            text = shared_prefix_text_features(self.adapter, prefix, t.suffix, t.eos - prefix.shape[1]).float()
        else:
            prompts, eos = assemble_prompts(t, ctx)
            text = self.adapter.encode_text_embeddings(prompts, eos, normalize=True).float().view(B, len(self.classes), -1)
        return scale * torch.einsum("bd,bcd->bc", features.float(), text)

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, images.shape[0], 64):
            feats, tokens = self.inputs(images[s:s + 64])
            out.append(self.logits(feats, tokens))
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_logits(images)


# ============================================================================ the references
def zero_shot_reference(adapter, domain: Domain, n_test: int | None = None, seed: int = 0) -> float:
    """Accuracy of the frozen backbone with the class-name prompt on ``domain`` (no labels at all)."""
    from ipshield.models.zeroshot import ZeroShotClassifier

    return evaluate(ZeroShotClassifier(adapter, domain.classes), domain, n_test, seed)


def scratch_prompt(adapter, domain: Domain, config: PromptAttackConfig | Mapping[str, Any] | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """The from-scratch reference of a prompt attack: CoOp (random context of ``n_ctx`` tokens, the
    frozen CLIP) trained on the same k labelled images of ``domain`` with the same step budget
    (steps, batch size, lr of ``config``); accuracy on ``domain``'s test split."""
    from ipshield.protect.coop import CoOpModel
    from ipshield.protect.prompting import init_context

    cfg = as_config(type(config) if isinstance(config, PromptAttackConfig) else PromptAttackConfig, config, overrides)
    _check_domain("scratch", domain)
    check_k("scratch", cfg.k, domain)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    x, y = _labelled(domain, cfg.k, cfg.seed, adapter)
    feats = _image_features(adapter, x)
    model = CoOpModel(adapter, domain.classes, cfg.n_ctx,
                      init_context(adapter, cfg.n_ctx, getattr(cfg, "ctx_init", None), g)).to(adapter.device)
    model.train()
    train_prompt([model.ctx], lambda idx: model.logits(feats[idx]), y, cfg, g, f"scratch coop k={cfg.k}")
    model.eval()
    return {"attack": "scratch", "domain": domain.name, "k": cfg.k, "steps": cfg.steps,
            "acc_after": evaluate(model, domain, cfg.n_test, cfg.seed), "seconds": round(time.time() - t0, 1),
            "model": model}


def _with_references(result: dict[str, Any], adapter, domain: Domain, cfg: PromptAttackConfig) -> dict[str, Any]:
    if cfg.references:
        result["zero_shot"] = zero_shot_reference(adapter, domain, cfg.n_test, cfg.seed)
        result["scratch"] = scratch_prompt(adapter, domain, cfg)["acc_after"]
        result["margin"] = result["acc_after"] - result["scratch"]
    return result


# ============================================================================ the attacks
def _start(name: str, model, domain: Domain, cfg: PromptAttackConfig):
    check_target(name, "prompt", model)
    kind = _prompt_kind(name, model)
    _check_domain(name, domain)
    _check_classes(name, model, domain)
    check_k(name, cfg.k, domain)
    return kind


def prompt_finetune_attack(model: nn.Module, domain: Domain,
                           config: PromptAttackConfig | Mapping[str, Any] | None = None, *,
                           acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Fine-tune a copy of the prompt model's learned prompt (IP-CLIP: the IP projector; CoOp-like:
    the context) with cross-entropy on ``k`` labelled images of ``domain``; accuracy on its test
    split before and after (and, with ``references``, the zero-shot and scratch references)."""
    cfg = as_config(PromptAttackConfig, config, overrides)
    kind = _start("prompt-finetune", model, domain, cfg)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    if acc_before is None:
        acc_before = evaluate(model, domain, cfg.n_test, cfg.seed)
    attacked = copy_prompt_model(model)
    x, y = _labelled(domain, cfg.k, cfg.seed, attacked.adapter)
    attacked.train()
    if kind == "ip-clip":
        from ipshield.protect.ipclip.model import _autocast

        stats = _visual_stats(attacked, x).to(attacked.adapter.device)
        params = list(attacked.projector.parameters())

        def logits(idx: torch.Tensor) -> torch.Tensor:
            part = stats.index(idx.to(stats.features.device))
            with _autocast(attacked.adapter.device, attacked.config.amp):
                text, _ = attacked.text_features(part)
                return attacked.class_logits(part.features, text)
    else:
        feats = _image_features(attacked.adapter, x)
        params = [attacked.ctx]

        def logits(idx: torch.Tensor) -> torch.Tensor:
            return attacked.logits(feats[idx.to(feats.device)])
    for p in params:
        p.requires_grad_(True)
    train_prompt(params, logits, y, cfg, g, f"prompt-finetune k={cfg.k}")
    attacked.eval()
    result = {"attack": "prompt-finetune", "prompt": kind, "domain": domain.name, "k": cfg.k, "steps": cfg.steps,
              "acc_before": acc_before, "acc_after": evaluate(attacked, domain, cfg.n_test, cfg.seed),
              "seconds": round(time.time() - t0, 1), "model": attacked}
    return _with_references(result, attacked.adapter, domain, cfg)


def prompt_coop_attack(model: nn.Module, domain: Domain,
                       config: PromptCoOpAttackConfig | Mapping[str, Any] | None = None, *,
                       acc_before: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Learn a fresh CoOp context (``n_ctx`` tokens) in front of a frozen copy of the prompt model's
    own prompt tokens (see the module doc) with cross-entropy on ``k`` labelled images of
    ``domain``; the attacked model is a :class:`StackedPromptModel`."""
    from ipshield.protect.prompting import init_context

    cfg = as_config(PromptCoOpAttackConfig, config, overrides)
    kind = _start("prompt-coop", model, domain, cfg)
    t0 = time.time()
    g = seed_everything(cfg.seed)
    if acc_before is None:
        acc_before = evaluate(model, domain, cfg.n_test, cfg.seed)
    adapter = model.adapter
    attacked = StackedPromptModel(copy_prompt_model(model), init_context(adapter, cfg.n_ctx, cfg.ctx_init, g))
    x, y = _labelled(domain, cfg.k, cfg.seed, adapter)
    feats, tokens = attacked.inputs(x)
    attacked.train()
    train_prompt([attacked.ctx],
                 lambda idx: attacked.logits(feats[idx], tokens[idx] if tokens is not None else None),
                 y, cfg, g, f"prompt-coop k={cfg.k}")
    attacked.eval()
    result = {"attack": "prompt-coop", "prompt": kind, "domain": domain.name, "k": cfg.k, "steps": cfg.steps,
              "n_ctx": cfg.n_ctx, "acc_before": acc_before, "acc_after": evaluate(attacked, domain, cfg.n_test, cfg.seed),
              "seconds": round(time.time() - t0, 1), "model": attacked}
    return _with_references(result, adapter, domain, cfg)


@ATTACKS.register("prompt-finetune", config=PromptAttackConfig, target="prompt", budget="k",
                  description="re-learn the protected prompt (IP-CLIP's prompt generator, NTL-prompt's context) on k "
                              "labelled images of the unauthorized domain")
def run_prompt_finetune(target: nn.Module, config: PromptAttackConfig | Mapping[str, Any] | None = None, *,
                        domain: Domain) -> dict[str, Any]:
    """``run(target, config, domain=)`` of ``prompt-finetune`` (see :func:`prompt_finetune_attack`)."""
    return prompt_finetune_attack(target, domain, config)


@ATTACKS.register("prompt-coop", config=PromptCoOpAttackConfig, target="prompt", budget="k",
                  description="[ours] learn a fresh CoOp context in front of the frozen protected prompt, on k "
                              "labelled images of the unauthorized domain")
def run_prompt_coop(target: nn.Module, config: PromptCoOpAttackConfig | Mapping[str, Any] | None = None, *,
                    domain: Domain) -> dict[str, Any]:
    """``run(target, config, domain=)`` of ``prompt-coop`` (see :func:`prompt_coop_attack`)."""
    return prompt_coop_attack(target, domain, config)
