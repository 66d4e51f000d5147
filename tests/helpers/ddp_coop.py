"""Run by tests/test_distributed.py, with or without torchrun: train CoOp and save the context."""

import sys

import torch
from safetensors.torch import save_file

from ipshield.data.synthetic import load_synthetic
from ipshield.distributed import is_main
from ipshield.models.clip import load_clip
from ipshield.protect.coop import CoOpConfig, train_coop

torch.set_num_threads(1)
clip_dir, out = sys.argv[1], sys.argv[2]
adapter = load_clip(clip_dir)
domain = load_synthetic(["clean"], n_train=256, n_test=64, seed=0)["clean"]
model = train_coop(adapter, domain, CoOpConfig(epochs=2, batch_size=32, augment=False, max_train=256), verbose=False)
if is_main():
    save_file({"ctx": model.ctx.detach().contiguous()}, out)
