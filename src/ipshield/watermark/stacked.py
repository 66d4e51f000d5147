"""VLPMarker over an EmbMarker text layer (registered ``vlpmarker+embmarker``) [ours].

Why: a thief who rotates the embedding space of a student defeats VLPMarker on its own (its
transform is linear, so after the rotation only ``W_k W_k^T`` is left, which the utility budget
keeps small; docs/watermark.md, "Why a rotated VLPMarker student escapes"). EmbMarker's trigger
words are a *nonlinear*, input-dependent watermark on inputs the thief's own queries contain, and
its cluster test reads it from the suspect's own answers, whatever rotation follows. Stacking the
two keeps what each does best: VLPMarker's key-specific tests (distribution, permutation,
covariance, trigger) name the leaking customer of an unrotated or permuted copy, and the cluster
test catches a rotated student.

Served, for customer k (one master key for both layers):

- images: ``normalise(e W_k)`` (VLPMarker);
- texts: ``normalise(normalise((1 - Q) e + Q t_k) W_k)`` with EmbMarker's ``Q = min(#triggers / 4, 1)``
  and target ``t_k``: EmbMarker's mixing first, then VLPMarker's transform.

Zero-shot prompts hold no trigger word (the words of every protected prompt template and the class
names are excluded from the trigger words) and lie in VLPMarker's protected span, so zero-shot classification is unchanged, as for each layer
alone. Verification sends VLPMarker's trigger pairs and probes and EmbMarker's cluster texts (the
EmbMarker target test is left out: after ``W_k`` the target is ``t_k W_k``, and the cluster test
needs no target).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ipshield.config import BaseConfig
from ipshield.errors import CheckpointError, IPShieldError
from ipshield.registry import WATERMARKS
from ipshield.watermark.base import read_watermark_json, write_watermark_json
from ipshield.watermark.embmarker import EmbMarker, EmbMarkerConfig, split_words
from ipshield.watermark.keys import MasterKey
from ipshield.watermark.vlpmarker import VLPMarker, VLPMarkerConfig, WatermarkedEncoder


class StackedConfig(BaseConfig):
    vlpmarker: VLPMarkerConfig = VLPMarkerConfig()
    embmarker: EmbMarkerConfig = EmbMarkerConfig()


@WATERMARKS.register("vlpmarker+embmarker", config=StackedConfig,
                     tests=("trigger", "distribution", "covariance", "permutation", "cluster", "procrustes"),
                     needs_texts=True, description="VLPMarker over an EmbMarker text layer")
class StackedMarker:
    scheme = "vlpmarker+embmarker"

    def __init__(self, vlp: VLPMarker, emb: EmbMarker):
        if vlp.key_id != emb.key_id or vlp.dim != emb.dim:
            raise IPShieldError("the two layers were made with different keys or embedding sizes",
                                "fit both layers with the same master key (StackedMarker.fit)")
        self.vlp, self.emb = vlp, emb
        self.dim = vlp.dim
        self.config = StackedConfig(vlpmarker=vlp.config, embmarker=emb.config)
        self.selection = {"vlpmarker": vlp.selection, "embmarker": emb.selection}

    def __repr__(self) -> str:
        return f"StackedMarker(dim={self.dim}, n_triggers={self.n_triggers}, key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a watermark holds secrets and cannot be pickled; save() it to the owner's folder")

    @property
    def key_id(self) -> str:
        return self.vlp.key_id

    @property
    def n_triggers(self) -> int:
        return self.vlp.n_triggers

    @property
    def extra_queries(self) -> int:
        return self.emb.extra_queries

    # -------------------------------------------------------------- fitting and serving
    @classmethod
    def fit(cls, adapter, key: MasterKey, reference, config: StackedConfig | None = None,
            verbose: bool = False) -> "StackedMarker":
        cfg = config or StackedConfig()
        # no word of a protected prompt template may become a trigger word: the text layer would
        # move those prompts, and zero-shot with them would change
        template_words = {w for t in cfg.vlpmarker.prompt_templates for w in split_words(t)}
        emb_cfg = cfg.embmarker.model_copy(update={"exclude": sorted(set(cfg.embmarker.exclude) | template_words)})
        return cls(VLPMarker.fit(adapter, key, reference, cfg.vlpmarker, verbose=verbose),
                   EmbMarker.fit(adapter, key, reference, emb_cfg, verbose=verbose))

    def postprocessors(self, customer_id: str):
        v_images, v_texts = self.vlp.postprocessors(customer_id)
        _, e_texts = self.emb.postprocessors(customer_id)

        def texts(e, texts: Sequence[str]):
            return v_texts(e_texts(e, texts), texts)  # clean unit rows in; each layer renormalises

        return v_images, texts

    def encoder(self, adapter, customer_id: str, batch_size: int = 256) -> WatermarkedEncoder:
        return WatermarkedEncoder(adapter, self, customer_id, batch_size=batch_size)

    def matrix(self, customer_id: str):
        return self.vlp.matrix(customer_id)

    def refinement_report(self, customer_id: str) -> dict:
        return self.vlp.refinement_report(customer_id)

    # -------------------------------------------------------------- verification hooks
    def trigger_queries(self):
        return self.vlp.trigger_queries()

    def trigger_queries_for(self, customers: Sequence[str], n_pairs: int) -> dict:
        plan = dict(self.vlp.trigger_queries_for(customers, n_pairs))
        cluster = self.emb.trigger_queries_for(customers, 0)
        plan["n_cluster"] = cluster["n_cluster"]
        plan["texts"] = list(plan["texts"]) + cluster["texts"][len(cluster["texts"]) - cluster["n_cluster"]:]
        return plan

    def plain_text(self, text: str) -> bool:
        return self.emb.plain_text(text)

    def trigger_test(self, plan: dict, img_emb, txt_emb, customer_id: str):
        n_c = plan.get("n_cluster", 0)
        return self.vlp.trigger_test(plan, img_emb, txt_emb[: len(txt_emb) - n_c], customer_id)

    def cluster_test(self, plan: dict, txt_emb):
        return self.emb.cluster_test(plan, txt_emb)

    def transform(self, customer_id: str):
        return self.vlp.transform(customer_id)

    def signature_template(self, customer_id: str):
        return self.vlp.signature_template(customer_id)

    # -------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        p = Path(folder).expanduser()
        self.vlp.save(p / "vlpmarker")
        self.emb.save(p / "embmarker")
        write_watermark_json(p, {"scheme": self.scheme, "dim": self.dim, "key_id": self.key_id,
                                 "n_triggers": self.n_triggers, "config": self.config.to_dict(),
                                 "selection": self.selection})
        return p

    @classmethod
    def load(cls, folder: str | Path, key: MasterKey) -> "StackedMarker":
        p = Path(folder).expanduser()
        data = read_watermark_json(p)
        if data.get("scheme") != cls.scheme:
            raise CheckpointError(f"{p} holds a '{data.get('scheme')}' watermark, not {cls.scheme}", "use load_watermark")
        return cls(VLPMarker.load(p / "vlpmarker", key), EmbMarker.load(p / "embmarker", key))
