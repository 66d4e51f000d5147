"""Run by tests/test_distributed.py, with or without torchrun: train a method on a small synthetic
task and save its learned tensors (the main process only)."""

import sys

import torch
from safetensors.torch import save_file

from ipshield.data.synthetic import load_synthetic
from ipshield.distributed import is_main
from ipshield.models.clip import load_clip

torch.set_num_threads(1)
method, clip_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
adapter = load_clip(clip_dir)
doms = load_synthetic(["clean", "inverted"], n_train=128, n_test=64, seed=0)
if method == "coop":
    from ipshield.protect.coop import CoOpConfig, train_coop

    model = train_coop(adapter, doms["clean"], CoOpConfig(epochs=2, batch_size=32, augment=False, max_train=128), verbose=False)
    tensors = {"ctx": model.ctx.detach()}
elif method == "ip-clip":
    from ipshield.protect.ipclip import IPCLIPConfig, train_ipclip

    # clip_value out of reach: every term is then a mean over samples, so splitting the batch over
    # processes is exact (with the default cap of 5 on batch means, each process caps its own half)
    cfg = IPCLIPConfig(epochs=2, batch_size=16, augment=False, max_train=128, branch=False, lr=0.002, clip_value=1e6)
    model = train_ipclip(adapter, doms["clean"], [doms["inverted"]], cfg, verbose=False)
    tensors = {k: v.detach() for k, v in model.projector.state_dict().items()}
elif method == "sa-map":
    from ipshield.models.classifiers import create_classifier
    from ipshield.protect.map import MAPConfig, protect

    torch.manual_seed(0)
    source = create_classifier("vgg-tiny", doms["clean"].classes)  # random weights: equality is what is tested
    cfg = MAPConfig(setting="sa", steps=8, batch_size=16, n_train=64, score_init=0.05, device="cpu")
    masked, _ = protect(source, cfg, doms["clean"], [doms["inverted"]])
    tensors = {f"s{i}": p.detach() for i, p in enumerate(masked.scores)}
else:
    raise SystemExit(f"unknown method {method}")
if is_main():
    from ipshield.protect.base import accuracy

    clf = masked if method == "sa-map" else model
    tensors["accuracy"] = torch.tensor([accuracy(clf, doms[d].test) for d in ("clean", "inverted")])
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
