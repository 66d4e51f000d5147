"""Multi-process training through torchrun (torch.distributed; gloo on CPU, nccl on GPU).

The training loops stay the same: every process draws the same shuffled batch (same seed), keeps
its slice of it (``shard``), and gradients are averaged across processes before each optimiser
step (``average_gradients``) -- the data-parallel scheme of DistributedDataParallel, for the few
trainable tensors that prompt learning and mask learning have. With one process all of this is a
no-op. Launch::

    torchrun --nproc_per_node 2 -m ipshield.cli protect coop ...          # one machine
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m ipshield.cli ...
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (once); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a batch of indices (all processes hold the same batch)."""
    n = world_size()
    if n == 1:
        return batch
    chunks = torch.tensor_split(batch, n)
    return chunks[rank()]


def average_gradients(params: Iterable[torch.nn.Parameter], weight: float | None = None) -> None:
    """All-reduce gradients so every process steps with the gradient of the whole batch.

    ``weight``: this process's share of the batch (len(shard) / len(batch)); the reduced gradient is
    sum_r weight_r * grad_r, which equals the full-batch mean gradient for mean-reduced losses.
    """
    n = world_size()
    if n == 1:
        return
    w = weight if weight is not None else 1.0 / n
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(w)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
