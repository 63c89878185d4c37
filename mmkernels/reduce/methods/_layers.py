"""Running a ViT up to the block whose attention drives a reduction."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor, nn


def block_with_scores(block, x: Tensor, scores: str = "cls") -> Tuple[Tensor, Tensor, Tensor]:
    """Run one block (anything with ``attention_step`` / ``mlp_step``: our ViT's blocks, the HF
    layer adapters); return its output tokens with its per-key attention ``scores`` ``(B, N)``
    and its keys averaged over heads ``(B, N, D)``."""
    x, attn_scores, keys = block.attention_step(x, scores=scores, return_keys=True)
    return block.mlp_step(x), attn_scores, keys.mean(dim=1)


def run_through_block(model: nn.Module, x: Tensor, layer: int, scores: str = "cls") -> Tuple[Tensor, Tensor, Tensor]:
    """Run blocks ``0..layer``; return block ``layer``'s output tokens with its per-key attention
    ``scores`` ``(B, N)`` and its keys averaged over heads ``(B, N, D)``."""
    for block in model.blocks[:layer]:
        x = block(x)
    return block_with_scores(model.blocks[layer], x, scores)
