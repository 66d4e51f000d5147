"""CoOp: learnable context vectors shared across classes, prepended to the class-name tokens,
trained with cross-entropy on the authorized domain; frozen CLIP. The unprotected prompt-learned
reference that IP-CLIP's drops are measured against (../shared/specs/baselines.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ipshield.config import BaseConfig
from ipshield.data.domain import Domain
from ipshield.distributed import average_gradients, init_from_env, rank, shard
from ipshield.errors import CheckpointError
from ipshield.protect.prompting import class_prompt_template, init_context
from ipshield.protect.training import cosine_with_warmup, epoch_batches, subsample, train_augment
from ipshield.registry import METHODS
from ipshield.utils import progress, resolve_device, seed_everything


class CoOpConfig(BaseConfig):
    n_ctx: int = 8
    ctx_init: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    augment: bool = True
    max_train: int | None = 2000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class CoOpModel(nn.Module):
    """A frozen CLIP with one learned context shared by all classes."""

    def __init__(self, adapter, classes: list[str], n_ctx: int, ctx: torch.Tensor | None = None):
        super().__init__()
        self.adapter = adapter
        self.classes = list(classes)
        self.template = class_prompt_template(adapter, self.classes, n_ctx)
        self.ctx = nn.Parameter(ctx if ctx is not None else init_context(adapter, n_ctx, None))
        self._text_cache: torch.Tensor | None = None

    def text_features(self) -> torch.Tensor:
        prompts = self.template.assemble(self.ctx)
        return self.adapter.encode_text_embeddings(prompts, self.template.eos, normalize=True)

    def train(self, mode: bool = True):  # noqa: D102  (the cached text features are stale once training)
        self._text_cache = None
        super().train(mode)
        self.adapter.eval()
        return self

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        t = text_features if text_features is not None else self.text_features()
        return self.adapter.logit_scale.exp() * image_features @ t.t()

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self._text_cache is None or self.training:
            self._text_cache = self.text_features()
        feats = self.adapter.encode_image(self.adapter.preprocess(images), normalize=True)
        return self.logits(feats, self._text_cache)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"ctx": self.ctx.detach().cpu().contiguous()}, str(path / "prompt.safetensors"))
        (path / "prompt.json").write_text(json.dumps({
            "method": "coop", "classes": self.classes, "n_ctx": self.template.n_ctx,
            "text_width": self.adapter.text_width, "embed_dim": self.adapter.embed_dim,
        }, indent=2))

    @classmethod
    def load(cls, path: str | Path, adapter) -> "CoOpModel":
        from ipshield.runs import load_tensors

        path = Path(path)
        meta_path = path / "prompt.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{path} holds no prompt.json", "give the run folder written by `ipshield protect coop`")
        meta = json.loads(meta_path.read_text())
        ctx = load_tensors(path / "prompt.safetensors")["ctx"]
        if meta.get("text_width") != adapter.text_width or ctx.shape[-1] != adapter.text_width:
            raise CheckpointError(
                f"the prompt in {path} was learned on a text encoder of width {meta.get('text_width')}, "
                f"this CLIP has width {adapter.text_width}",
                "load it with the CLIP checkpoint it was trained on",
            )
        return cls(adapter, meta["classes"], meta["n_ctx"], ctx)


def train_coop(adapter, domain: Domain, config: CoOpConfig | None = None, verbose: bool = True) -> CoOpModel:
    """Learn a CoOp prompt on ``domain``'s train split; returns the model in eval mode."""
    config = config or CoOpConfig()
    init_from_env()
    g = seed_everything(config.seed)  # shuffling: the same on every process
    g_aug = torch.Generator().manual_seed(config.seed * 1000 + 1 + rank())  # augmentation draws
    device = resolve_device(config.device)
    adapter.to(device)
    model = CoOpModel(adapter, domain.classes, config.n_ctx, init_context(adapter, config.n_ctx, config.ctx_init, g)).to(device)
    split = subsample(domain.train, config.max_train, config.seed)
    x_all = split.to_tensor(adapter.image_size if not config.augment else None)
    y_all = torch.from_numpy(split.labels)
    feats_all = None
    if not config.augment:  # the frozen image tower runs once per image
        with torch.no_grad():
            feats_all = torch.cat([adapter.encode_image(adapter.preprocess(x_all[i:i + 256].to(device)))
                                   for i in range(0, len(x_all), 256)])
    bs = min(config.batch_size, len(split))
    steps_per_epoch = max(1, len(split) // bs)
    opt = torch.optim.AdamW([model.ctx], lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_with_warmup(opt, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)
    model.train()
    bar = progress(range(config.epochs), desc="coop", enabled=verbose)
    for _epoch in bar:
        for batch in epoch_batches(len(split), bs, g):
            idx = shard(batch)  # this process's part of the batch (all of it with one process)
            y = y_all[idx].to(device)
            if feats_all is not None:
                feats = feats_all[idx]
            else:
                x = train_augment(x_all[idx], adapter.image_size, g_aug).to(device)
                with torch.no_grad():
                    feats = adapter.encode_image(adapter.preprocess(x), normalize=True)
            loss = F.cross_entropy(model.logits(feats), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients([model.ctx], len(idx) / len(batch))
            opt.step()
            sched.step()
    model.eval()
    return model


@METHODS.register("coop", config=CoOpConfig, model="clip", data=("authorized",), scenarios=(), reference=True,
                  description="unprotected reference: CoOp prompt learned on the authorized domain")
def coop_job(job, config: CoOpConfig) -> dict:
    """Train CoOp on the authorized domain, evaluate zero-shot (before) and CoOp (after) on every
    domain; the prompt is saved into ``job.out`` (by the main process only)."""
    from ipshield.data.domain import check_same_classes
    from ipshield.distributed import is_main
    from ipshield.metrics import summarize_restriction
    from ipshield.protect.base import accuracy_by_domain
    from ipshield.protect.zeroshot import ZeroShotClassifier

    adapter, domains, authorized = job.model, job.domains, job.authorized
    classes = check_same_classes(list(domains.values()))
    zs = ZeroShotClassifier(adapter, classes)
    before = accuracy_by_domain(zs, domains)
    model = train_coop(adapter, domains[authorized], config, verbose=job.verbose)
    after = accuracy_by_domain(model, domains)
    if job.out is not None and is_main():
        model.save(job.out)
    job.options["trained_model"] = model
    return {
        "method": "coop",
        "authorized": authorized,
        "unauthorized": [d for d in domains if d != authorized],
        "n_classes": len(classes),
        "accuracy": {"before": before, "after": after},
        "reference": "zero-shot",
        "summary": summarize_restriction(before, after, authorized, len(classes)),
    }
