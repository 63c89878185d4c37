"""The specification of the token-reduction primitives, in plain PyTorch.

Token merging (ToMe, Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), bipartite soft
matching, as this library defines it:

* the metric ``(B, N, C)`` is L2-normalised per token, so dot products are cosine similarities
  (computed in float32, float64 for float64 metrics);
* set A = tokens at even positions, set B = tokens at odd positions; the first ``protect_first``
  tokens (CLS, register or distillation tokens) are in neither set: never merged, never a target;
* every A token finds its most similar B token (ties: the lowest B position);
* a NaN similarity counts as ``-inf`` (a metric row holding a NaN or ``±inf`` normalises to NaN):
  such a token is nobody's best match while a finite similarity exists, and an A token whose
  similarities are all NaN matches the first B token with score ``-inf``, so it merges last
  (docs/nan_semantics.md);
* the ``r`` A tokens with the highest similarity (ties: the lowest A position) merge into their match.

A *plan* describes the merge by index tensors (nothing else), so that it can be applied to any
tensor of the same token layout (features, sizes, positions) and undone:

* ``src_to_out (B, N)``: the output slot of every input token — a surviving token's own slot, a
  merged A token's destination slot. Output slots follow the original order of the survivors
  (unlike ToMe's reference code, which moves merged tokens to the end): position-aware heads and
  VLMs need that.
* ``keep_idx (B, N - r)``: input position of each output slot (ascending).
* ``src_idx (B, r)``, ``dst_idx (B, r)``: the merged A positions (ascending) and their B targets.

Selection for pruning (EViT, VisionZip, FastV): the ``k`` highest-scoring tokens per row, returned
in ascending (original) order, always including the first ``protect_first``; ties break toward the
lower index.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _stable_topk_desc(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest values along the last dim; ties go to the lower index."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def tome_plan(metric: Tensor, r: int, protect_first: int = 1):
    """Return ``(src_to_out, keep_idx, src_idx, dst_idx)`` int64 tensors; see the module docstring."""
    b, n, _ = metric.shape
    # Similarities in float32 (float64 for float64 metrics): 16-bit rounding would create ties.
    metric = metric.to(torch.float64 if metric.dtype == torch.float64 else torch.float32)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    positions = torch.arange(n, device=metric.device)
    a_pos = positions[protect_first:][(positions[protect_first:] % 2) == 0]
    b_pos = positions[protect_first:][(positions[protect_first:] % 2) == 1]
    if r == 0 or len(b_pos) == 0:
        src_idx = positions.new_zeros(b, 0)
        dst_idx = positions.new_zeros(b, 0)
    else:
        sim = metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)  # (B, |A|, |B|)
        sim = sim.masked_fill(sim.isnan(), float("-inf"))  # NaN: never a best match
        best_sim, best_b = sim.max(dim=-1)  # first max on ties
        chosen = _stable_topk_desc(best_sim, r)  # (B, r) into A
        chosen = chosen.sort(dim=-1).values  # ascending positions
        src_idx = a_pos[chosen]
        dst_idx = b_pos[best_b.gather(1, chosen)]
    merged = torch.zeros(b, n, dtype=torch.bool, device=metric.device)
    merged.scatter_(1, src_idx, True)
    slot = torch.cumsum(~merged, dim=1) - 1  # slot of survivors
    src_to_out = slot.clone()
    src_to_out.scatter_(1, src_idx, slot.gather(1, dst_idx))
    keep_idx = positions.expand(b, n)[~merged].reshape(b, n - src_idx.shape[1])
    return src_to_out, keep_idx, src_idx, dst_idx


def tome_merge(x: Tensor, src_to_out: Tensor, n_out: int, size: Tensor):
    """Size-weighted average of every group of tokens sharing an output slot.

    ``x (B, N, C)``, ``size (B, N)`` -> ``x_out (B, n_out, C)``, ``size_out (B, n_out)``.
    Sum(size * x) and Sum(size) over each row are conserved.
    """
    b, n, c = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = size.to(compute)
    weighted = x.to(compute) * w[..., None]
    total = torch.zeros(b, n_out, c, dtype=compute, device=x.device)
    total.scatter_add_(1, src_to_out[..., None].expand(b, n, c), weighted)
    size_out = torch.zeros(b, n_out, dtype=compute, device=x.device).scatter_add_(1, src_to_out, w)
    return (total / size_out[..., None]).to(x.dtype), size_out.to(size.dtype)


def tome_unmerge(x_out: Tensor, src_to_out: Tensor):
    """Copy every merged value back to each of its source positions: ``(B, n_out, C) -> (B, N, C)``."""
    b, n = src_to_out.shape
    return x_out.gather(1, src_to_out[..., None].expand(b, n, x_out.shape[-1]))


def select_tokens(scores: Tensor, k: int, protect_first: int = 1) -> Tensor:
    """Indices ``(B, k)`` of the k best tokens, ascending, always including the first protect_first."""
    b, n = scores.shape
    rest = _stable_topk_desc(scores[:, protect_first:], k - protect_first) + protect_first
    head = torch.arange(protect_first, device=scores.device).expand(b, protect_first)
    return torch.cat([head, rest], dim=1).sort(dim=1).values


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x (B, N, C)``, ``idx (B, k)`` -> ``(B, k, C)``."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))
