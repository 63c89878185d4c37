"""PruMerge — Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models" (2024).

1. Adaptive selection: the patch tokens whose CLS attention is an outlier by the interquartile-range
   rule (score > Q3 + 1.5·IQR, per image) are kept, so each image keeps its own number of tokens.
2. Merge: each kept token absorbs its ``k`` most similar pruned tokens (cosine similarity of keys),
   averaging itself and them weighted by their CLS attention. A pruned token may inform several
   kept tokens, as in the paper.

The result is packed ``(T, C)`` with ``cu_seqlens (B+1,)``: it feeds ``mmkernels.attention`` in
varlen mode directly, with no padding.

Where ours differs, and why:
* protected tokens (CLS) are kept in front of each image's tokens rather than dropped (slice them
  off for a LLaVA projector); the IQR statistics use the patch tokens only;
* at least ``min_keep`` patch tokens are kept per image (an image with no outlier would otherwise
  vanish);
* kept tokens stay in original order; ties break toward the lower index.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._layers import block_with_scores, run_through_block
from ..api import gather_tokens, select_tokens


def iqr_keep_counts(cls_scores: Tensor, protect_first: int = 1, min_keep: int = 1) -> Tensor:
    """Number of patch tokens per image whose score is an IQR outlier (at least ``min_keep``)."""
    patches = cls_scores[:, protect_first:].float()
    q1, q3 = torch.quantile(patches, 0.25, dim=1), torch.quantile(patches, 0.75, dim=1)
    threshold = q3 + 1.5 * (q3 - q1)
    counts = (patches > threshold[:, None]).sum(1)
    return counts.clamp(min=min(min_keep, patches.shape[1]))


def prumerge(
    x: Tensor, keys: Tensor, cls_scores: Tensor, k: int = 32, protect_first: int = 1, min_keep: int = 1
) -> Tuple[Tensor, Tensor]:
    """``x (B, N, C)``, ``keys (B, N, Ck)`` (averaged over heads), ``cls_scores (B, N)``
    -> packed ``(T, C)`` and ``cu_seqlens (B+1,)`` int32 (protected tokens first in each image)."""
    b, n, c = x.shape
    counts = iqr_keep_counts(cls_scores, protect_first, min_keep) + protect_first
    idx, cu = select_tokens(cls_scores, counts, protect_first=protect_first)
    batch = torch.repeat_interleave(torch.arange(b, device=x.device), counts)
    kept_x = gather_tokens(x, idx, cu)  # (T, C)
    # Similarity of each kept token to every token of its image; kept and protected tokens are
    # not candidates for absorption.
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = torch.einsum("tc,tnc->tn", unit[batch, idx], unit[batch])  # (T, N)
    candidate = torch.ones(b, n, dtype=torch.bool, device=x.device)
    candidate[batch, idx] = False
    candidate[:, :protect_first] = False
    sim = sim.masked_fill(~candidate[batch], float("-inf"))
    k_eff = min(k, n)
    top_sim, top_idx = sim.topk(k_eff, dim=1)  # (T, k)
    valid = torch.isfinite(top_sim)
    weights = torch.where(valid, cls_scores.float()[batch[:, None], top_idx], 0)
    neighbours = x.float()[batch[:, None], top_idx]  # (T, k, C)
    own_w = cls_scores.float()[batch, idx]
    total_w = own_w + weights.sum(1)
    merged = own_w[:, None] * kept_x.float() + (weights[..., None] * neighbours).sum(1)
    merged = merged / total_w.clamp_min(1e-12)[:, None]
    # Protected tokens are kept as they are.
    protected = idx < protect_first
    merged = torch.where(protected[:, None], kept_x.float(), merged)
    return merged.to(x.dtype), cu


def prumerge_block_step(
    block, x: Tensor, k: int = 32, protect_first: int = 1, min_keep: int = 1, scores: str = "cls"
) -> Tuple[Tensor, Tensor]:
    """Run one block (anything with ``attention_step`` / ``mlp_step``) and reduce its output by
    :func:`prumerge` with the block's own per-key ``scores`` (``"cls"``; a model without a CLS
    token can use ``"mean"``) and keys averaged over heads: packed ``(T, C)`` and
    ``cu_seqlens``."""
    x, s, keys = block_with_scores(block, x, scores)
    return prumerge(x, keys, s, k, protect_first, min_keep)


class PruMerge(torch.nn.Module):
    """Run a ViT up to block ``layer`` (LLaVA reads the penultimate block, ``-2``) and return that
    block's tokens reduced by :func:`prumerge`: packed ``(T, C)`` and ``cu_seqlens``."""

    def __init__(self, model: torch.nn.Module, k: int = 32, layer: int = -2, protect_first: int = 1, min_keep: int = 1):
        super().__init__()
        self.model, self.k, self.layer = model, k, layer % len(model.blocks)
        self.protect_first, self.min_keep = protect_first, min_keep

    def forward_tokens(self, x: Tensor):
        x, scores, keys = run_through_block(self.model, x, self.layer)
        return prumerge(x, keys, scores, self.k, self.protect_first, self.min_keep)

    def forward(self, pixels: Tensor):
        return self.forward_tokens(self.model.embed(pixels))
