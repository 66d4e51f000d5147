"""MAP's mask training: the optimisation of the mask scores (``train_masks``), the BatchNorm
tap of the feature-preservation term, and ``protect``, the library entry point that prepares
the data of each setting and learns the mask."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.data.domain import Domain
from ipshield.distributed import average_gradients, init_from_env, shard
from ipshield.errors import IPShieldError
from ipshield.protect.map.config import MAPConfig
from ipshield.protect.map.mask import MaskedClassifier
from ipshield.protect.map.pseudo_source import (require_batchnorm, synthesize_pseudo_source, synthesize_stat_neighbours,
                                                translate_to_source)
from ipshield.protect.restrict import (BatchStream, calibrate_watermark_opacity, kl_to_reference, ownership_watermark,
                                       tensor_accuracy, train_tensors)
from ipshield.utils import progress, resolve_device, seed_everything


# --------------------------------------------------------------------------------------------- training


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


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 512) -> torch.Tensor:
    return torch.cat([F.softmax(model(x[s:s + bs].to(device)), -1).cpu() for s in range(0, len(x), bs)])


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    from ipshield.models.classifiers import random_shift

    return random_shift(x, max_shift, g)


def train_masks(masked: MaskedClassifier, source_model: nn.Module, x_src: torch.Tensor, x_tgt: torch.Tensor | None,
                config: MAPConfig, neighbour: bool = False,
                val: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                x_stat: torch.Tensor | None = None,
                labelled_tgt: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Learn the mask scores. ``x_tgt`` is the unauthorized pool (or, with ``neighbour``, None:
    each step's unauthorized batch is a strong shift of another pseudo-source batch).

    ``val`` = (authorized images, labels, unauthorized images, labels) held out of training:
    with ``config.select == "val"`` the mask is evaluated on them every ``val_every`` steps and
    the best evaluated mask is kept (see ``MAPConfig.select``); the history records the choice.
    ``labelled_tgt`` = (unauthorized images, labels): the simulated attackers' data of
    ``config.finetune_sims``.
    """
    device = resolve_device(config.device)
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
    pool = None
    if config.finetune_sims > 0:
        if labelled_tgt is None:
            raise IPShieldError("finetune_sims needs labelled unauthorized images for the simulated attacker",
                                "use setting=sa or sf with an unauthorized domain, or finetune_sims=0")
        from ipshield.protect.simft import SimPool, SimulatedAttacker

        att = SimulatedAttacker(steps=config.sim_steps, lr=config.sim_lr, k=config.sim_k, batch_size=config.batch_size,
                                init_fc_prob=config.sim_init_fc_prob)
        pool = SimPool(labelled_tgt[0], labelled_tgt[1].long(), att, torch.Generator().manual_seed(config.seed + 19))
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
                              stat, pool)
    finally:
        if tap is not None:
            tap.remove()
    masked.eval()
    return history


def _finetune_score_grads(masked: MaskedClassifier, pool, n_sims: int, weight: float, device, g: torch.Generator) -> None:
    """Add to the mask scores' gradients the simulated attackers' gradient (``simft``): the
    masked model (mask folded in) is fine-tuned ``n_sims`` times; the fine-tuned copies' gradient
    ``G`` in a masked weight ``W`` reaches its score as ``G * W`` (the straight-through estimator of
    ``W * mask``; first order)."""
    from ipshield.protect.simft import finetuned_restricted_grads

    plain = masked.export()
    names = [n for n, _ in plain.named_parameters()]
    runs = [dict(zip(names, finetuned_restricted_grads(plain, pool, device, g))) for _ in range(n_sims)]
    weights = dict(masked.model.named_parameters())
    for n, score in zip(masked.names, masked.scores):
        parts = [r[n] for r in runs if r.get(n) is not None]
        if not parts:
            continue
        extra = weight * torch.stack(parts).mean(0) * weights[n]
        score.grad = extra if score.grad is None else score.grad + extra


def _mask_steps(masked, source_model, src, tgt, opt, sched, config, neighbour, g, device, val, use_val, tap, stat, pool=None):
    """The optimisation loop of ``train_masks`` (``tap``: the BatchNorm-output tap of the feature
    term or None; ``stat``: the stream of statistics neighbours or None; ``pool``: the simulated
    attackers' data of ``finetune_sims`` or None)."""
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
        if pool is not None:
            _finetune_score_grads(masked, pool, config.finetune_sims, config.w_finetuned, device, pool.g)
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
    device = resolve_device(config.device)
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
                                  val=val, x_stat=x_stat,
                                  labelled_tgt=None if x_tgt is None or y_tgt is None else (x_tgt, y_tgt))
    info["selected"] = next((h["selected_step"] for h in info["history"] if "selected_step" in h), None)
    info["sparsity"] = masked.sparsity()
    return masked, info


def _out_features(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise IPShieldError("cannot tell the number of classes of the model", "give a Classifier with class names")
    return last[-1].out_features
