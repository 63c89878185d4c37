"""ToMe — Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023).

In every block: attention with *proportional attention* (each key's logit is biased by the log of
the number of patches it stands for, ``key_bias = log(size)``), then bipartite soft matching on the
keys averaged over heads merges ``r`` tokens (size-weighted average), then the MLP.

Where ours differs from the paper's code, and why:
* merged tokens keep their original relative order (a group sits at its B token's place) instead
  of being moved to the end — position-aware heads and VLM projectors rely on the order;
* proportional attention is a per-key bias inside the fused attention kernel, not a dense
  ``(N, N)`` additive mask, so it keeps flash speed;
* ties in matching break toward the lower token index (deterministic across backends).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..api import mergeable_a_tokens, tome_merge, tome_plan


def tome_schedule(r: Union[int, Sequence[int]], depth: int, num_tokens: int, protect_first: int = 1) -> List[int]:
    """Per-layer merge counts: an int means the same ``r`` in every layer (clipped, as ToMe does,
    to what can still merge); a sequence gives one value per layer."""
    if isinstance(r, int):
        schedule = [r] * depth
    else:
        schedule = list(r)
        if len(schedule) != depth:
            raise ValueError(f"r schedule has {len(schedule)} entries, the model has {depth} blocks")
    clipped, n = [], num_tokens
    for value in schedule:
        value = min(int(value), mergeable_a_tokens(n, protect_first))
        clipped.append(value)
        n -= value
    return clipped


def tome_block_step(block: nn.Module, x: Tensor, size: Optional[Tensor], r: int, protect_first: int = 1):
    """One ToMe block: proportional attention, merge ``r`` tokens, MLP -> ``(x, size)``."""
    key_bias = None if size is None else size.log()
    x, _, keys = block.attention_step(x, key_bias=key_bias, return_keys=True)
    if r > 0:
        metric = keys.mean(dim=1)  # (B, Hkv, N, D) -> (B, N, D): keys averaged over heads
        plan = tome_plan(metric, r, protect_first=protect_first)
        x, size = tome_merge(x, plan, size)
    return block.mlp_step(x), size


class ToMe(nn.Module):
    """Wrap a ViT so that every block merges tokens. ``forward(pixels)`` returns the final
    normalised tokens ``(B, N', C)`` and their sizes ``(B, N')``."""

    def __init__(self, model: nn.Module, r: Union[int, Sequence[int]], protect_first: int = 1):
        super().__init__()
        self.model, self.r, self.protect_first = model, r, protect_first

    def forward_tokens(self, x: Tensor):
        schedule = tome_schedule(self.r, len(self.model.blocks), x.shape[1], self.protect_first)
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        for block, r in zip(self.model.blocks, schedule):
            x, size = tome_block_step(block, x, size, r, self.protect_first)
        return self.model.norm(x), size

    def forward(self, pixels: Tensor):
        return self.forward_tokens(self.model.embed(pixels))
