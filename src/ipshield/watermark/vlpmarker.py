"""VLPMarker (reconstruction, see ``docs/watermark.md``): watermark a CLIP embedding service with a
per-customer, near-orthogonal linear transform of the embeddings, aligned on secret triggers.

Python API (what the embedding service builds on)::

    from ipshield.models.clip import load_clip
    from ipshield.watermark.keys import MasterKey
    from ipshield.watermark.vlpmarker import VLPMarker, VLPMarkerConfig
    from ipshield.watermark.base import reference_from_synthetic, load_watermark

    key = MasterKey.load("key.json", dim=adapter.embed_dim)       # secret, mode 600
    wm = VLPMarker.fit(adapter, key, reference_from_synthetic(), VLPMarkerConfig())
    wm.save("wm/")                                                # watermark.json + secrets (mode 600)
    wm = load_watermark("wm/", key)                               # later, in the service
    enc = wm.encoder(adapter, customer_id="acme")                 # a WatermarkedEncoder
    enc.embed_images(images)   # float [B,3,H,W] in [0,1] -> [B,D], unit rows
    enc.embed_texts(["a photo of the digit seven"])              # -> [N,D], unit rows

What is served: ``normalise(e @ W_k)`` for both modalities, where ``e`` is the clean normalised
CLIP embedding and ``W_k`` the customer's matrix. ``W_k`` is recomputed deterministically from the
master key, the customer id and the (stored) triggers: nothing per customer is stored.

Construction of ``W_k`` [ours]:

1. start: the exactly orthogonal ``W0 = customer_start(key, k)`` (QR of an HMAC-seeded Gaussian);
2. pairing: a secret permutation ``pi_k`` (from the key) pairs trigger image ``i`` with trigger
   text ``pi_k(i)``; each customer thus has its own trigger pairs over one shared trigger set;
3. trigger-aligned refinement, ``W = (I + B) W0``: minimise the squared distance between the
   *served* (normalised) embeddings of paired trigger images and texts, an ``||(Y - T) W||^2``
   objective on unit vectors, measured against all unpaired trigger combinations (so the common
   image-text gap is not what is learned) and scaled by the clean permutation spread (a z-score),
   plus ``utility_weight`` times the squared change of the reference image-caption cosines;
   Adam-scaled gradient steps of size ``lr``, each followed by the retraction
   ``W <- W - beta (W W^T W - W)`` that keeps W near-orthogonal;
4. protected span (``protect_prompts``): ``B`` is confined to the orthogonal complement of the
   span of the class-prompt embeddings (``prompt_templates`` x ``prompt_classes``), so for those
   prompts ``t W = t W0`` exactly and zero-shot predictions with them are exactly unchanged (an
   image's cosines to all class prompts are scaled by one positive factor);
5. signature: ``W_k <- (I + signature * Q S_k Q) W_k`` with ``S_k`` a key-derived random symmetric
   matrix (spectral norm 1) and ``Q`` the projector onto the complement of the protected span: the
   customer-specific part of the deviation from orthogonality (the refinement's own deviation is
   largely shared by all customers);
6. monitored along the way (``refinement_report``): orthogonality error ``max|W^T W - I|``, the
   served trigger cosine gap and its permutation z-score, and the utility change (mean absolute
   change of reference image-caption cosines; top-1 retrieval agreement).

The deviation of ``W_k`` from orthogonality is what makes the watermark survive a thief's own
rotation: it changes the *similarity structure* of the served embeddings in a customer-specific
way (the ``covariance`` test of ``ipshield.watermark.verify``: ``W_k W_k^T`` is what no rotation or
permutation of the stolen embeddings changes).

Keys, matrices, triggers and pairings never appear in a repr, a log line, an error message or a
run folder (only in the watermark folder, which the owner keeps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from ipshield.config import BaseConfig
from ipshield.errors import CheckpointError, IPShieldError
from ipshield.registry import WATERMARKS
from ipshield.watermark.base import (
    CleanEncoder,
    ReferenceSample,
    embed_in_batches,
    read_watermark_json,
    write_watermark_json,
)
from ipshield.watermark.keys import MasterKey, check_customer_id, orthogonality_error
from ipshield.watermark.triggers import TriggerSet, make_pool, secret_texts, select_ood, vocabulary_words


DEFAULT_PROMPT_TEMPLATES = ("a photo of the digit {}", "a photo of a {}.", "a photo of the number {}", "the digit {}",
                            "{}", "a picture of {}", "an image of the digit {}", "the handwritten digit {}")


class VLPMarkerConfig(BaseConfig):
    """VLPMarker settings (names as in ``ipshield watermark apply --set key=value``)."""

    n_triggers: int = Field(128, ge=8, description="trigger pairs kept")
    pool_factor: int = Field(4, ge=1, description="pool size = pool_factor * n_triggers (images and texts)")
    trigger_size: int = Field(32, ge=8, description="side of the trigger images in pixels")
    text_words: tuple[int, int] = Field((3, 6), description="words per secret text (min, max)")
    steps: int = Field(300, ge=0, description="refinement steps")
    lr: float = Field(1e-3, gt=0, description="step size (Adam-scaled, per matrix entry)")
    beta: float = Field(0.05, gt=0, le=0.5, description="retraction strength W <- W - beta (W W^T W - W)")
    utility_weight: float = Field(1.0, ge=0, description="weight of the reference cosine-change penalty")
    protect_prompts: bool = Field(True, description="keep W exactly orthogonal on the span of the class-prompt "
                                  "embeddings (zero-shot predictions with those prompts are then exactly unchanged)")
    prompt_templates: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPT_TEMPLATES))
    signature: float = Field(0.3, ge=0, lt=1, description="size of the key-derived symmetric perturbation (outside the "
                             "protected span) applied after the refinement: the customer-specific, rotation-invariant part")
    prompt_classes: list[str] | None = Field(None, description="class names of the protected prompts (None: the digit classes)")
    n_utility: int = Field(256, ge=0, description="reference images/texts used by the utility penalty")


# ------------------------------------------------------------------------------ refinement
def _served_cos(y: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.normalize(y @ w, dim=-1) @ F.normalize(t @ w, dim=-1).T


def trigger_gap(y: torch.Tensor, t: torch.Tensor, pairing: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """Mean cosine of paired trigger (image, text) minus the mean over unpaired combinations, in
    the served space (``w``) or the clean one (``w=None``)."""
    y, t = y.double(), t.double()
    c = F.normalize(y, dim=-1) @ F.normalize(t, dim=-1).T if w is None else _served_cos(y, t, w.double())
    n = len(y)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[torch.arange(n), pairing] = True
    return float(c[mask].mean() - c[~mask].mean())


def _perm_sd(c: torch.Tensor) -> float:
    """Standard deviation of the mean of n entries c[i, s(i)] over random permutations s."""
    n = c.shape[0]
    d = c - c.mean(1, keepdim=True) - c.mean(0, keepdim=True) + c.mean()
    return float(((d ** 2).sum() / max(n - 1, 1)).sqrt() / n)


def protected_projector(protected: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """Projector onto the orthogonal complement of the span of ``protected`` embeddings (None: none)."""
    if protected is None or not len(protected):
        return None
    u, sv, _ = torch.linalg.svd(F.normalize(protected.double(), dim=-1).T, full_matrices=False)
    u = u[:, sv > sv[0] * 1e-6]
    return torch.eye(dim, dtype=torch.float64) - u @ u.T


def _or_identity(proj: torch.Tensor | None, dim: int) -> torch.Tensor:
    return torch.eye(dim, dtype=torch.float64) if proj is None else proj


def signature_matrix(seed: bytes, dim: int) -> torch.Tensor:
    """The key-derived Gaussian matrix ``A`` (iid N(0, 1) entries) behind a signature; ``S`` is its
    symmetric part, projected and scaled (``signature``). Secret."""
    from ipshield.watermark.keys import seed_from_bytes

    g = torch.Generator().manual_seed(seed_from_bytes(seed))
    return torch.randn(dim, dim, generator=g, dtype=torch.float64)


def signature(w: torch.Tensor, seed: bytes, strength: float, proj: torch.Tensor | None) -> torch.Tensor:
    """``(I + strength * Q S Q) W``: a key-derived random symmetric perturbation S (spectral norm 1)
    confined to the complement of the protected span (Q), applied after the refinement."""
    if strength <= 0:
        return w
    d = w.shape[0]
    a = signature_matrix(seed, d)
    sym = (a + a.T) / 2
    if proj is not None:
        sym = proj @ sym @ proj
    sym = sym / torch.linalg.matrix_norm(sym, ord=2).clamp_min(1e-12)
    return (torch.eye(d, dtype=torch.float64) + strength * sym) @ w


@torch.no_grad()
def describe_transform(w: torch.Tensor, y: torch.Tensor, t: torch.Tensor, pairing: torch.Tensor,
                       ref_img: torch.Tensor | None = None, ref_txt: torch.Tensor | None = None) -> dict:
    """The monitored quantities of a transform (numbers only)."""
    y, t, w = F.normalize(y.double(), dim=-1), F.normalize(t.double(), dim=-1), w.double()
    n = len(y)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[torch.arange(n), pairing] = True
    c = _served_cos(y, t, w)
    rec = {"orthogonality_error": orthogonality_error(w), "trigger_gap": float(c[mask].mean() - c[~mask].mean()),
           "trigger_z": float(c[mask].mean() - c.mean()) / max(_perm_sd(c), 1e-12)}
    if ref_img is not None and ref_txt is not None and len(ref_img) and len(ref_txt):
        ri, rt = F.normalize(ref_img.double(), dim=-1), F.normalize(ref_txt.double(), dim=-1)
        base = ri @ rt.T
        cr = _served_cos(ri, rt, w)
        rec["utility_mean_abs_cos_change"] = float((cr - base).abs().mean())
        rec["utility_top1_agreement"] = float((cr.argmax(1) == base.argmax(1)).double().mean())
    return rec


def refine_transform(w0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, pairing: torch.Tensor,
                     config: VLPMarkerConfig, ref_img: torch.Tensor | None = None,
                     ref_txt: torch.Tensor | None = None, log_every: int = 50,
                     protected: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Trigger-aligned refinement of ``w0`` (see the module docstring). Deterministic (float64).
    Returns (W float64 [D, D], history of the monitored quantities).

    Loss = -(paired minus all served trigger cosines) / s0 + utility_weight * mean((served - clean)
    reference image-text cosines)^2 / var(clean reference cosines), where s0 is the permutation
    standard deviation of the clean trigger cosines (so the first term reads as a z-score). Steps
    are Adam-scaled gradient steps of size ``lr``, each followed by the retraction
    ``W <- W - beta (W W^T W - W)``."""
    w = w0.double().clone()
    y, t = F.normalize(y.double(), dim=-1), F.normalize(t.double(), dim=-1)
    n = len(y)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[torch.arange(n), pairing] = True
    s0 = max(_perm_sd(y @ t.T), 1e-6)
    use_ref = ref_img is not None and ref_txt is not None and len(ref_img) > 0 and len(ref_txt) > 0
    use_util = use_ref and config.utility_weight > 0
    if use_ref:
        ri, rt = F.normalize(ref_img.double(), dim=-1), F.normalize(ref_txt.double(), dim=-1)
        base = ri @ rt.T
        vbase = float(base.var()) or 1.0
    history: list[dict] = []
    # W = (I + B) W0 with B = Q B Q, Q the projector onto the complement of the protected span
    proj = protected_projector(protected, w.shape[0])
    w0d = w.clone()
    b = torch.zeros_like(w)

    def monitor(step: int) -> None:
        with torch.no_grad():
            c = _served_cos(y, t, w)
            gap = float(c[mask].mean() - c[~mask].mean())
            z = float(c[mask].mean() - c.mean()) / max(_perm_sd(c), 1e-12)
            rec = {"step": step, "orthogonality_error": orthogonality_error(w), "trigger_gap": gap, "trigger_z": z}
            if use_ref:
                cr = _served_cos(ri, rt, w)
                rec["utility_mean_abs_cos_change"] = float((cr - base).abs().mean())
                rec["utility_top1_agreement"] = float((cr.argmax(1) == base.argmax(1)).double().mean())
        history.append(rec)

    monitor(0)
    m1 = torch.zeros_like(w)
    m2 = torch.zeros_like(w)
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    for step in range(1, config.steps + 1):
        if proj is not None:
            b.requires_grad_(True)
            w = (eye + proj @ b @ proj) @ w0d
            var = b
        else:
            w.requires_grad_(True)
            var = w
        c = _served_cos(y, t, w)
        loss = -(c[mask].mean() - c.mean()) / s0
        if use_util:
            loss = loss + config.utility_weight * ((_served_cos(ri, rt, w) - base) ** 2).mean() / vbase
        (g,) = torch.autograd.grad(loss, var)
        with torch.no_grad():
            m1 = 0.9 * m1 + 0.1 * g
            m2 = 0.999 * m2 + 0.001 * g * g
            upd = (m1 / (1 - 0.9 ** step)) / ((m2 / (1 - 0.999 ** step)).sqrt() + 1e-12)
            if proj is not None:
                b = b.detach() - config.lr * upd
                w = (eye + proj @ b @ proj) @ w0d
                # retraction, expressed on B: W <- W - beta (W W^T W - W)
                w = w - config.beta * (w @ w.T @ w - w)
                b = proj @ (w @ w0d.T - eye) @ proj
                w = (eye + b) @ w0d
            else:
                w = w.detach() - config.lr * upd
                w = w - config.beta * (w @ w.T @ w - w)
        if step % log_every == 0 or step == config.steps:
            monitor(step)
    return w.detach(), history


# ------------------------------------------------------------------------------ the watermark
@WATERMARKS.register("vlpmarker", config=VLPMarkerConfig,
                     tests=("trigger", "distribution", "covariance", "permutation", "procrustes"), needs_texts=False,
                     description="VLPMarker: per-customer orthogonal transforms and trigger pairs")
class VLPMarker:
    """A fitted VLPMarker watermark: the master key, the trigger set and the clean embeddings of
    the triggers (what the refinement needs). ``matrix(customer_id)`` gives ``W_k``."""

    scheme = "vlpmarker"

    def __init__(self, key: MasterKey, triggers: TriggerSet, trigger_image_emb: torch.Tensor,
                 trigger_text_emb: torch.Tensor, config: VLPMarkerConfig | None = None,
                 utility_images: torch.Tensor | None = None, utility_texts: torch.Tensor | None = None,
                 selection: dict | None = None, protected_emb: torch.Tensor | None = None):
        self._key = key
        self.config = config or VLPMarkerConfig()
        self._triggers = triggers
        self._y = trigger_image_emb.double()
        self._t = trigger_text_emb.double()
        self._ui = utility_images.double() if utility_images is not None else None
        self._ut = utility_texts.double() if utility_texts is not None else None
        self.dim = key.dim
        if self._y.shape[1] != self.dim:
            raise IPShieldError(f"trigger embeddings have size {self._y.shape[1]} but the key is for {self.dim}",
                                "fit the watermark with the key made for this model")
        self.selection = selection or {}
        self._protected = protected_emb.double() if protected_emb is not None and len(protected_emb) else None
        self._cache: dict[str, tuple[torch.Tensor, list[dict], torch.Tensor]] = {}

    @property
    def key_id(self) -> str:
        return self._key.key_id

    @property
    def n_triggers(self) -> int:
        return len(self._triggers)

    def __repr__(self) -> str:
        return f"VLPMarker(dim={self.dim}, n_triggers={self.n_triggers}, key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a watermark holds secrets and cannot be pickled; save() it to the owner's folder")

    # -------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, adapter, key: MasterKey, reference: ReferenceSample, config: VLPMarkerConfig | None = None,
            verbose: bool = False) -> "VLPMarker":
        """Make the trigger pool, select the ``n_triggers`` most out-of-distribution images and
        texts w.r.t. ``reference`` (the service's ordinary inputs), embed them with the clean
        model. Per-customer matrices are refined lazily by ``matrix``."""
        cfg = config or VLPMarkerConfig()
        key.check_dim(int(adapter.embed_dim), "the model")
        clean = CleanEncoder(adapter)
        n, m = cfg.n_triggers, cfg.n_triggers * cfg.pool_factor
        pool, kinds = make_pool(m, cfg.trigger_size, key.generator("vlpmarker/pool-images"))
        words = vocabulary_words(getattr(adapter, "tokenizer", None))
        texts = secret_texts(m, words, key.generator("vlpmarker/pool-texts"), tuple(cfg.text_words))
        ref_img = clean.embed_images(reference.images)
        ref_txt = clean.embed_texts(reference.texts)
        pool_img = clean.embed_images(pool)
        pool_txt = clean.embed_texts(texts)
        idx_i, score_i = select_ood(pool_img, ref_img, n)
        idx_t, score_t = select_ood(pool_txt, ref_txt, n)
        trig = TriggerSet(pool[idx_i], [texts[j] for j in idx_t.tolist()], [kinds[j] for j in idx_i.tolist()],
                          key_id=key.key_id)
        kept_kinds = {k: trig.kinds.count(k) for k in sorted(set(trig.kinds))}
        selection = {
            "criterion": "lowest max cosine to the reference sample (images vs reference images, texts vs reference texts)",
            "pool_size": m, "n_reference_images": len(reference.images), "n_reference_texts": len(reference.texts),
            "image_max_cos_kept_mean": float(score_i[idx_i].mean()), "image_max_cos_pool_mean": float(score_i.mean()),
            "text_max_cos_kept_mean": float(score_t[idx_t].mean()), "text_max_cos_pool_mean": float(score_t.mean()),
            "kinds_kept": kept_kinds,
        }
        k = min(cfg.n_utility, len(ref_img), len(ref_txt))
        protected = None
        if cfg.protect_prompts:
            from ipshield.data.synthetic import DIGIT_CLASSES

            classes = cfg.prompt_classes or list(DIGIT_CLASSES)
            protected = clean.embed_texts([t.format(c) for t in cfg.prompt_templates for c in classes])
        wm = cls(key, trig, pool_img[idx_i], pool_txt[idx_t], cfg, ref_img[:k], ref_txt[:k], selection, protected)
        return wm

    # -------------------------------------------------------------- per customer
    def pairing(self, customer_id: str) -> torch.Tensor:
        """The customer's secret pairing: trigger image i goes with trigger text ``pairing[i]``."""
        g = self._key.generator(f"vlpmarker/pairing/{check_customer_id(customer_id)}")
        return torch.randperm(self.n_triggers, generator=g)

    def _refined(self, customer_id: str) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
        if customer_id not in self._cache:
            w0 = self._key.customer_start(customer_id)
            w_ref, hist = refine_transform(w0, self._y, self._t, self.pairing(customer_id), self.config, self._ui,
                                           self._ut, protected=self._protected)
            w = signature(w_ref, self._key.derive(f"vlpmarker/signature/{customer_id}"), self.config.signature,
                          protected_projector(self._protected, self.dim))
            hist = hist + [{"step": "signature", **describe_transform(w, self._y, self._t, self.pairing(customer_id),
                                                                       self._ui, self._ut)}]
            if len(self._cache) > 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[customer_id] = (w, hist, w_ref)
        return self._cache[customer_id]

    def matrix(self, customer_id: str) -> torch.Tensor:
        """``W_k`` (float64 [D, D]); secret."""
        return self._refined(check_customer_id(customer_id))[0]

    def signature_template(self, customer_id: str) -> dict[str, torch.Tensor] | None:
        """What the covariance test needs (secret): the key-derived Gaussian matrix of the customer's
        signature, the projector onto the complement of the protected span, and ``W W^T`` of the
        customer's matrix *before* the signature. The signature seed is derived from the key
        independently of the start, pairing and refinement, so under "not derived from this
        customer" the matrix is independent of everything else the test uses."""
        if self.config.signature <= 0:
            return None
        cid = check_customer_id(customer_id)
        w_ref = self._refined(cid)[2]
        return {"a": signature_matrix(self._key.derive(f"vlpmarker/signature/{cid}"), self.dim),
                "proj": _or_identity(protected_projector(self._protected, self.dim), self.dim),
                "base_gram": w_ref @ w_ref.T}

    def inverse(self, customer_id: str) -> torch.Tensor:
        """``W_k^-1`` (float64), used by the distribution test."""
        return torch.linalg.inv(self.matrix(customer_id))

    def refinement_report(self, customer_id: str) -> dict:
        """Monitored quantities of the customer's refinement (numbers only, nothing secret)."""
        w, hist, _ = self._refined(check_customer_id(customer_id))
        return {"history": hist, "final": hist[-1] if hist else {},
                "clean_trigger_gap": trigger_gap(self._y, self._t, self.pairing(customer_id))}

    def postprocessors(self, customer_id: str):
        """(f_images(e), f_texts(e, texts)): what the service applies to clean unit embeddings."""
        w = self.matrix(customer_id).float()

        def post(e: torch.Tensor, texts=None) -> torch.Tensor:
            return F.normalize(e.float() @ w, dim=-1)

        return post, post

    def encoder(self, adapter, customer_id: str, batch_size: int = 256) -> "WatermarkedEncoder":
        return WatermarkedEncoder(adapter, self, customer_id, batch_size=batch_size)

    # -------------------------------------------------------------- verification hooks
    def trigger_queries(self) -> tuple[torch.Tensor, list[str]]:
        """The inputs the trigger test sends to a suspect (secret: never log them)."""
        return self._triggers.images, list(self._triggers.texts)

    def trigger_queries_for(self, customers: Sequence[str], n_pairs: int) -> dict:
        """Which trigger images and texts to send for a test of ``customers`` with at most
        ``n_pairs`` images (and as many texts). One customer: ``n_pairs`` of its secret pairs.
        Several: the same subset of images and texts for all (every pair falls inside it when
        ``n_pairs`` covers the whole trigger set)."""
        n = self.n_triggers
        order = torch.randperm(n, generator=self._key.generator("vlpmarker/verify-order"))
        k = min(n_pairs, n)
        img_idx = order[:k]
        if len(customers) == 1:
            txt_idx = self.pairing(customers[0])[img_idx]
        else:
            txt_idx = img_idx.clone()
        imgs, texts = self.trigger_queries()
        return {"images": imgs[img_idx], "texts": [texts[j] for j in txt_idx.tolist()], "img_idx": img_idx, "txt_idx": txt_idx}

    def trigger_test(self, plan: dict, img_emb: torch.Tensor, txt_emb: torch.Tensor, customer_id: str):
        """Permutation test of the customer's pairs among the queried triggers (see ``verify``)."""
        from ipshield.watermark.stats import pairing_test

        pi = self.pairing(customer_id)
        txt_pos = {int(j): b for b, j in enumerate(plan["txt_idx"].tolist())}
        rows, cols = [], []
        for a, i in enumerate(plan["img_idx"].tolist()):
            b = txt_pos.get(int(pi[i]))
            if b is not None:
                rows.append(a)
                cols.append(b)
        yi = F.normalize(img_emb[rows].double(), dim=-1)
        tj = F.normalize(txt_emb[cols].double(), dim=-1)
        return pairing_test(yi @ tj.T, "trigger")

    def transform(self, customer_id: str) -> torch.Tensor:
        """The linear map the service applies for this customer (before renormalising)."""
        return self.matrix(customer_id)

    # -------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        p = Path(folder).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        self._triggers.save(p / "triggers.safetensors")
        tensors = {"trigger_image_emb": self._y.float(), "trigger_text_emb": self._t.float()}
        if self._ui is not None:
            tensors["utility_image_emb"] = self._ui.float()
            tensors["utility_text_emb"] = self._ut.float()
        if self._protected is not None:
            tensors["protected_text_emb"] = self._protected.float()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p / "secrets.safetensors"))
        os.chmod(p / "secrets.safetensors", 0o600)
        write_watermark_json(p, {"scheme": self.scheme, "dim": self.dim, "key_id": self.key_id,
                                 "n_triggers": self.n_triggers, "config": self.config.to_dict(),
                                 "selection": self.selection})
        return p

    @classmethod
    def load(cls, folder: str | Path, key: MasterKey) -> "VLPMarker":
        from ipshield.runs import load_tensors

        p = Path(folder).expanduser()
        data = read_watermark_json(p)
        if data.get("scheme") != cls.scheme:
            raise CheckpointError(f"{p} holds a '{data.get('scheme')}' watermark, not {cls.scheme}", "use load_watermark")
        if data.get("key_id") != key.key_id:
            raise IPShieldError("the key does not belong to this watermark (fingerprints differ)",
                                "use the key file the watermark was made with")
        key.check_dim(int(data["dim"]), "the watermark")
        trig = TriggerSet.load(p / "triggers.safetensors")
        t = load_tensors(p / "secrets.safetensors")
        cfg = VLPMarkerConfig.build(data.get("config") or {})
        # embeddings are stored in float32; the refinement is recomputed in float64 from them
        wm = cls(key, trig, t["trigger_image_emb"], t["trigger_text_emb"], cfg,
                 t.get("utility_image_emb"), t.get("utility_text_emb"), data.get("selection"), t.get("protected_text_emb"))
        return wm


class WatermarkedEncoder:
    """The watermarked service for one customer: ``normalise(e @ W_k)`` for images and texts.

    ``embed_images(images)``: float [B, 3, H, W] in [0, 1] (any size; the adapter resizes) -> [B, D].
    ``embed_texts(texts)``: list of strings -> [N, D]. Rows are unit vectors (float32, CPU).
    ``customer_id`` is public; the matrix is not exposed (not an attribute, not in the repr).
    """

    def __init__(self, adapter, watermark, customer_id: str, batch_size: int = 256):
        self.adapter = adapter
        self.customer_id = check_customer_id(customer_id)
        self.scheme = watermark.scheme
        self.embed_dim = int(adapter.embed_dim)
        if self.embed_dim != watermark.dim:
            from ipshield.watermark.keys import WatermarkKeyError

            raise WatermarkKeyError(f"the watermark is for {watermark.dim}-dimensional embeddings but the model gives {self.embed_dim}",
                                    "apply a watermark made with this model's key")
        self._clean = CleanEncoder(adapter, batch_size)
        self._post_images, self._post_texts = watermark.postprocessors(self.customer_id)

    def __repr__(self) -> str:
        return f"WatermarkedEncoder(scheme={self.scheme!r}, customer={self.customer_id!r}, dim={self.embed_dim})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a WatermarkedEncoder holds secrets and cannot be pickled")

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._post_images(self._clean.embed_images(images))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        return self._post_texts(self._clean.embed_texts(texts), texts)
