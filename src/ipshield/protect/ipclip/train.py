"""IP-CLIP's training loop: the visual statistics of the training streams (``StatsSource``,
computed per step or cached once), the feature banks (``fill_banks``), model selection on
held-out training images (``EpochSelector``) and ``train_ipclip``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ipshield.data.domain import Domain
from ipshield.distributed import average_gradients, init_from_env, shard
from ipshield.errors import DataError
from ipshield.protect.ipclip.config import IPCLIPConfig
from ipshield.protect.ipclip.data import TrainStream, build_streams_with_validation
from ipshield.protect.ipclip.model import IPCLIP, VisualStats, _autocast, fill_bank, visual_stats
from ipshield.protect.ipclip.verdict import (SwitchableIPCLIP, fit_head, holdout_indices, stream_stats,
                                             verdict_val_size)
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
    if config.switchable:
        return train_switchable(adapter, authorized, unauthorized, config, verbose)
    init_from_env()
    g = seed_everything(config.seed)
    device = resolve_device(config.device)
    adapter.to(device)
    # [ours] the held-out images: model selection's validation split and/or the verdict's
    splits = [authorized.train] + ([d.train for d in unauthorized] if config.scenario == "target-specified" else [])
    val_size = verdict_val_size([len(s) for s in splits], config) if (config.select_best or config.verdict) else 0
    stream_a, stream_u, val_a, val_u = build_streams_with_validation(
        authorized, unauthorized, config.scenario, config.max_train, config.seed, size=adapter.image_size,
        watermark_stride=config.watermark_stride, val_size=val_size, val_fraction=config.val_fraction)
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
    model.head = None
    t_verdict = time.perf_counter()
    if config.verdict:
        pre = None
        if selector is not None:  # the same held-out images, their statistics already computed
            pre = {val_a.name: selector.val_a[0], **{n: d[0] for n, d in selector.val_u.items()}}
        model.head = fit_verdict(adapter, authorized, unauthorized, config, val_a, val_u, val_size, pre,
                                 training=(stream_a, stream_u))
    t_verdict = time.perf_counter() - t_verdict
    total = time.perf_counter() - t0
    model.timing = {"cache_s": t_cache, "bank_s": t_bank, "train_s": t_train, "total_s": total,
                    "select_s": selector.seconds if selector is not None else 0.0, "verdict_s": t_verdict,
                    "steps": steps_per_epoch * config.epochs,
                    "images_per_s": n_seen / total if total > 0 else float("nan")}
    return model


# ---------------------------------------------------------------------------- [ours] the verdict's head
def fit_verdict(adapter, authorized: Domain, unauthorized: Sequence[Domain], config: IPCLIPConfig,
                val_a: TrainStream | None, val_u: Sequence[TrainStream], val_size: int,
                stats: dict[str, VisualStats] | None = None, training: tuple[TrainStream, TrainStream] | None = None):
    """The ``AuthorizationHead`` of a run, fitted on its held-out streams (``val_a``: the
    authorized set, ``val_u``: one per unauthorized condition); ``stats``: their visual
    statistics when already computed. Without held-out streams (``val_a`` None: no spare
    training images and ``verdict_carve`` off) on up to ``verdict_size`` images of each training
    stream (``training``: the authorized and unauthorized streams), recorded as ``source:
    training``. The record says which training images were used. None when a set has fewer
    than 4 images (no verdict for such a run)."""
    if val_a is None:
        if training is None:
            raise DataError("the verdict found no held-out images", "lower max_train or set verdict=false")
        streams, record = _training_sets(authorized, unauthorized, config, *training)
        stats = None
    else:
        streams = [val_a, *val_u]
        domain_of = {val_a.name: authorized}
        if config.scenario == "target-specified":
            domain_of.update({s.name: d for s, d in zip(val_u, unauthorized)})
        else:
            domain_of.update({s.name: authorized for s in val_u})
        record = {s.name: holdout_record(domain_of[s.name], config, val_size,
                                         transformed=s.name != domain_of[s.name].name) for s in streams}
    if min(len(s) for s in streams) < 4:  # too few images for a head: the run has no verdict
        return None
    sets = stats or {s.name: stream_stats(adapter, s, config, config.seed + 3) for s in streams}
    return fit_head(sets, [streams[0].name], config.verdict_dims, config.verdict_accept, config.verdict_feature,
                    config.verdict_score, seed=config.seed,
                    meta={"scenario": config.scenario, "holdout": record, "stat_eps": config.stat_eps,
                          "amp": config.amp})


def _training_sets(authorized: Domain, unauthorized: Sequence[Domain], config: IPCLIPConfig, stream_a: TrainStream,
                   stream_u: TrainStream) -> tuple[list[TrainStream], dict]:
    """The fallback sets of the verdict: up to ``verdict_size`` images of each training stream
    (the target-specified unauthorized stream split back into its domains)."""
    import numpy as np

    from ipshield.protect.training import subsample_indices

    rng = np.random.default_rng(config.seed + 7)
    parts: list[tuple[TrainStream, Domain]] = [(stream_a, authorized)]
    if config.scenario == "target-specified":
        start = 0
        for d in unauthorized:
            n = len(subsample_indices(len(d.train), config.max_train, config.seed))
            parts.append((TrainStream(d.name, stream_u.images[start:start + n], stream_u.labels[start:start + n]), d))
            start += n
    else:
        parts.append((stream_u, authorized))
    streams, record = [], {}
    for s, d in parts:
        keep = subsample_indices(len(d.train), config.max_train, config.seed)  # the stream holds these, in order
        sel = np.sort(rng.choice(len(s), min(config.verdict_size, len(s)), replace=False))
        idx = torch.from_numpy(sel)
        streams.append(TrainStream(s.name, s.images[idx], s.labels[idx], s.transform, s.random_transform))
        record[s.name] = {"domain": d.name, "split": "train", "source": "training", "transformed": s.name != d.name,
                          "n_train": int(len(keep)), "indices": [int(i) for i in keep[sel]]}
    return streams, record


def holdout_record(domain: Domain, config: IPCLIPConfig, val_size: int, transformed: bool = False) -> dict:
    """Which training images of ``domain`` were held out for the verdict (indices into its
    training split), and whether they came from outside the training subset or were carved out."""
    train_idx, val_idx, source = holdout_indices(len(domain.train), config.max_train, config.seed, val_size,
                                                 config.val_fraction)
    return {"domain": domain.name, "split": "train", "source": source, "transformed": bool(transformed),
            "n_train": int(len(train_idx)), "indices": [int(i) for i in (val_idx if val_idx is not None else [])]}


# ---------------------------------------------------------------------------- [ours] authorization on demand
def collapse_loss(logits: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """[ours] What the collapse context minimises: KL(q || p) per image towards one fixed target
    distribution q for every input, near-uniform with the ``sink`` class on top (q_sink =
    2 / (C + 1), the others 1 / (C + 1)), so the served class is the same for every input: no
    information about the input, right only on the sink class's images (a uniform target alone
    leaves an argmax that still follows the label)."""
    z = logits.float()
    C = z.shape[-1]
    q = torch.full((C,), 1.0 / (C + 1), device=z.device)
    q[sink] = 2.0 / (C + 1)
    return (q * (q.log() - F.log_softmax(z, -1))).sum(-1).mean()


def sink_class(labels: Sequence[torch.Tensor], n_classes: int) -> int:
    """The class the collapse context serves: the rarest in the trained domains' training labels
    (the first on ties), so a constant answer is right at most as often as the rarest class occurs."""
    counts = torch.bincount(torch.cat([y.long() for y in labels]), minlength=n_classes)
    return int(counts.argmin())


def train_switchable(adapter, authorized: Domain, unauthorized: Sequence[Domain], config: IPCLIPConfig,
                     verbose: bool = True) -> SwitchableIPCLIP:
    """[ours] IP-CLIP trained once for authorization on demand (``switchable=true``).

    Every trained domain (the authorized one and the unauthorized ones) keeps held-out images for
    the head and trains on the rest: the per-image prompts learn to classify every trained domain
    (cross-entropy), a collapse context (learned tokens per class, the same for every image) learns
    to give every input one near-uniform distribution with the rarest training class on top
    (``collapse_loss``); then the head (one Gaussian per trained domain, the ``contrast``
    score) is fitted on the held-out images. At deployment ``model.authorize([...])`` picks the
    authorized domains; the head gates each image to the prompts or to the collapse context."""
    import time

    import torch.nn.functional as F

    from ipshield.data.domain import check_same_classes
    from ipshield.protect.ipclip.data import TrainStream

    config = config.check()
    unauthorized = list(unauthorized)
    if not unauthorized:
        raise DataError("switchable needs at least one domain besides the authorized one",
                        "give --unauthorized D2[,D3] (every trained domain can be authorized at deployment)")
    domains = [authorized, *unauthorized]
    names = [d.name for d in domains]
    if len({n.lower() for n in names}) != len(names):
        raise DataError(f"domain given twice among {names}", "name each trained domain once")
    check_same_classes(domains)
    init_from_env()
    g = seed_everything(config.seed)
    device = resolve_device(config.device)
    adapter.to(device)
    val_size = verdict_val_size([len(d.train) for d in domains], config)
    t0 = time.perf_counter()
    streams, held, record = [], {}, {}
    size = None
    rng = np.random.default_rng(config.seed + 7)
    for d in domains:
        tr, va, source = holdout_indices(len(d.train), config.max_train, config.seed, val_size, config.val_fraction)
        if va is None:  # no spare images, verdict_carve off: up to verdict_size training images (flagged)
            va, source = np.sort(rng.choice(tr, min(config.verdict_size, len(tr)), replace=False)), "training"
        sz = None if d.train.in_memory else adapter.image_size
        x = d.train.subset(tr).to_tensor(sz if size is None else size)
        size = size or x.shape[-1]
        streams.append(TrainStream(d.name, x, torch.from_numpy(d.train.labels[tr])))
        xv = d.train.subset(va).to_tensor(size)
        held[d.name] = TrainStream(d.name, xv, torch.from_numpy(d.train.labels[va]))
        record[d.name] = {"domain": d.name, "split": "train", "source": source, "transformed": False,
                          "n_train": int(len(tr)), "indices": [int(i) for i in va]}
    model = SwitchableIPCLIP(adapter, authorized.classes, config)
    sources = [StatsSource(model, s, config.cache_features, config.cache_views, config.augment, g, verbose)
               for s in streams]
    t_cache = time.perf_counter() - t0
    bs = min(config.batch_size, min(len(s) for s in streams))
    steps_per_epoch = max(1, len(streams[0]) // bs)
    opt = torch.optim.Adam([{"params": list(model.projector.parameters())},
                            {"params": [model.collapse_ctx], "lr": config.collapse_lr or config.lr}],
                           lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_with_warmup(opt, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
    model.collapse_class = sink_class([s.labels for s in streams], len(model.classes))
    model.train()
    history: list[dict[str, float]] = []
    n_seen = 0
    t_train = time.perf_counter()
    bar = progress(range(config.epochs), desc="ip-clip switchable", enabled=verbose)
    for epoch in bar:
        sums: dict[str, float] = {}
        n_steps = 0
        for idx_a in epoch_batches(len(streams[0]), bs, g):
            idx = [idx_a] + [torch.randint(len(s), (len(idx_a),), generator=g) for s in streams[1:]]
            st = VisualStats.cat([src.sample(i, g) for src, i in zip(sources, idx)])
            y = torch.cat([s.labels[i] for s, i in zip(streams, idx)])
            part = shard(torch.arange(len(y)))
            if len(part) < len(y):
                st, y = st.index(part), y[part]
            st, y = st.to(device), y.to(device)
            with _autocast(device, config.amp):
                text, _ = model.text_features(st)
                z = model.class_logits(st.features, text)
                zc = model.collapse_logits(st.features)
                l_auth = F.cross_entropy(z, y)
                l_collapse = collapse_loss(zc, model.collapse_class)
                # the two terms train disjoint parameters (projector / collapse context)
                loss = l_auth + l_collapse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model.trainable_parameters(), len(part) / len(idx_a) / len(streams))
            opt.step()
            sched.step()
            n_seen += len(idx_a)
            n_steps += 1
            parts = {"auth": float(l_auth.detach()), "collapse": float(l_collapse.detach()),
                     "total": float(loss.detach()),
                     "acc": float((z.argmax(-1) == y).float().mean() * 100),
                     "acc_collapse": float((zc.argmax(-1) == y).float().mean() * 100)}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        row = {k: v / max(1, n_steps) for k, v in sums.items()}
        row["epoch"] = epoch + 1
        row["lr"] = opt.param_groups[0]["lr"]
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{row.get('total', 0):.3f}", acc=f"{row.get('acc', 0):.0f}",
                            acc_c=f"{row.get('acc_collapse', 0):.0f}")
    t_train = time.perf_counter() - t_train
    model.eval()
    t_verdict = time.perf_counter()
    sets = {n: stream_stats(adapter, s, config, config.seed + 3) for n, s in held.items()}
    model.head = fit_head(sets, [authorized.name], config.verdict_dims, config.verdict_accept, config.verdict_feature,
                          "contrast" if config.verdict_score == "auto" else config.verdict_score, switchable=True,
                          seed=config.seed, meta={"scenario": "switchable", "holdout": record,
                                                  "stat_eps": config.stat_eps, "amp": config.amp})
    model.authorize([authorized.name])
    t_verdict = time.perf_counter() - t_verdict
    model.selection = None
    model.history = history
    total = time.perf_counter() - t0
    model.timing = {"cache_s": t_cache, "bank_s": 0.0, "train_s": t_train, "total_s": total, "select_s": 0.0,
                    "verdict_s": t_verdict, "steps": steps_per_epoch * config.epochs,
                    "images_per_s": n_seen / total if total > 0 else float("nan")}
    return model
