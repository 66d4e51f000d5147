"""MAP's configuration: ``MAPConfig`` and the presets of the registered settings
(``SA_DEFAULTS``, ``SF_DEFAULTS``, ``DF_DEFAULTS``; ``SETTINGS`` names the entry of each)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from ipshield.protect.restrict import RestrictionConfig


class MAPConfig(RestrictionConfig):
    setting: Literal["sa", "sf", "df"] = "sa"
    steps: int = 300
    batch_size: int = 32
    #: Adam learning rate of the mask scores
    lr: float = 1e-2
    #: initial score of every weight (> 0: the mask starts all ones)
    score_init: float = 0.3
    #: weight of the unauthorized (divergence) term
    alpha: float = 0.1
    #: the divergence term is capped at this value (nats), per sample [ours: the spec's cap of
    #: 1 nat on the batch mean does not make the unauthorized prediction wrong; capping each
    #: sample at 5 nats keeps pushing the samples that are still classified as by the source]
    kl_cap: float = 5.0
    #: cap each sample's divergence (True) or the batch mean (False, as in NTL)
    cap_per_sample: bool = True
    #: divergence on the unauthorized data: "ce" = KL(onehot(source prediction) || p_M), i.e. the
    #: cross-entropy to the source's predicted class [ours: unlike the soft KL it has a gradient
    #: at the start, where p_M = p_src]; "kl" = KL(p_src || p_M) as in the spec's sketch
    target_loss: Literal["ce", "kl"] = "ce"
    #: random shifts (up to 2 px) of the training batches, so the mask generalises beyond the
    #: training images [ours]
    augment: bool = True
    #: penalty on the pruned fraction (keeps the mask close to all ones)
    sparsity_penalty: float = 0.0
    #: extra source-preservation images per step, as a fraction of the batch: mixtures
    #: lam * x_i + (1 - lam) * x_j of two source images (lam ~ U(0, 1)), whose source outputs the
    #: mask must also keep [ours: the training images alone are fitted confidently by the source
    #: model, so keeping them says little about the borderline test images; mixtures keep the
    #: decision boundaries between the classes]
    preserve_mix: float = 0.0
    #: weight of an extra cross-entropy to the source's predicted class on the source images
    #: [ours: the KL to the source has no gradient while p_M = p_src, i.e. until weights are
    #: already pruned; the cross-entropy has one (on the less confident images, e.g. the
    #: mixtures), so weights the source needs resist the unauthorized term from the start]
    source_ce: float = 0.0
    #: with target_loss "ce": push the unauthorized prediction away from the source's top-k
    #: classes, D = -log(sum of p_M over them) [ours; 1 = the source's predicted class only]
    target_topk: int = 1
    #: weight of a feature-preservation term on the source images: the mean squared difference
    #: between the masked and the source model's BatchNorm outputs (every BN layer; they are
    #: normalised by the source running statistics, so the layers weigh alike) [ours: the output
    #: KL is flat on images the source classifies confidently (e.g. synthesised pseudo-source
    #: images), so the mask can prune what the real source images need before the KL notices;
    #: the features notice]
    preserve_features: float = 0.0
    #: SA/SF: if the source model's accuracy on the (labelled) unauthorized training images is
    #: within this many points of chance, no mask is trained and the model stays unpruned (the
    #: model is already unusable there, and pushing its outputs away from its own guesses only
    #: prunes what the authorized domain needs) [ours]; 0 = off
    skip_at_chance: float = 0.0
    # --- checkpoint selection [ours]
    #: "last": keep the final mask; "val": every ``val_every`` steps evaluate the mask on
    #: images held out of training, and keep, among the evaluated masks whose held-out
    #: unauthorized accuracy is within ``val_tolerance`` points of the lowest one, the mask that
    #: agrees best with the source model on mixtures of held-out authorized images
    select: Literal["last", "val"] = "last"
    #: images held out of each training pool for the selection (removed from training)
    n_val: int = 500
    val_every: int = 25
    val_tolerance: float = 2.0
    # --- pseudo-source synthesis (sf, df)
    #: generator steps [ours: 1000 measured better than 200 for DF-MAP on the grey-digit sources,
    #: MNIST -> USPS 22.5 % vs 49.5 % left in the full digits benchmark; see docs/map.md]
    gen_steps: int = 1000
    gen_batch_size: int = 64
    gen_lr: float = 1e-3
    z_dim: int = 64
    #: generator width (channels at 8 px = 2 x width; small so that synthesis stays cheap on CPU)
    gen_width: int = 32
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    diversity_weight: float = 1.0
    n_pseudo: int = 2000
    #: SF only: also move this many unauthorized training images to the source model's BatchNorm
    #: statistics (pixel optimisation from the image, keeping the source's predicted class) and add
    #: them to the pseudo-source [ours: the generator's images cover a source such as MNIST-M
    #: poorly (colour noise), and the mask then prunes what the real source needs; see
    #: docs/map.md]; 0 = off
    translate_target: int = 0
    translate_steps: int = 50
    translate_lr: float = 0.1
    #: only unauthorized images the source model classifies with at least this probability are
    #: moved (the class it predicts is what the moved image must keep; a weak guess would teach
    #: the mask a wrong class)
    translate_min_confidence: float = 0.9
    # --- neighbour domains (df)
    n_shift_compose: int = 2
    #: DF: where the neighbour domains come from. "shifts" = pixel-space shifts of the
    #: pseudo-source (``ipshield.protect.shifts``); "stats" = feature-statistics shifts: batches
    #: of pseudo-source images optimised in pixel space so that their statistics at the source
    #: model's BatchNorm layers match randomly shifted copies of the running statistics (one
    #: random shift per batch = one neighbour domain), keeping the requested class; "both" = half
    #: of each unauthorized batch from each [ours]
    neighbours: Literal["shifts", "stats", "both"] = "shifts"
    #: size of the random shift of each BatchNorm layer's statistics (means move by this many
    #: running standard deviations per channel, variances are scaled by exp(+-this))
    stat_shift: float = 3.0
    #: pixel-optimisation steps per neighbour domain (Adam at ``translate_lr``)
    stat_steps: int = 25
    #: images per synthesised neighbour domain (one random statistics shift each)
    stat_domain_size: int = 64

    # --- non-fine-tunable option [ours, in the spirit of SOPHON; ``ipshield.protect.simft``]
    #: simulated fine-tunings per mask step (0 = off): the masked model is fine-tuned as an attacker
    #: would (``sim_k`` labelled unauthorized images, ``sim_steps`` Adam steps at ``sim_lr``,
    #: BatchNorm re-estimated, the final layer re-initialised with probability
    #: ``sim_init_fc_prob``), and the gradient of the fine-tuned copy's restricted loss (KL from
    #: uniform, on other unauthorized images) is added to the mask scores through the weights
    #: (first order). Needs labelled unauthorized images: SA or SF, or the ownership scenario
    finetune_sims: int = 0
    sim_steps: int = 10
    sim_lr: float = 1e-3
    sim_k: int = 10
    sim_init_fc_prob: float = 0.5
    #: weight of the simulated fine-tuning's gradient [ours, docs/map.md: 1.0 pruned MNIST away on
    #: MNIST -> USPS (9.5 %); 0.1 kept it there (96.9 %) but not on USPS -> MNIST (73.6 %) nor on
    #: MNIST-M -> MNIST (9.9 %); 0.02 keeps every pair's authorized domain (drop <= 1.0) and still
    #: halves the FC-only strategies]
    w_finetuned: float = 0.02

    @model_validator(mode="after")
    def _check_setting_options(self) -> "MAPConfig":
        if self.finetune_sims < 0 or self.sim_steps < 1 or self.sim_k < 0 or self.sim_lr <= 0 \
                or not 0 <= self.sim_init_fc_prob <= 1 or self.w_finetuned < 0:
            raise ValueError("finetune_sims must be >= 0, sim_steps >= 1, sim_k >= 0, sim_lr > 0, sim_init_fc_prob in [0, 1] "
                             "and w_finetuned >= 0")
        if self.finetune_sims > 0 and self.setting == "df" and self.scenario != "ownership":
            raise ValueError("finetune_sims simulates an attacker fine-tuning on labelled unauthorized images, and DF-MAP has "
                             "none: use setting=sa or sf (or the ownership scenario), or finetune_sims=0")
        if self.translate_target < 0 or self.translate_steps < 1:
            raise ValueError("translate_target must be >= 0 and translate_steps >= 1")
        if self.translate_target > 0 and self.setting != "sf":
            raise ValueError(f"translate_target moves unauthorized training images, which only SF-MAP uses; "
                             f"setting is '{self.setting}': set translate_target=0 or setting=sf")
        if self.neighbours != "shifts" and self.setting != "df":
            raise ValueError(f"neighbours='{self.neighbours}' chooses DF-MAP's synthetic neighbour domains; setting is "
                             f"'{self.setting}', which trains on real unauthorized images: leave neighbours at 'shifts' or use setting=df")
        if self.stat_shift <= 0 or self.stat_steps < 1 or self.stat_domain_size < 2:
            raise ValueError("stat_shift must be > 0, stat_steps >= 1 and stat_domain_size >= 2")
        return self


#: what the ``sa-map`` entry (CLI ``protect map --setting sa``, ``bench digits``) sets on top of the
#: MAPConfig defaults [ours, measured per pair in docs/map.md: mixtures in the preservation term,
#: top-2 push, held-out checkpoint selection, scores starting at 0.2 so that the unauthorized
#: collapse comes early and leaves steps to repair the authorized accuracy, 450 steps].
SA_DEFAULTS: dict[str, Any] = {"setting": "sa", "preserve_mix": 1.0, "target_topk": 2, "select": "val", "score_init": 0.2,
                               "steps": 450, "skip_at_chance": 3.0}
#: what the ``sf-map`` entry sets [ours, measured per pair in docs/map.md: the feature-preservation
#: term, unauthorized images moved to the source statistics, a stronger unauthorized term]
SF_DEFAULTS: dict[str, Any] = {"setting": "sf", "preserve_features": 10.0, "translate_target": 2000, "translate_steps": 25,
                               "alpha": 0.2, "skip_at_chance": 3.0}

#: what the ``df-map`` entry sets [ours, measured in docs/map.md: half of each unauthorized batch
#: from the pixel shifts, half from random shifts of the source BatchNorm statistics]
DF_DEFAULTS: dict[str, Any] = {"setting": "df", "neighbours": "both", "stat_shift": 3.0}

#: the MAP settings, each a registered method with its preset (the CLI's ``protect map --setting``)
SETTINGS = {"sa": "sa-map", "sf": "sf-map", "df": "df-map"}
