"""IP-CLIP's training loop: the visual statistics of the training streams (``StatsSource``,
computed per step or cached once), the feature banks (``fill_banks``), model selection on
held-out training images (``EpochSelector``) and ``train_ipclip``."""

from __future__ import annotations

from typing import Sequence

import torch

from ipshield.data.domain import Domain
from ipshield.distributed import average_gradients, init_from_env, shard
from ipshield.errors import DataError
from ipshield.protect.ipclip.config import IPCLIPConfig
from ipshield.protect.ipclip.data import TrainStream, build_streams_with_validation
from ipshield.protect.ipclip.model import IPCLIP, VisualStats, _autocast, fill_bank, visual_stats
from ipshield.protect.training import cosine_with_warmup, epoch_batches
from ipshield.utils import progress, resolve_device, seed_everything


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
