"""VisionZip — Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models" (CVPR 2025).

From one vision-encoder layer: keep the ``dominant`` tokens that receive the most attention from CLS
(``scores="cls"``), then compress the remaining tokens into ``contextual`` tokens: targets are
spread uniformly over the remaining tokens, every other remaining token joins the target whose key
is most similar (dot product of keys averaged over heads), and each group is averaged.

Where ours differs, and why:
* protected tokens (CLS) are kept in front of the dominant tokens rather than dropped — a LLaVA
  projector that expects patch tokens only can slice them off;
* dominant tokens keep their original order (VisionZip's code sorts by score): positional
  projectors and readers of the token grid need the order;
* ties break toward the lower index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layers import block_with_scores, run_through_block
from ..api import gather_tokens, merge_tokens, select_tokens


def visionzip(
    x: Tensor, keys: Tensor, cls_scores: Tensor, dominant: int, contextual: int, protect_first: int = 1
) -> Tensor:
    """``x (B, N, C)``, ``keys (B, N, Ck)`` (keys averaged over heads), ``cls_scores (B, N)``
    -> ``(B, protect_first + dominant + contextual, C)``."""
    b, n, _ = x.shape
    keep = protect_first + dominant
    rest_count = n - keep
    if dominant < 0 or contextual < 0:
        raise ValueError(f"dominant and contextual must be >= 0, got {dominant}, {contextual}")
    if rest_count < contextual:
        raise ValueError(
            f"{n} tokens cannot give {protect_first} protected + {dominant} dominant + {contextual} contextual"
        )
    idx = select_tokens(cls_scores, keep, protect_first=protect_first)
    kept = gather_tokens(x, idx)
    if contextual == 0 or rest_count == 0:
        return kept
    is_rest = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, idx, False)
    rest_idx = torch.arange(n, device=x.device).expand(b, n)[is_rest].reshape(b, rest_count)
    rest_x, rest_k = gather_tokens(x, rest_idx), gather_tokens(keys, rest_idx)
    # Uniformly spread targets among the remaining tokens (VisionZip's uniform sampling).
    target_pos = (torch.arange(contextual, device=x.device) * rest_count) // contextual
    target_k = rest_k[:, target_pos]  # (B, ctx, Ck)
    sim = rest_k.float() @ target_k.float().transpose(1, 2)  # (B, rest, ctx)
    assign = sim.argmax(dim=-1)
    assign[:, target_pos] = torch.arange(contextual, device=x.device)  # targets own their slot
    context, _ = merge_tokens(rest_x, assign, contextual)
    return torch.cat([kept, context], dim=1)


def visionzip_block_step(
    block, x: Tensor, dominant: int, contextual: int, protect_first: int = 1, scores: str = "cls"
) -> Tensor:
    """Run one block (anything with ``attention_step`` / ``mlp_step``) and reduce its output by
    :func:`visionzip` with the block's own per-key ``scores`` (``"cls"``; a model without a CLS
    token can use ``"mean"``) and keys averaged over heads."""
    x, s, keys = block_with_scores(block, x, scores)
    return visionzip(x, keys, s, dominant, contextual, protect_first)


class VisionZip(torch.nn.Module):
    """Run a ViT up to block ``layer`` (LLaVA reads the penultimate block, ``-2``) and return that
    block's tokens reduced to ``protect_first + dominant + contextual`` by :func:`visionzip`, using
    the block's own CLS attention and keys (averaged over heads)."""

    def __init__(
        self, model: torch.nn.Module, dominant: int = 54, contextual: int = 10, layer: int = -2, protect_first: int = 1
    ):
        super().__init__()
        self.model, self.dominant, self.contextual = model, dominant, contextual
        self.layer = layer % len(model.blocks)
        self.protect_first = protect_first

    def forward_tokens(self, x: Tensor) -> Tensor:
        x, scores, keys = run_through_block(self.model, x, self.layer)
        return visionzip(x, keys, scores, self.dominant, self.contextual, self.protect_first)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.forward_tokens(self.model.embed(pixels))
