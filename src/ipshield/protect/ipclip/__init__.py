"""IP-CLIP: prompt-based domain restriction of a frozen CLIP (../shared/specs/ip-clip.md).

From the output tokens of every visual block the *style* ((mean + std) / 2 over tokens) and the
*content* (mean over tokens) of each image are read; the IP projector turns them into L domain
tokens and ``n_img`` image tokens; each image gets its own prompt per class

    [SOS] + [L domain tokens] + [the same L domain tokens] + [n_img image tokens] + "<class>." + [EOS]

run through the frozen text encoder. Training pushes the authorized domain's predictions to the
labels and the unauthorized domain's away from them, helped by a style-enhancement branch over
two class-prototype feature banks. One trainer serves the four scenarios:

- ``target-specified``: a labelled unauthorized domain;
- ``ownership``: the authorized domain with the grid watermark is the unauthorized domain;
- ``target-free``: strong augmentation of the authorized domain stands in for unknown domains;
- ``authorization`` (applicability authorization): only watermarked inputs are served.

Speed (all exact): the frozen image tower can run once per image and view (``cache_features``),
text sequences are cut after the longest real prompt (``truncate_text``, exact because the text
transformer is causal), bf16 autocast on GPU (``amp``).
"""

# The package, one idea a module (each imports only those above it):
#   config    scenarios, signed loss weights, IPCLIPConfig
#   model     visual statistics, IP projector, style branch, banks, prompts, IPCLIP (save / load)
#   data      scenario transforms and the training streams of each scenario
#   verdict   [ours] AuthorizationHead (the per-image verdict), SwitchableIPCLIP (authorization on demand)
#   train     StatsSource, fill_banks, EpochSelector, train_ipclip, train_switchable
#   evaluate  evaluation_sets, accuracy_on_sets, verdict_on_sets
# Every name of the former single module is importable from here (private ones included).

from ipshield.protect.ipclip.config import (CLIPPED_TERMS, LOSS_TERMS, SCENARIO_WEIGHTS, SCENARIOS, WATERMARK_SUFFIX,
                                            IPCLIPConfig, Scenario)
from ipshield.protect.ipclip.model import (GENERATOR_FILE, GENERATOR_META, IPCLIP, IPProjector, StyleBranch, VisualStats,
                                           _autocast, _uniform_, assemble_prompts, fill_bank, layer_statistics,
                                           read_generator_meta, shared_prefix_text_features, supports_shared_prefix,
                                           visual_stats)
from ipshield.protect.ipclip.data import (ImageFn, TrainStream, _authorization_mix, _strong, _watermark, build_streams,
                                          build_streams_with_validation, holdout_split, watermark_fn)
from ipshield.protect.ipclip.verdict import (HEAD_FILE, HEAD_META, AuthorizationHead, SwitchableIPCLIP, auroc, fit_head,
                                             has_head, holdout_indices, load_head)
from ipshield.protect.ipclip.train import (EpochSelector, StatsSource, fill_banks, holdout_record, train_ipclip,
                                           train_switchable)
from ipshield.protect.ipclip.evaluate import accuracy_on_sets, evaluation_sets, verdict_margins, verdict_on_sets

__all__ = [
    "Scenario", "SCENARIOS", "WATERMARK_SUFFIX", "SCENARIO_WEIGHTS", "LOSS_TERMS", "CLIPPED_TERMS", "IPCLIPConfig",
    "VisualStats", "layer_statistics", "visual_stats", "IPProjector", "StyleBranch", "fill_bank", "assemble_prompts",
    "supports_shared_prefix", "shared_prefix_text_features", "IPCLIP", "GENERATOR_FILE", "GENERATOR_META",
    "read_generator_meta",
    "ImageFn", "watermark_fn", "TrainStream", "build_streams", "holdout_split", "build_streams_with_validation",
    "AuthorizationHead", "SwitchableIPCLIP", "HEAD_FILE", "HEAD_META", "auroc", "fit_head", "has_head",
    "holdout_indices", "load_head",
    "StatsSource", "fill_banks", "EpochSelector", "train_ipclip", "train_switchable", "holdout_record",
    "evaluation_sets", "accuracy_on_sets", "verdict_margins", "verdict_on_sets",
]
