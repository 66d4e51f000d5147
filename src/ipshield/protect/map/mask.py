"""MAP's mask: learned binary masks (straight-through estimator) over every conv and linear
weight of a frozen classifier (``MaskedClassifier``); ``export`` folds them into the weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from ipshield.errors import IPShieldError


# --------------------------------------------------------------------------------------------- masks


MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _STEMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, score: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (score > 0).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def maskable_weights(model: nn.Module) -> list[str]:
    """Names of the weights MAP masks: every conv and linear weight (biases and BN stay unmasked)."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, MASKABLE)]


class MaskedClassifier(nn.Module):
    """A frozen classifier whose conv/linear weights are gated by learned binary masks."""

    def __init__(self, model: nn.Module, score_init: float = 0.05):
        super().__init__()
        names = maskable_weights(model)
        if not names:
            raise IPShieldError(
                f"the model ({type(model).__name__}) has no maskable layers: MAP masks the weights of conv and linear layers",
                "give a classifier built from nn.Conv*/nn.Linear layers (e.g. `ipshield train-source --arch vgg_small`)",
            )
        if score_init <= 0:
            raise IPShieldError(f"score_init must be > 0 (got {score_init})", "the mask must start as all ones; use e.g. 0.05")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = names
        params = dict(self.model.named_parameters())
        self.scores = nn.ParameterList([nn.Parameter(torch.full_like(params[n], score_init)) for n in names])

    def train(self, mode: bool = True) -> "MaskedClassifier":
        super().train(mode)
        self.model.eval()  # BN always uses the source running statistics
        return self

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: _STEMask.apply(s) for n, s in zip(self.names, self.scores)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        gated = {n: params[n] * m for n, m in self.masks().items()}
        return functional_call(self.model, gated, (images,))

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.model, "classes", None)

    @torch.no_grad()
    def sparsity(self) -> dict[str, Any]:
        """Pruned fraction per masked weight and overall."""
        per = {n: float((s <= 0).float().mean()) for n, s in zip(self.names, self.scores)}
        total = sum(s.numel() for s in self.scores)
        pruned = sum(int((s <= 0).sum()) for s in self.scores)
        return {"per_layer": per, "overall": pruned / max(1, total), "pruned": pruned, "total": total}

    @torch.no_grad()
    def export(self) -> nn.Module:
        """An ordinary copy of the model with the mask folded into the weights (pruned weights = 0)."""
        out = copy.deepcopy(self.model)
        params = dict(out.named_parameters())
        for n, s in zip(self.names, self.scores):
            params[n].mul_((s > 0).to(params[n].dtype))
        for p in out.parameters():
            p.requires_grad_(True)
        return out.eval()
