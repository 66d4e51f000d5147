"""MAP, mask pruning for (source-free) model IP protection (Peng et al., CVPR 2024), as
reconstructed in ../shared/specs/map.md: the paper's code and body were not available, so every
detail below the abstract is this project's choice ([ours], see docs/map.md).

The source classifier is frozen. Every conv and linear weight gets a real-valued score tensor;
the forward pass uses the weight times the binary mask ``M = 1[score > 0]`` (straight-through
estimator in the backward pass, scores initialised positive so the protected model starts equal
to the source model; BatchNorm stays in eval mode with the source running statistics). Only the
scores are trained (Adam), with

    L = KL(p_src(x_s) || p_M(x_s)) - alpha * min(kl_cap, KL(p_src(x_t) || p_M(x_t)))

(+ an optional penalty on the pruned fraction). The three settings differ in x_s and x_t:

- ``sa`` (SA-MAP): real authorized and real unauthorized training images;
- ``sf`` (SF-MAP): pseudo-source images synthesised from the source model (a conditional
  generator trained so that its images match the source BatchNorm statistics, are classified as
  the requested class and are diverse) and real unauthorized images;
- ``df`` (DF-MAP): the pseudo-source images, and synthetic neighbour domains in place of the
  unknown unauthorized domains: strong pixel shifts of the pseudo-source
  (``ipshield.protect.shifts``) and/or pseudo-source batches moved to random shifts of the source
  BatchNorm statistics (``synthesize_stat_neighbours``).

Options the registry entries turn on (``SA_DEFAULTS``, ``SF_DEFAULTS``, ``DF_DEFAULTS``; measured
in docs/map.md): mixtures of source images in the preservation term, a top-2 push and held-out
mask selection (SA); a BatchNorm-feature preservation term and unauthorized images moved to the
source statistics (SF); both kinds of neighbour domains (DF).

``export`` folds the mask into the weights: the protected model is an ordinary classifier with
pruned (zero) weights and no inference overhead.
"""

# The package, one idea a module (each imports only those above it):
#   config         MAPConfig and the presets SA_DEFAULTS, SF_DEFAULTS, DF_DEFAULTS, SETTINGS
#   mask           the straight-through mask: maskable_weights, MaskedClassifier
#   pseudo_source  pseudo-source synthesis, translation to the source statistics, statistics neighbours
#   train          train_masks and protect
#   (here)         the run, its job function and the three registered methods
# Every name of the former single module is importable from here (private ones included).

from __future__ import annotations

import time
from typing import Any

import torch

from ipshield.data.domain import Domain
from ipshield.protect.map.config import DF_DEFAULTS, SA_DEFAULTS, SETTINGS, SF_DEFAULTS, MAPConfig
from ipshield.protect.map.mask import MASKABLE, MaskedClassifier, _STEMask, maskable_weights
from ipshield.protect.map.pseudo_source import (PseudoSourceGenerator, _bn_matching, _BNStatHook, _optimise_pixels,
                                                require_batchnorm, synthesize_pseudo_source, synthesize_stat_neighbours,
                                                translate_to_source)
from ipshield.protect.map.train import (_FeatureTap, _hold_out, _mask_steps, _out_features, _probs, _random_shift,
                                        protect, train_masks)
from ipshield.protect.restrict import evaluate, finish_run, prepare_run, restriction_job
from ipshield.registry import METHODS

__all__ = [
    "MAPConfig", "SA_DEFAULTS", "SF_DEFAULTS", "DF_DEFAULTS", "SETTINGS",
    "MASKABLE", "maskable_weights", "MaskedClassifier",
    "PseudoSourceGenerator", "require_batchnorm", "synthesize_pseudo_source", "translate_to_source",
    "synthesize_stat_neighbours",
    "train_masks", "protect", "run", "protect_job",
]


def run(config: MAPConfig, source_model, authorized: Domain, unauthorized: list[Domain], out=None,
        pseudo_source: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Protect ``source_model`` with MAP, evaluate before/after, write the run folder at ``out``.

    In SF and DF the authorized domain is used only for evaluation (and in DF the unauthorized
    domains too): the mask never sees their training images.
    """
    t0 = time.time()
    maskable = maskable_weights(source_model)
    if not maskable:
        MaskedClassifier(source_model)  # raises the clear error
    unauth, before = prepare_run(config, source_model, authorized, unauthorized)
    if config.scenario == "ownership":  # train on the watermark the evaluation uses (an "auto" opacity is resolved now)
        config = config.model_copy(update={"watermark_opacity": unauth[0].meta["opacity"]})
    masked, info = protect(source_model, config, authorized, unauth, pseudo_source)
    protected = masked.export()
    name = f"{config.setting}-map"
    extra_domains = [d for d in unauthorized if d.name not in {u.name for u in unauth}] if config.scenario == "ownership" else []
    if extra_domains:
        before.update(evaluate(source_model, {d.name: d for d in extra_domains}, config.n_test, config.seed, config.image_size))
    return finish_run(name, config, source_model, protected, authorized, unauth, out, t0, extra_domains=extra_domains,
                      before=before, sparsity=info["sparsity"], setting=config.setting,
                      pseudo_source=info.get("pseudo_source"), history=info["history"],
                      **{k: info[k] for k in ("skipped", "unauthorized_data") if k in info})


protect_job = restriction_job(run)
METHODS.register("sa-map", config=MAPConfig, defaults=SA_DEFAULTS, model="classifier", data=("authorized", "unauthorized"),
                 scenarios=("target-specified", "ownership"),
                 description="MAP with source and unauthorized data")(protect_job)
METHODS.register("sf-map", config=MAPConfig, defaults=SF_DEFAULTS, model="classifier", data=("unauthorized",),
                 scenarios=("target-specified", "ownership"),
                 description="MAP with unauthorized data and synthesised pseudo-source data")(protect_job)
METHODS.register("df-map", config=MAPConfig, defaults=DF_DEFAULTS, model="classifier", data=(),
                 scenarios=("target-specified", "ownership"),
                 description="MAP without data: pseudo-source and synthetic neighbour domains")(protect_job)
