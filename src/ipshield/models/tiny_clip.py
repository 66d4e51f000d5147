"""The small CLIP pretrained by the project.

The methods need a CLIP whose unprotected zero-shot accuracy transfers across domains, as real
CLIP does; no weights can be downloaded, so the project pretrains one on captioned images from the
synthetic generator (and, when present, the real digit domains) and saves it as an ordinary
Hugging Face CLIP folder (config.json, model.safetensors, a word-level tokenizer built with the
``tokenizers`` library, preprocessor_config.json) that ``ipshield.models.clip.load_clip`` loads
like any real CLIP.

Recipe ([ours], measured in docs/models.md): a ViT image tower and a causal text tower of the
sizes in ``PretrainConfig``; a contrastive loss in both directions in which every caption of the
image's class in the batch is a positive (multi-positive InfoNCE: the target distribution is
uniform over same-class captions), a learnable temperature; AdamW with linear warm-up and cosine
decay; a fresh caption per image at every step (``ipshield.data.synthetic.caption``); light
augmentation (random scale / shift / small rotation). ``small_clip(preset)`` pretrains once and
caches the folder under ``ipshield.utils.cache_dir()/small_clip``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from pydantic import Field

from ipshield.config import BaseConfig
from ipshield.errors import ConfigError, IPShieldError

#: special tokens of the word-level tokenizer, in id order. EOS is deliberately NOT id 2:
#: transformers' CLIP text model pools at the *highest token id* when the configured
#: eos_token_id is 2 (a legacy rule), which would pool at the class word instead of at EOS.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def split_words(text: str) -> list[str]:
    """The word-level tokenizer's split of ``text`` (lower-cased words and punctuation marks)."""
    return _WORD.findall(text.lower())


def build_tokenizer(words: Iterable[str]):
    """A word-level, lower-casing ``tokenizers.Tokenizer`` over ``words`` (each entry may be a
    word or a whole caption: it is split the way the tokenizer splits). Ids: <pad>=0, <unk>=1,
    <bos>=2, <eos>=3, then the sorted vocabulary. Every encoding is ``<bos> ... <eos>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab_words = sorted({w for item in words for w in split_words(str(item))} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocab_words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def save_tokenizer(tokenizer, out_dir: str | Path, context_length: int) -> None:
    """Write tokenizer.json + tokenizer_config.json so that ``AutoTokenizer.from_pretrained(out_dir)``
    loads it (as a fast tokenizer with bos/eos/pad/unk)."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=context_length)
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the portable name (transformers 4 and 5)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def clip_config(vocab_size: int, *, vision_layers: int, vision_width: int, vision_heads: int | None = None,
                patch: int, image_size: int, text_layers: int, text_width: int, text_heads: int | None = None,
                embed_dim: int, context_length: int, mlp_ratio: float = 4.0, hidden_act: str = "quick_gelu",
                bos_token_id: int = BOS_ID, eos_token_id: int = EOS_ID, pad_token_id: int = PAD_ID):
    """A ``transformers.CLIPConfig`` of the given sizes (heads default to width / 64, at least 1)."""
    from transformers import CLIPConfig

    if eos_token_id == 2:
        raise ValueError("eos_token_id 2 triggers transformers' legacy argmax pooling; use another id")
    vh = vision_heads or max(1, vision_width // 64)
    th = text_heads or max(1, text_width // 64)
    text = dict(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=int(text_width * mlp_ratio),
                num_hidden_layers=text_layers, num_attention_heads=th, max_position_embeddings=context_length,
                hidden_act=hidden_act, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, projection_dim=embed_dim)
    vision = dict(hidden_size=vision_width, intermediate_size=int(vision_width * mlp_ratio),
                  num_hidden_layers=vision_layers, num_attention_heads=vh, image_size=image_size,
                  patch_size=patch, hidden_act=hidden_act, projection_dim=embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def save_preprocessor_config(out_dir: str | Path, image_size: int, mean, std) -> None:
    """preprocessor_config.json (image size and pixel statistics), read by ``load_clip``."""
    data = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std), "resample": 3, "do_convert_rgb": True,
    }
    Path(out_dir, "preprocessor_config.json").write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- configuration
#: bump when the recipe changes in a way that changes the weights, so cached models are retrained
RECIPE_VERSION = 3

#: the prompts the zero-shot evaluation uses by default (the spec's single template)
DEFAULT_TEMPLATES = ["a photo of a {}."]

#: extra words put in every vocabulary: prompt words that users and prompt learners commonly write
_EXTRA_WORDS = (
    "a an the of in on with and or this that is it its photo picture image drawing sketch painting "
    "rendering close-up small large big digit number numeral handwritten written printed style domain "
    "x . , ! ? : ; - ' \""
).split()


class PretrainConfig(BaseConfig):
    """The small CLIP: architecture, data and optimisation of its contrastive pretraining. The
    defaults are the "default" preset (measured in docs/models.md)."""

    # architecture (an ordinary Hugging Face CLIP; heads default to width / 64). The 32 px data is
    # resized to image_size (24) and cut in 4 px patches: 36 patches + the class token.
    image_size: int = Field(24, ge=8)
    patch: int = Field(4, ge=1)
    vision_layers: int = Field(4, ge=1)
    vision_width: int = Field(96, ge=8)
    vision_heads: int | None = None
    text_layers: int = Field(2, ge=1)
    text_width: int = Field(128, ge=8)
    text_heads: int | None = None
    embed_dim: int = Field(128, ge=4)
    mlp_ratio: float = Field(2.0, gt=0)
    context_length: int = Field(32, ge=8)
    # optimisation
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.02, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    temperature: float = Field(0.07, gt=0, description="initial softmax temperature (learned)")
    own_caption_weight: float = Field(0.0, ge=0, le=1, description="share of the target on the image's own caption")
    grad_clip: float | None = 1.0
    seed: int = 0
    # data
    domains: list[str] | None = Field(None, description="synthetic styles (None: all)")
    n_per_domain: int = Field(3000, ge=10, description="training images per synthetic style")
    data_size: int = Field(32, ge=8, description="resolution of the data (resized to image_size like preprocess does)")
    data_seed: int = Field(1, description="seed of the pretraining images (evaluation uses seed 0 test splits)")
    include_digits: bool = Field(True, description="also pretrain on the real digits when $IPSHIELD_DIGITS "
                                                   "(or digits_root) points at them; skipped silently otherwise")
    digits: list[str] = Field(default_factory=lambda: ["mnist", "usps", "mnistm"])
    digits_root: str | None = None
    digit_weight: float = Field(3.0, ge=0, description="sampling weight of a digit domain relative to a style")
    augment: bool = True
    aug_scale: tuple[float, float] = (0.8, 1.1)
    aug_shift: float = Field(0.08, ge=0)
    aug_rotate: float = Field(10.0, ge=0, description="max rotation in degrees")
    # evaluation at the end (zero-shot on the test splits)
    eval_templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    eval_n_test: int = Field(500, ge=1)
    # machine (neither changes the weights)
    threads: int | None = Field(1, ge=1, description="torch threads per worker (None: torch's default); "
                                                     "1 by default: these small matrices gain little from more "
                                                     "threads, and on a busy machine extra OpenMP threads spin and "
                                                     "slow it down 10x or more (docs/models.md)")
    workers: int | None = Field(None, ge=1, description="Python threads of a step (each with `threads` torch "
                                                        "threads): 2 run the image and the text tower side by "
                                                        "side and make the next batch meanwhile; 1 runs "
                                                        "everything in turn. None: 2 when 2 cores are usable. "
                                                        "The weights are bitwise the same either way")


PRESETS: dict[str, dict[str, Any]] = {
    # the model every command uses by default: the PretrainConfig defaults
    "default": {},
    # a much shorter pretraining for the test suite (looser accuracy, about a minute of one core)
    "test": dict(vision_layers=2, vision_width=64, mlp_ratio=4.0, text_layers=1, text_width=64, embed_dim=64,
                 steps=1200, batch_size=64, lr=2e-3, warmup_steps=50, n_per_domain=600, include_digits=False,
                 digit_weight=1.0, eval_n_test=200),
    # the starting point measured in the foundation issue (ViT 4 x 128, patch 8 on 32 px, 2000 x 128)
    "issue-baseline": dict(image_size=32, patch=8, vision_width=128, mlp_ratio=4.0, steps=2000, lr=5e-4,
                           digit_weight=1.0),
}


def preset_config(preset: str = "default", overrides: list[str] | None = None) -> PretrainConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown pretraining preset '{preset}'", f"choose one of: {', '.join(PRESETS)}")
    return PretrainConfig.build(dict(PRESETS[preset]), overrides)


def _resolve_digits(config: PretrainConfig) -> tuple[list[str], str | None]:
    """The digit domains this config will pretrain on (empty when off or absent) and their root."""
    if not config.include_digits:
        return [], None
    from ipshield.data.digits import available_digits, digits_root

    root = config.digits_root or (str(digits_root()) if digits_root() else None)
    if root is None:
        return [], None
    try:
        have = set(available_digits(root))
    except IPShieldError:
        return [], None
    return [d for d in config.digits if d in have], root


def config_hash(config: PretrainConfig) -> str:
    """A short hash of everything that determines the weights (config, recipe and data versions,
    the digit domains actually found)."""
    from ipshield.data import synthetic

    digits, _ = _resolve_digits(config)
    data = config.to_dict()
    data.pop("threads", None)
    data.pop("workers", None)
    data.pop("digits_root", None)
    data["_digits_used"] = digits
    data["_recipe"] = RECIPE_VERSION
    data["_generator"] = getattr(synthetic, "GENERATOR_VERSION", 0)
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- data
class _Pool:
    """Training images of one domain, kept as uint8 [N, 3, S, S], with labels and caption attrs."""

    def __init__(self, name: str, style: str, images, labels, attrs: list[dict[str, str]] | None):
        import torch

        self.name = name
        self.style = style
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.labels = labels
        self.attrs = attrs

    def __len__(self) -> int:
        return len(self.labels)


def _load_pools(config: PretrainConfig, workers: int = 1) -> list[_Pool]:
    """The training pools; with ``workers`` > 1 the synthetic styles are rendered on that many
    threads (each style from its own seeded generator: the same arrays as one after another)."""
    import numpy as np

    from ipshield.data.synthetic import STYLES, load_synthetic

    styles = config.domains or list(STYLES)
    pools = []

    def render(names):
        return load_synthetic(names, n_train=config.n_per_domain, n_test=0, seed=config.data_seed,
                              size=config.data_size)

    if workers > 1 and len(styles) > 1:
        import torch

        with _Workers(min(workers, len(styles)), torch.get_num_threads()) as pool:
            synth = {k: v for part in pool.map(render, [[s] for s in styles]) for k, v in part.items()}
    else:
        synth = render(styles)
    for name, dom in synth.items():
        table = dom.meta.get("train_attrs", {})
        attrs = [{k: v[i] for k, v in table.items()} for i in range(len(dom.train))] if table else None
        pools.append(_Pool(name, name, np.ascontiguousarray(dom.train.images), dom.train.labels, attrs))
    digits, root = _resolve_digits(config)
    if digits:
        from ipshield.data.digits import load_digits

        for name, dom in load_digits(digits, root=root, size=config.data_size).items():
            pools.append(_Pool(name, name, np.ascontiguousarray(dom.train.images), dom.train.labels, None))
    return pools


def _vocabulary(pools: list[_Pool], templates: list[str], n_samples: int = 4000) -> list[str]:
    """Every word the captions can produce (sampled widely), the class names, the prompt words."""
    import random

    from ipshield.data.synthetic import DIGIT_CLASSES, caption

    rng = random.Random(0)
    words: set[str] = set(_EXTRA_WORDS) | set(DIGIT_CLASSES)
    for t in templates:
        words.update(split_words(t.replace("{}", " ")))
    for pool in pools:
        for i in range(min(n_samples, len(pool))):
            j = rng.randrange(len(pool))
            attrs = pool.attrs[j] if pool.attrs else None
            words.update(split_words(caption(int(pool.labels[j]), pool.style, rng, attrs)))
        for table in (pool.attrs or [])[:2000]:
            for v in table.values():
                words.update(split_words(str(v)))
    return sorted(words)


def _augment(x, generator, scale: tuple[float, float], shift: float, rotate_deg: float):
    """Random zoom, shift and small rotation in one resampling (edge pixels repeat)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    a = (u[:, 1] * 2 - 1) * math.radians(rotate_deg)
    tx, ty = (u[:, 2] * 2 - 1) * shift * 2, (u[:, 3] * 2 - 1) * shift * 2
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def multi_positive_contrastive_loss(image_features, text_features, labels, logit_scale, own_weight: float = 0.0):
    """InfoNCE in both directions where every same-class pair of the batch is a positive (the
    target is uniform over them). Features are L2-normalised; ``logit_scale`` on the log scale.
    ``own_weight`` puts that share of the target on the image's own caption (the paired one),
    which also rewards what captions say beyond the class (style, colours)."""
    import torch

    logits = logit_scale.exp() * image_features @ text_features.t()
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    if own_weight:
        target = (1 - own_weight) * target + own_weight * torch.eye(len(labels), device=target.device)
    loss_i = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * torch.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def _torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(config: PretrainConfig) -> int:
    """The threads of a training step: ``workers``, else 2 when 2 cores are usable (there are two
    towers; more threads have nothing to do)."""
    return max(1, min(config.workers or usable_cores(), 2))


def _batches(config: PretrainConfig, pools: list[_Pool], tokenizer, g):
    """The training batches in step order: (pixels [B, 3, S, S] normalised, labels [B], token ids [B, T]).

    The draws: a domain per image (numpy, seed ``seed``), an image of it, a fresh caption
    (``random.Random(seed)``), the augmentation (torch generator ``g``)."""
    import random as _random

    import numpy as np
    import torch

    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    weights = np.array([config.digit_weight if p.style not in _synthetic_styles() else 1.0 for p in pools])
    weights = weights / weights.sum()
    rng = np.random.default_rng(config.seed)
    cap_rng = _random.Random(config.seed)
    for _ in range(config.steps):
        which = rng.choice(len(pools), size=config.batch_size, p=weights)
        imgs, labels, texts = [], [], []
        for k in np.unique(which):
            pool = pools[k]
            m = int((which == k).sum())
            idx = rng.integers(0, len(pool), size=m)
            imgs.append(pool.images[torch.from_numpy(idx)])
            for j in idx:
                lab = int(pool.labels[j])
                labels.append(lab)
                texts.append(caption_for(pool.style, lab, cap_rng, pool.attrs[j] if pool.attrs else None))
        x = torch.cat(imgs).float().div_(255.0)
        if config.augment:
            x = _augment(x, g, config.aug_scale, config.aug_shift, config.aug_rotate)
        if x.shape[-1] != config.image_size:  # the same resize as CLIPAdapter.preprocess
            x = torch.nn.functional.interpolate(x, size=(config.image_size, config.image_size), mode="bicubic",
                                                align_corners=False, antialias=x.shape[-1] > config.image_size)
            x = x.clamp_(0.0, 1.0)
        x = (x - mean) / std
        y = torch.tensor(labels)
        enc = tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        yield x, y, ids


def _image_features(model, pixels):
    import torch

    out = model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


def _text_features(model, ids):
    import torch

    out = model.get_text_features(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _step_loss(model, x, ids, y, own_weight: float, pool: "_Workers"):
    """The loss of one batch with the gradients of every parameter filled in (``.grad``).

    One worker: the whole graph at once. Two: the image tower on one thread and the text tower on
    the other, the loss on the detached features (its backward gives the features' gradients and
    the temperature's), then each tower's backward on its thread. The towers share no parameter and
    every parameter gets exactly one gradient contribution, so each operation sees the same inputs
    as in the single graph: the weights come out bitwise the same."""
    import torch.nn.functional as F

    if not pool.parallel:
        img_f, txt_f = _image_features(model, x), _text_features(model, ids)
        loss = multi_positive_contrastive_loss(F.normalize(img_f, dim=-1), F.normalize(txt_f, dim=-1), y,
                                               model.logit_scale, own_weight=own_weight)
        loss.backward()
        return loss
    # the image tower (about 3/4 of the work) first: the calling thread takes it
    img_f, txt_f = pool.map(lambda f: f(), [lambda: _image_features(model, x), lambda: _text_features(model, ids)])
    img, txt = img_f.detach().requires_grad_(), txt_f.detach().requires_grad_()
    loss = multi_positive_contrastive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), y, model.logit_scale,
                                           own_weight=own_weight)
    loss.backward()  # fills img.grad, txt.grad and logit_scale.grad
    pool.map(lambda f: f(), [lambda: img_f.backward(img.grad), lambda: txt_f.backward(txt.grad)])
    return loss


class _Workers:
    """Runs the parts of a step on up to ``n`` Python threads (torch ops release the GIL; each
    thread uses ``threads`` torch threads and waits by blocking, so a busy machine costs no
    spinning) and, with more than one, makes the next batch on a thread of its own. ``n == 1``:
    everything inline, in order."""

    def __init__(self, n: int, threads: int):
        self.n = n
        self.threads = threads
        self._pool = self._data = None

    def _init_thread(self):
        import torch

        torch.set_num_threads(self.threads)

    def __enter__(self):
        if self.n > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="ipshield-tower",
                                            initializer=self._init_thread)
            self._data = ThreadPoolExecutor(1, thread_name_prefix="ipshield-batch", initializer=self._init_thread)
        return self

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def __exit__(self, *exc):
        for ex in (self._pool, self._data):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        return False

    def map(self, fn, items) -> list:
        """``[fn(i) for i in items]``, in that order. The calling thread and the pool's threads take
        the next item as they become free, so a thread slowed by other jobs on its core does fewer."""
        items = list(items)
        if self._pool is None or len(items) < 2:
            return [fn(i) for i in items]
        import itertools
        import threading

        results: list = [None] * len(items)
        order, lock = itertools.count(), threading.Lock()

        def drain():
            while True:
                with lock:
                    k = next(order)
                if k >= len(items):
                    return
                results[k] = fn(items[k])

        futures = [self._pool.submit(drain) for _ in range(min(self.n - 1, len(items) - 1))]
        try:
            drain()
        finally:
            for f in futures:
                f.exception()  # wait for the helpers (their errors are raised below)
        for f in futures:
            f.result()
        return results

    def prefetch(self, iterator):
        """``iterator``'s items, the next one made while the caller works on the current one."""
        if self._data is None:
            yield from iterator
            return
        end = object()
        future = self._data.submit(next, iterator, end)
        while True:
            item = future.result()
            if item is end:
                return
            future = self._data.submit(next, iterator, end)
            yield item


# --------------------------------------------------------------------------- pretraining
def pretrain(config: PretrainConfig | None = None, out_dir: str | Path = "small_clip", *, show_progress: bool = True,
             evaluate: bool = True) -> Path:
    """Pretrain the small CLIP and save it as a Hugging Face CLIP folder at ``out_dir`` (returned).

    Also writes ``pretrain.json`` there (the config, time, steps/s, final loss and, with
    ``evaluate``, the zero-shot accuracy per domain on the test splits)."""
    import numpy as np
    import torch
    from transformers import CLIPModel

    from ipshield.models.clip import quiet_transformers
    from ipshield.utils import progress, seed_everything

    config = config or PretrainConfig()
    if config.image_size % config.patch:
        raise ConfigError(f"image_size {config.image_size} is not a multiple of patch {config.patch}",
                          "pick a patch size that divides the image size")
    out = Path(out_dir)
    t_start = time.perf_counter()
    with _torch_threads(config.threads):
        g = seed_everything(config.seed)
        workers = resolve_workers(config)
        pools = _load_pools(config, workers)
        t_data = time.perf_counter() - t_start
        tokenizer = build_tokenizer(_vocabulary(pools, config.eval_templates))
        tokenizer.enable_truncation(config.context_length)
        tokenizer.enable_padding(pad_id=PAD_ID, pad_token="<pad>")
        cfg = clip_config(tokenizer.get_vocab_size(), vision_layers=config.vision_layers,
                          vision_width=config.vision_width, vision_heads=config.vision_heads, patch=config.patch,
                          image_size=config.image_size, text_layers=config.text_layers, text_width=config.text_width,
                          text_heads=config.text_heads, embed_dim=config.embed_dim,
                          context_length=config.context_length, mlp_ratio=config.mlp_ratio)
        cfg.logit_scale_init_value = math.log(1.0 / config.temperature)
        model = CLIPModel(cfg)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
        losses: list[float] = []
        t_train = time.perf_counter()
        cpu_train = time.process_time()
        bar = progress(range(config.steps), desc="pretraining the small CLIP", enabled=show_progress)
        with _Workers(workers, torch.get_num_threads()) as pool:
            # with two workers the batches are made one step ahead on a thread of their own (the same
            # draws in the same order: only this stream uses the data generators)
            batches = pool.prefetch(_batches(config, pools, tokenizer, g))
            for step, (x, y, ids) in zip(bar, batches):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, config)
                opt.zero_grad(set_to_none=True)
                loss = _step_loss(model, x, ids, y, config.own_caption_weight, pool)
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100.0))
                losses.append(float(loss.detach()))
                if hasattr(bar, "set_postfix") and step % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                if os.environ.get("IPSHIELD_PRETRAIN_LOG") and (step % 25 == 0 or step == config.steps - 1):
                    print(f"step {step} loss {np.mean(losses[-25:]):.4f} lr {lr_at(step, config):.2e} "
                          f"scale {model.logit_scale.exp().item():.1f} {time.perf_counter() - t_train:.1f}s", flush=True)
        train_s = time.perf_counter() - t_train
        train_cpu = time.process_time() - cpu_train  # CPU time: what an idle core would need (contention-free)
        model.eval()
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        with quiet_transformers():
            model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp, config.context_length)
        save_preprocessor_config(tmp, config.image_size, PIXEL_MEAN, PIXEL_STD)
        info: dict[str, Any] = {
            "config": config.to_dict(), "config_hash": config_hash(config), "recipe_version": RECIPE_VERSION,
            "parameters": n_params, "domains": [p.name for p in pools],
            "train_images": {p.name: len(p) for p in pools},
            "data_seconds": round(t_data, 2), "train_seconds": round(train_s, 2),
            "train_cpu_seconds": round(train_cpu, 2),
            "steps_per_second": round(config.steps / train_s, 3),
            "cpu_seconds_per_step": round(train_cpu / config.steps, 4), "threads": torch.get_num_threads(),
            "workers": workers,
            "final_loss": float(np.mean(losses[-50:])),
            "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)],
        }
        if evaluate:
            t_eval = time.perf_counter()
            info["zero_shot"] = evaluate_pretrained(tmp, config)
            info["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
        info["total_seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out


#: pixel statistics of the small CLIP's preprocessing (images in [0, 1] -> roughly [-1, 1])
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


def _synthetic_styles() -> set[str]:
    from ipshield.data.synthetic import STYLES

    return set(STYLES)


def caption_for(style: str, label: int, rng, attrs: dict[str, str] | None = None) -> str:
    """A training caption: the generator's captions (they name the class, often the style)."""
    from ipshield.data.synthetic import caption

    return caption(label, style, rng, attrs)


def eval_domains(config: PretrainConfig) -> dict:
    """The domains the zero-shot accuracy of a pretraining is reported on: every synthetic style's
    test split (seed 0, the default data every command uses) and, when the config pretrains on
    them, the real digits' full test splits."""
    from ipshield.data.synthetic import STYLES, load_synthetic

    domains = dict(load_synthetic(list(STYLES), n_train=0, n_test=config.eval_n_test, seed=0,
                                  size=config.data_size))
    digits, root = _resolve_digits(config)
    if digits:
        from ipshield.data.digits import load_digits

        domains.update(load_digits(digits, root=root, size=config.data_size, n_train=0))
    return domains


def evaluate_pretrained(path: str | Path, config: PretrainConfig | None = None) -> dict[str, float]:
    """Zero-shot accuracy (percent) of the CLIP at ``path`` on ``eval_domains``."""
    from ipshield.models.clip import load_clip
    from ipshield.models.zeroshot import evaluate_zero_shot

    config = config or PretrainConfig()
    adapter = load_clip(path)
    return evaluate_zero_shot(adapter, eval_domains(config), templates=config.eval_templates)


# --------------------------------------------------------------------------- the cached small CLIP
@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock (several test sessions may ask for the same model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: no lock, the rename stays atomic
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_UN)
            except ImportError:  # pragma: no cover
                pass


def small_clip_path(preset: str = "default", overrides: list[str] | None = None) -> Path:
    """Where ``small_clip(preset)`` caches its folder (it may not exist yet)."""
    from ipshield.utils import cache_dir

    config = preset_config(preset, overrides)
    return cache_dir() / "small_clip" / f"{preset}-{config_hash(config)}"


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json"))


def is_cached(preset: str = "default", overrides: list[str] | None = None) -> bool:
    """Whether ``small_clip(preset, overrides)`` would return at once (its cached folder is complete)."""
    return _is_complete(small_clip_path(preset, overrides))


def small_clip(preset: str = "default", overrides: list[str] | None = None, show_progress: bool = True) -> Path:
    """The path of the project's small CLIP for ``preset`` ("default" or "test"): pretrained once,
    then reused from ``cache_dir()/small_clip/<preset>-<config hash>``."""
    config = preset_config(preset, overrides)
    path = small_clip_path(preset, overrides)
    if _is_complete(path):
        return path
    with _file_lock(path.parent / f".{path.name}.lock"):
        if _is_complete(path):  # another process finished it while we waited
            return path
        pretrain(config, path, show_progress=show_progress)
    return path


def summarize_pretraining(clip_dir: str | Path, preset: str | None = None) -> dict[str, Any]:
    """metrics.json of a pretraining run (schema of docs/dev/CONTRACTS.md): the zero-shot accuracy
    per domain after pretraining, plus time and throughput."""
    info = json.loads((Path(clip_dir) / "pretrain.json").read_text())
    acc = info.get("zero_shot") or {}
    vals = [v for v in acc.values() if v == v]
    return {
        "method": "pretrain",
        "authorized": None,
        "unauthorized": [],
        "n_classes": 10,
        "accuracy": {"after": acc},
        "summary": {"mean": sum(vals) / len(vals) if vals else None, "min": min(vals) if vals else None},
        "preset": preset,
        "templates": info["config"]["eval_templates"],
        "pretraining": {k: info.get(k) for k in ("parameters", "domains", "train_images", "data_seconds",
                                                  "train_seconds", "train_cpu_seconds", "eval_seconds", "total_seconds",
                                                  "steps_per_second", "threads", "final_loss", "loss_curve",
                                                  "config_hash")},
    }
