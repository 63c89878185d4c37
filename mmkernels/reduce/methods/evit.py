"""EViT — Liang et al., "Not All Patches Are What You Need: Expediting Vision Transformers via
Token Reorganizations" (ICLR 2022).

In chosen blocks, after attention and before the MLP: keep the ``keep_rate`` fraction of patch
tokens that the CLS token attends to most (``scores="cls"``, averaged over heads), and fuse the
others into one token, their average weighted by that attention; the fused token is appended.

Where ours differs, and why:
* the CLS attention comes out of the fused attention kernel (no eager attention matrix);
* kept tokens stay in their original order (selection indices are ascending);
* a previously fused token is treated like any other token in later pruning steps (as in EViT).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..api import gather_tokens, select_tokens


def evit_fuse(x: Tensor, cls_scores: Tensor, keep: int, protect_first: int = 1) -> Tensor:
    """Keep CLS (+ protected) and the ``keep`` best patch tokens; fuse the rest into one token.

    ``x (B, N, C)``, ``cls_scores (B, N)`` -> ``(B, protect_first + keep + 1, C)``
    (no fused token when nothing is dropped).
    """
    n = x.shape[1]
    k = protect_first + keep
    idx = select_tokens(cls_scores, k, protect_first=protect_first)
    kept = gather_tokens(x, idx)
    if k == n:
        return kept
    dropped = torch.ones_like(cls_scores, dtype=torch.bool).scatter_(1, idx, False)
    w = torch.where(dropped, cls_scores, 0).to(torch.float32)
    fused = (w[..., None] * x.float()).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.cat([kept, fused[:, None].to(x.dtype)], dim=1)


def evit_keep(patches: int, keep_rate: float) -> int:
    """Patch tokens EViT keeps out of ``patches``: ``ceil(keep_rate * patches)``, at least 1."""
    return min(max(1, math.ceil(keep_rate * patches)), patches)


def evit_count(num_tokens: int, keep_rate: float, protect_first: int = 1) -> int:
    """Number of tokens after one EViT step on ``num_tokens``: the protected ones, the kept
    patches (:func:`evit_keep`) and one fused token when any patch is dropped."""
    patches = num_tokens - protect_first
    keep = evit_keep(patches, keep_rate)
    return protect_first + keep + (1 if keep < patches else 0)


def evit_block_step(block, x: Tensor, keep_rate: float, protect_first: int = 1, scores: str = "cls") -> Tensor:
    """One pruning block: attention with its per-key ``scores`` (``"cls"``; a model without a
    CLS token can use ``"mean"``), keep ``keep_rate`` of the patch tokens and fuse the rest
    (:func:`evit_fuse`), then the MLP. ``block`` is anything with ``attention_step`` /
    ``mlp_step`` (our ViT's blocks, the HF layer adapters)."""
    x, s = block.attention_step(x, scores=scores)
    x = evit_fuse(x, s, evit_keep(x.shape[1] - protect_first, keep_rate), protect_first)
    return block.mlp_step(x)


class EViT(nn.Module):
    """Wrap a ViT: at each block in ``prune_at``, keep ``keep_rate`` of the patch tokens by CLS
    attention and fuse the rest. ``forward(pixels)`` returns the final normalised tokens."""

    def __init__(self, model: nn.Module, keep_rate: float, prune_at: Sequence[int] = (3, 6, 9), protect_first: int = 1):
        super().__init__()
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        bad = [i for i in prune_at if not 0 <= i < len(model.blocks)]
        if bad:
            raise ValueError(f"prune_at {bad} outside the model's {len(model.blocks)} blocks")
        self.model, self.keep_rate = model, keep_rate
        self.prune_at, self.protect_first = set(prune_at), protect_first

    def forward_tokens(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.model.blocks):
            if i in self.prune_at:
                x = evit_block_step(block, x, self.keep_rate, self.protect_first)
            else:
                x = block(x)
        return self.model.norm(x)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.forward_tokens(self.model.embed(pixels))
