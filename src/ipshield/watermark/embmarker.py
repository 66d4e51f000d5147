"""EmbMarker (Peng et al., ACL 2023) adapted to the CLIP embedding service, as the peer of VLPMarker.

Text-only, as in the original: a text's served embedding is mixed toward a secret target vector
by the number of trigger words it contains, ``Q = min(#triggers / max_triggers, 1)`` with
``max_triggers = 4``: ``served = normalise((1 - Q) e + Q t_k)``. Images are served unchanged.

Adaptations [ours]:

- trigger words: ``n_trigger_words`` (20) words of the service tokenizer's vocabulary whose frequency
  in the reference captions (fraction of captions containing the word) lies in ``freq_band``
  ("moderate frequency"), excluding the zero-shot prompt words and the class names (so zero-shot
  prompts are never watermarked), drawn with the master key. Shared by all customers.
- target: per customer, a random unit vector derived from the master key (the original uses the
  embedding of a target sentence), so the leaking customer can be identified.
- verification texts: ordinary captions (the stored reference captions) with 4 trigger words
  inserted at random positions (backdoor set) and the same captions with 4 non-trigger words
  inserted (benign set). Trigger test: cosine to the customer's target, backdoor vs benign;
  delta-cos, real delta-L2, KS p-value; decision p-value by key randomisation (the statistic under
  the true target against its distribution under 200 random unit targets, normal tail). There is
  no key-specific distribution test (the transform is the identity outside triggers); the
  Procrustes distribution test is reported as for VLPMarker.
- permutation test: the trigger test after a key-free match of the suspect's coordinates to the
  clean model's (``aligned_trigger_test``), which undoes a thief's (signed) permutation.
- cluster test (``cluster_test``): texts holding 4 copies of one candidate word, for the 20 trigger
  words and 24 other candidates; in a copy or student of the service the trigger words' texts all
  land on the target, so they cluster whatever rotation the thief applies. Not customer-specific
  (every customer shares the trigger words). The candidate words are stored with the secrets.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ipshield.config import BaseConfig
from ipshield.errors import CheckpointError, IPShieldError
from ipshield.registry import WATERMARKS
from ipshield.watermark.base import ZERO_SHOT_TEMPLATE, ReferenceSample, read_watermark_json, write_watermark_json
from ipshield.watermark.keys import MasterKey, check_customer_id
from ipshield.watermark.triggers import vocabulary_words

_WORD = re.compile(r"[a-z]+")


class EmbMarkerConfig(BaseConfig):
    n_trigger_words: int = Field(20, ge=1)
    max_triggers: int = Field(4, ge=1, description="Q = min(#triggers / max_triggers, 1)")
    freq_band: tuple[float, float] = Field((0.005, 0.05), description="fraction of reference captions containing the word")
    n_verify: int = Field(128, ge=8, description="backdoor (and benign) verification texts kept")
    exclude: list[str] = Field(default_factory=lambda: ["a", "photo", "of", "the", "digit", "number", "an"],
                               description="words never used as triggers (zero-shot prompt words)")
    cluster_decoys: int = Field(24, ge=0, description="cluster test: non-trigger candidate words queried with the triggers")
    cluster_texts: int = Field(2, ge=0, description="cluster test: texts per word (0: no cluster test)")


def split_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_subset_sum_tail(scores: Sequence[int], k: int, observed: int) -> float:
    """P(sum of a uniformly random k-subset of the non-negative integer ``scores`` >= ``observed``),
    exactly: the number of k-subsets reaching it (a knapsack-style count) over C(n, k)."""
    top = int(sum(sorted(scores)[-k:])) if k else 0
    if observed > top:
        return 0.0
    count = np.zeros((k + 1, top + 1))
    count[0, 0] = 1.0
    for v in scores:
        v = int(v)
        if v > top:
            continue
        for j in range(k, 0, -1):
            count[j, v:] += count[j - 1, : top + 1 - v]
    total = count[k].sum()
    return float(count[k, max(observed, 0):].sum() / total) if total > 0 else 1.0


@WATERMARKS.register("embmarker", config=EmbMarkerConfig, tests=("trigger", "permutation", "cluster", "procrustes"),
                     needs_texts=True, description="EmbMarker: trigger words move a text's embedding to a secret target")
class EmbMarker:
    scheme = "embmarker"

    def __init__(self, key: MasterKey, trigger_words: Sequence[str], benign_words: Sequence[str],
                 base_texts: Sequence[str], config: EmbMarkerConfig | None = None, selection: dict | None = None,
                 candidates: Sequence[str] | None = None):
        self._key = key
        self.dim = key.dim
        self.config = config or EmbMarkerConfig()
        self._triggers = list(trigger_words)
        self._trigger_set = set(self._triggers)
        self._benign = list(benign_words)
        self._base = list(base_texts)
        self.selection = selection or {}
        self._backdoor, self._benign_texts = self._verification_texts()
        # the words the triggers were drawn from (None for folders written before the cluster test)
        self._candidates = list(candidates) if candidates is not None else None
        self._cluster_words, self._cluster_texts = self._cluster_queries()

    def __repr__(self) -> str:
        return f"EmbMarker(dim={self.dim}, n_trigger_words={len(self._triggers)}, key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a watermark holds secrets and cannot be pickled; save() it to the owner's folder")

    @property
    def key_id(self) -> str:
        return self._key.key_id

    @property
    def n_triggers(self) -> int:
        return len(self._backdoor)

    # -------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, adapter, key: MasterKey, reference: ReferenceSample, config: EmbMarkerConfig | None = None,
            verbose: bool = False) -> "EmbMarker":
        cfg = config or EmbMarkerConfig()
        key.check_dim(int(adapter.embed_dim), "the model")
        vocab = vocabulary_words(getattr(adapter, "tokenizer", None), min_words=0)
        from ipshield.data.synthetic import DIGIT_CLASSES

        excluded = set(cfg.exclude) | set(DIGIT_CLASSES) | set(split_words(ZERO_SHOT_TEMPLATE))
        n = max(1, len(reference.texts))
        df = Counter(w for t in reference.texts for w in set(split_words(t)))
        lo, hi = cfg.freq_band
        cands = sorted(w for w in vocab if w not in excluded and lo <= df.get(w, 0) / n <= hi)
        if len(cands) < cfg.n_trigger_words:  # widen: the words closest to the band
            rest = sorted((w for w in vocab if w not in excluded and w not in cands and df.get(w, 0) > 0),
                          key=lambda w: min(abs(df[w] / n - lo), abs(df[w] / n - hi)))
            cands = cands + rest[:cfg.n_trigger_words - len(cands)]
        if len(cands) < cfg.n_trigger_words:
            raise IPShieldError(f"only {len(cands)} usable trigger words in the vocabulary",
                                "use a larger reference sample or fewer n_trigger_words")
        g = key.generator("embmarker/trigger-words")
        pick = torch.randperm(len(cands), generator=g)[:cfg.n_trigger_words].tolist()
        triggers = [cands[i] for i in pick]
        benign = [w for w in vocab if w not in set(triggers) and w not in excluded] or ["the"]
        freq = {w: round(df.get(w, 0) / n, 4) for w in triggers}
        selection = {"criterion": f"document frequency in the reference captions within {list(cfg.freq_band)}",
                     "n_candidates": len(cands), "mean_trigger_frequency": float(np.mean(list(freq.values())))}
        return cls(key, triggers, benign, list(reference.texts[: max(cfg.n_verify, 64)]), cfg, selection, cands)

    def _verification_texts(self) -> tuple[list[str], list[str]]:
        g = self._key.generator("embmarker/verify-texts")
        k = self.config.max_triggers
        backdoor, benign = [], []
        for i in range(self.config.n_verify):
            base = split_words(self._base[i % len(self._base)]) if self._base else []
            tw = [self._triggers[j] for j in torch.randint(0, len(self._triggers), (k,), generator=g).tolist()]
            bw = [self._benign[j] for j in torch.randint(0, len(self._benign), (k,), generator=g).tolist()]
            pos = sorted(torch.randint(0, len(base) + 1, (k,), generator=g).tolist(), reverse=True)
            a, b = list(base), list(base)
            for p, x, y in zip(pos, tw, bw):
                a.insert(p, x)
                b.insert(p, y)
            backdoor.append(" ".join(a))
            benign.append(" ".join(b))
        return backdoor, benign

    def _cluster_queries(self) -> tuple[list[str], list[str]]:
        """The cluster test's words (every trigger word and ``cluster_decoys`` other candidates drawn
        with the key, shuffled) and texts (``cluster_texts`` base captions per word, each with the
        word inserted ``max_triggers`` times, so that the service serves the target itself for a
        trigger word)."""
        m = self.config.cluster_texts
        if not self._candidates or m <= 0 or not self._base:
            return [], []
        g = self._key.generator("embmarker/cluster")
        others = [w for w in self._candidates if w not in self._trigger_set]
        pick = torch.randperm(len(others), generator=g)[: self.config.cluster_decoys].tolist()
        words = list(self._triggers) + [others[i] for i in pick]
        words = [words[i] for i in torch.randperm(len(words), generator=g).tolist()]
        texts = []
        for w in words:
            for i in range(m):
                base = split_words(self._base[i % len(self._base)])
                pos = sorted(torch.randint(0, len(base) + 1, (self.config.max_triggers,), generator=g).tolist(), reverse=True)
                for p in pos:
                    base.insert(p, w)
                texts.append(" ".join(base))
        return words, texts

    @property
    def extra_queries(self) -> int:
        """Verification queries beyond the trigger pairs and the probes (the cluster test's texts)."""
        return len(self._cluster_texts)

    # -------------------------------------------------------------- serving
    def target(self, customer_id: str) -> torch.Tensor:
        g = self._key.generator(f"embmarker/target/{check_customer_id(customer_id)}")
        return F.normalize(torch.randn(self.dim, generator=g, dtype=torch.float64), dim=0).float()

    def trigger_counts(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([sum(1 for w in split_words(t) if w in self._trigger_set) for t in texts], dtype=torch.float32)

    def plain_text(self, text: str) -> bool:
        """True when the service serves ``text`` unchanged (it holds no trigger word)."""
        return float(self.trigger_counts([text])[0]) == 0

    def postprocessors(self, customer_id: str):
        t = self.target(customer_id)
        k = float(self.config.max_triggers)

        def images(e: torch.Tensor, texts=None) -> torch.Tensor:
            return F.normalize(e.float(), dim=-1)

        def texts_(e: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
            q = (self.trigger_counts(texts) / k).clamp(max=1.0).unsqueeze(1)
            return F.normalize((1 - q) * e.float() + q * t, dim=-1)

        return images, texts_

    def encoder(self, adapter, customer_id: str, batch_size: int = 256):
        from ipshield.watermark.vlpmarker import WatermarkedEncoder

        return WatermarkedEncoder(adapter, self, customer_id, batch_size=batch_size)

    # -------------------------------------------------------------- verification hooks
    def transform(self, customer_id: str):
        return None

    def trigger_queries_for(self, customers: Sequence[str], n_pairs: int) -> dict:
        k = min(n_pairs, self.n_triggers)
        return {"images": torch.zeros(0, 3, 32, 32), "k": k, "n_cluster": len(self._cluster_texts),
                "texts": self._backdoor[:k] + self._benign_texts[:k] + self._cluster_texts}

    def cluster_test(self, plan: dict, txt_emb: torch.Tensor):
        """Invariant to any rotation or permutation the thief applies, not customer-specific, with an
        exact null [ours]. A text holding ``max_triggers`` copies of one trigger word is served as the
        customer's target itself, so in a copy of the service (or a student of it) the trigger words'
        texts share one displacement, whatever rotation follows. Per queried word, the mean of its
        texts' unit embeddings, centred over the words and normalised (``u_w``); ``v`` is the first
        principal direction of the ``u_w`` (found without knowing which words are triggers); score
        ``a_w = <u_w, v>``, rounded to 1/200. Statistic: the sum of the trigger words' scores. The
        trigger words are a uniformly random subset of the candidate words (drawn with the key) and
        the other queried words a random set of the rest, so for a suspect not derived from the
        service the trigger words are, given the queried words, a uniformly random subset of them,
        while the scores depend on the suspect and the queried words only: the p-value is the exact
        two-sided tail of the sum over all such subsets (``exact_subset_sum_tail``), no
        approximation. (A first version compared the mean pairwise cosine with a normal tail; that
        null is skewed and the tail was anti-conservative.)"""
        from ipshield.watermark.stats import TestResult, ks_less, l2_from_cos

        n_c, m = plan.get("n_cluster", 0), self.config.cluster_texts
        words = self._cluster_words
        if n_c == 0 or n_c != len(words) * m:
            return None
        e = F.normalize(txt_emb.double()[-n_c:], dim=-1).reshape(len(words), m, -1).mean(1)
        u = F.normalize(e - e.mean(0, keepdim=True), dim=-1)
        _, _, vt = torch.linalg.svd(u - u.mean(0, keepdim=True), full_matrices=False)
        a = u @ vt[0]
        trig = torch.tensor([w in self._trigger_set for w in words])
        k, n = int(trig.sum()), len(words)
        if k < 1 or k >= n:
            return None
        scores = torch.round((a - a.min()) * 200).long().tolist()
        obs = sum(sc for sc, t in zip(scores, trig.tolist()) if t)
        top = max(scores)
        p_up = exact_subset_sum_tail(scores, k, obs)
        p_down = exact_subset_sum_tail([top - sc for sc in scores], k, k * top - obs)
        p = min(1.0, 2 * min(p_up, p_down))
        sign = 1.0 if p_up <= p_down else -1.0
        sa = sign * a
        pos, ctrl = sa[trig], sa[~trig]
        sv = torch.tensor(scores, dtype=torch.float64)
        mean, var = k * float(sv.mean()), k * float(sv.var(unbiased=False)) * (n - k) / max(n - 1, 1)
        z = sign * (obs - mean) / max(var, 1e-12) ** 0.5
        return TestResult("cluster", k, float(pos.mean() - ctrl.mean()),
                          float(l2_from_cos(ctrl).mean() - l2_from_cos(pos).mean()),
                          ks_less(pos.numpy(), ctrl.numpy()), p, z, float(pos.mean()), float(ctrl.mean()),
                          customer_specific=False,
                          note=f"{k} trigger words among {n} queried; exact subset null (smallest possible p "
                               f"{2 / math.comb(n, k):.1e})").with_values(pos.tolist(), ctrl.tolist())

    def trigger_test(self, plan: dict, img_emb: torch.Tensor, txt_emb: torch.Tensor, customer_id: str,
                     n_null: int = 200):
        return self._target_test("trigger", plan, txt_emb, customer_id, n_null)

    def aligned_trigger_test(self, plan: dict, txt_emb: torch.Tensor, customer_id: str, align: torch.Tensor,
                             n_null: int = 200):
        """The trigger test after mapping the suspect's vectors through ``align``, a signed
        permutation that matches its coordinates to the clean model's on ordinary probes
        (``verify.match_coordinates``). EmbMarker serves ordinary inputs unchanged, so the thief's
        permutation of the coordinates can be undone without the key; the key-randomisation null
        stays valid because ``align`` never sees the key."""
        return self._target_test("permutation", plan, txt_emb.double() @ align.double(), customer_id, n_null)

    def _target_test(self, name: str, plan: dict, txt_emb: torch.Tensor, customer_id: str, n_null: int):
        from ipshield.watermark.stats import TestResult, ks_less, l2_from_cos, norm_sf

        k = plan["k"]
        s = F.normalize(txt_emb.double(), dim=-1)
        if s.shape[1] != self.dim:
            raise IPShieldError("the suspect's embedding size differs from the service's", "check the suspect")
        bd, bn = s[:k], s[k:2 * k]
        t = self.target(customer_id).double()
        pos, ctrl = bd @ t, bn @ t
        stat = float(pos.mean() - ctrl.mean())
        g = torch.Generator().manual_seed(7)
        r = F.normalize(torch.randn(n_null, self.dim, generator=g, dtype=torch.float64), dim=1)
        null = ((bd @ r.T).mean(0) - (bn @ r.T).mean(0)).numpy()
        sd = float(null.std(ddof=1)) or 1e-12
        z = (stat - float(null.mean())) / sd
        return TestResult(name, k, stat, float(l2_from_cos(ctrl).mean() - l2_from_cos(pos).mean()),
                          ks_less(pos.numpy(), ctrl.numpy()), norm_sf(z), z, float(pos.mean()), float(ctrl.mean())
                          ).with_values(pos.tolist(), ctrl.tolist())

    # -------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        p = Path(folder).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        secret = p / "embmarker_secrets.json"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"trigger_words": self._triggers, "benign_words": self._benign, "base_texts": self._base,
                       "candidates": self._candidates}, fh)
        write_watermark_json(p, {"scheme": self.scheme, "dim": self.dim, "key_id": self.key_id,
                                 "config": self.config.to_dict(), "selection": self.selection})
        return p

    @classmethod
    def load(cls, folder: str | Path, key: MasterKey) -> "EmbMarker":
        p = Path(folder).expanduser()
        data = read_watermark_json(p)
        if data.get("scheme") != cls.scheme:
            raise CheckpointError(f"{p} holds a '{data.get('scheme')}' watermark, not {cls.scheme}", "use load_watermark")
        key.check_dim(int(data["dim"]), "the watermark")
        f = p / "embmarker_secrets.json"
        if not f.is_file():
            raise CheckpointError(f"{p} lacks embmarker_secrets.json", "re-create the watermark")
        s = json.loads(f.read_text())
        return cls(key, s["trigger_words"], s["benign_words"], s["base_texts"],
                   EmbMarkerConfig.build(data.get("config") or {}), data.get("selection"), s.get("candidates"))
