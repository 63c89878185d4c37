"""FastV — Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models" (ECCV 2024).

In a decoder, after layer ``K`` of the prefill, rank the image tokens by the attention they receive
from the **last** query token (``scores="last"``, averaged over heads), keep the best
``keep_ratio`` of them, and drop the others from the hidden states of the following layers and
from their KV cache.

Where ours differs, and why:
* the last-row attention comes out of the fused attention kernel (FastV's code needs eager
  attention to get it);
* the score is the head-averaged probability from the last query only (as the paper's
  implementation does), restricted to the image span;
* kept tokens stay in order, and the original positions are returned so rotary embeddings of later
  layers use the true positions.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..api import gather_tokens, select_tokens


def fastv_keep_indices(last_scores: Tensor, image_span: Tuple[int, int], keep_ratio: float
                       ) -> Tensor:
    """Positions ``(B, N')`` to keep: every non-image token and the best ``keep_ratio`` of the image
    tokens ``[start, end)`` by ``last_scores (B, N)``, ascending."""
    b, n = last_scores.shape
    start, end = image_span
    if not 0 <= start <= end <= n:
        raise ValueError(f"image_span {image_span} is outside a sequence of {n} tokens")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    n_img = end - start
    keep_img = math.ceil(keep_ratio * n_img) if n_img else 0
    if keep_img:
        chosen = select_tokens(last_scores[:, start:end].contiguous(), keep_img,
                               protect_first=0) + start
    else:
        chosen = last_scores.new_zeros((b, 0), dtype=torch.int64)
    before = torch.arange(start, device=last_scores.device).expand(b, start)
    after = torch.arange(end, n, device=last_scores.device).expand(b, n - end)
    return torch.cat([before, chosen, after], dim=1)


def compact_kv_cache(cache: Sequence[Tensor], keep: Tensor) -> Tuple[Tensor, ...]:
    """Keep positions ``keep (B, N')`` of cached tensors laid out ``(B, H, N, D)``."""
    out = []
    for t in cache:
        b, h, n, d = t.shape
        out.append(t.gather(2, keep[:, None, :, None].expand(b, h, keep.shape[1], d)))
    return tuple(out)


def fastv_prune(hidden: Tensor, last_scores: Tensor, image_span: Tuple[int, int],
                keep_ratio: float, position_ids: Tensor = None):
    """Drop image tokens from ``hidden (B, N, C)``; returns ``(hidden', position_ids', keep)``."""
    keep = fastv_keep_indices(last_scores, image_span, keep_ratio)
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    return gather_tokens(hidden, keep), position_ids.gather(1, keep), keep


class FastV(torch.nn.Module):
    """Prefill through decoder ``layers`` with FastV pruning after layer ``k``.

    Each layer must offer ``attention_step(x, scores=None)`` (causal attention with its residual)
    and ``mlp_step(x)``, like ``mmkernels.models`` blocks built with a causal attention.
    ``forward(hidden)`` returns ``(hidden_out, keep)``: the pruned sequence after the last layer and
    the kept original positions (use them for rotary positions and :func:`compact_kv_cache`).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], k: int, image_span: Tuple[int, int],
                 keep_ratio: float = 0.5):
        super().__init__()
        if not 0 <= k < len(layers):
            raise ValueError(f"k={k} must index one of the {len(layers)} layers")
        self.layers = torch.nn.ModuleList(layers)
        self.k, self.image_span, self.keep_ratio = k, tuple(image_span), keep_ratio

    def forward(self, hidden: Tensor):
        keep = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        for i, layer in enumerate(self.layers):
            if i == self.k:
                hidden, last = layer.attention_step(hidden, scores="last")
                hidden, keep, _ = fastv_prune(hidden, last, self.image_span, self.keep_ratio)
                hidden = layer.mlp_step(hidden)
            else:
                hidden = layer.mlp_step(layer.attention_step(hidden))
        return hidden, keep
