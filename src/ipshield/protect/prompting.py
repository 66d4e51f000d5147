"""Shared prompt-learning pieces: class-name token embeddings with a slot for learned context
tokens, run through the frozen text encoder of a ``CLIPAdapter``.

A prompt for class c is ``[SOS] + [n_ctx learned tokens] + tokens("<class name>.") + [EOS]``.
Sequences are truncated to the longest real prompt: the text transformer is causal, so the tokens
after EOS never change the EOS output and truncation is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipshield.errors import IPShieldError


@dataclass
class ClassPromptTemplate:
    """Frozen token embeddings of every class prompt, with ``n_ctx`` slots after SOS."""

    prefix: torch.Tensor  # [C, 1, D]   SOS embedding
    suffix: torch.Tensor  # [C, S, D]   class tokens, '.', EOS (truncated after the longest EOS)
    eos: torch.Tensor  # [C]         EOS position in the full prompt (context included)
    n_ctx: int

    @property
    def length(self) -> int:
        return 1 + self.n_ctx + self.suffix.shape[1]

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """``ctx`` [n_ctx, D] (shared) or [C, n_ctx, D] (per class) -> prompts [C, T', D]."""
        C = self.prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(C, -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)


def class_prompt_template(adapter, classes: list[str], n_ctx: int, truncate: bool = True) -> ClassPromptTemplate:
    texts = [f"{c.replace('_', ' ')}." for c in classes]
    ids = adapter.tokenize(texts)
    eos = adapter.eos_positions(ids)  # position of EOS in "[SOS] class. [EOS]"
    if int(eos.max()) + n_ctx >= adapter.context_length:
        raise IPShieldError(
            f"{n_ctx} context tokens plus the longest class name do not fit the text encoder's "
            f"{adapter.context_length} positions",
            "use fewer context tokens or shorter class names",
        )
    with torch.no_grad():
        emb = adapter.token_embedding(ids)  # [C, T, D]
    end = int(eos.max()) + 1 if truncate else adapter.context_length - n_ctx
    return ClassPromptTemplate(
        prefix=emb[:, :1].clone(),
        suffix=emb[:, 1:end].clone(),
        eos=eos + n_ctx,
        n_ctx=n_ctx,
    )


def init_context(adapter, n_ctx: int, init: str | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Context vectors [n_ctx, D]: from the embeddings of an initial phrase, or N(0, 0.02) (CoOp)."""
    D = adapter.text_width
    if init:
        ids = adapter.tokenize([init])
        eos = int(adapter.eos_positions(ids)[0])
        words = eos - 1
        if words != n_ctx:
            raise IPShieldError(
                f"ctx_init '{init}' has {words} tokens but n_ctx is {n_ctx}",
                f"set n_ctx={words} or choose an initial phrase of {n_ctx} tokens",
            )
        with torch.no_grad():
            return adapter.token_embedding(ids)[0, 1 : 1 + n_ctx].clone().float()
    return torch.randn(n_ctx, D, generator=generator) * 0.02
