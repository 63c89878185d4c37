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


def fastv_keep_indices(last_scores: Tensor, image_span: Tuple[int, int], keep_ratio: float) -> Tensor:
    """Positions ``(B, N')`` to keep: every non-image token and the best ``keep_ratio`` of the image
    tokens ``[start, end)`` by ``last_scores (B, N)``, ascending."""
    b, n = last_scores.shape
    start, end = image_span
    if not 0 <= start <= end <= n:
        raise ValueError(f"image_span {image_span} is outside a sequence of {n} tokens")
    image = torch.zeros((b, n), dtype=torch.bool, device=last_scores.device)
    image[:, start:end] = True
    return fastv_keep_from_mask(last_scores, image, keep_ratio)


def fastv_keep_from_mask(last_scores: Tensor, image_mask: Tensor, keep_ratio: float) -> Tensor:
    """Positions ``(B, N')`` to keep, ascending: every token where ``image_mask (B, N)`` is False
    and, in each row, the ``ceil(keep_ratio * n_image)`` image tokens with the highest
    ``last_scores (B, N)`` (ties toward the lower position). Image tokens may sit anywhere (several
    images, left padding); every row must hold the same number ``n_image`` of them, so that the
    kept rows have one length."""
    if image_mask.shape != last_scores.shape or image_mask.dtype != torch.bool:
        raise ValueError(
            f"image_mask must be a bool tensor of the scores' shape "
            f"{tuple(last_scores.shape)}, got {image_mask.dtype} "
            f"{tuple(image_mask.shape)}"
        )
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    b, n = last_scores.shape
    counts = image_mask.sum(dim=1)
    n_img = int(counts[0]) if b else 0
    if b and not bool((counts == n_img).all()):
        raise ValueError(f"every row must hold the same number of image tokens, got {counts.tolist()}")
    # Image positions first (ascending), then the others (ascending): a stable sort on ~mask.
    order = torch.sort((~image_mask).to(torch.int8), dim=1, stable=True).indices
    image_pos, other_pos = order[:, :n_img], order[:, n_img:]
    keep_img = math.ceil(keep_ratio * n_img) if n_img else 0
    if keep_img:
        best = select_tokens(last_scores.gather(1, image_pos).contiguous(), keep_img, protect_first=0)
        chosen = image_pos.gather(1, best)
    else:
        chosen = image_pos[:, :0]
    return torch.cat([other_pos, chosen], dim=1).sort(dim=1).values


def compact_kv_cache(cache: Sequence[Tensor], keep: Tensor) -> Tuple[Tensor, ...]:
    """Keep positions ``keep (B, N')`` of cached tensors laid out ``(B, H, N, D)``."""
    out = []
    for t in cache:
        b, h, n, d = t.shape
        out.append(t.gather(2, keep[:, None, :, None].expand(b, h, keep.shape[1], d)))
    return tuple(out)


def fastv_prune(
    hidden: Tensor, last_scores: Tensor, image_span: Tuple[int, int], keep_ratio: float, position_ids: Tensor = None
):
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

    def __init__(self, layers: Sequence[torch.nn.Module], k: int, image_span: Tuple[int, int], keep_ratio: float = 0.5):
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
