"""Token-reduction benchmark cases (same structure as attention.py).

* ``tome_step``: ``tome_plan`` + ``tome_merge`` against the reference (ToMe's algorithm in plain
  PyTorch), on ViT-B/16 tokens (N=197, C=768), LLaVA's 576 visual tokens (C=1024) and DINOv2-S
  (N=257, C=384); the metric is the keys averaged over heads (64 channels), r=16.
* ``tome_plan_wide``: ``tome_plan`` alone on a wide metric (LLaVA's 577 visual tokens, the 1024-wide
  embeddings themselves: AIM-style merging before the language model) against the reference,
  whose similarities are one BLAS GEMM.
* ``select``: ``select_tokens`` + ``gather_tokens`` against ``torch.topk`` + sort + gather.
* ``vit_b_block_tome``: one ViT-B block with ToMe (r=16, proportional attention through
  ``key_bias``) against the same block without merging.
* ``vit_b_stack_evit``: a 12-block ViT-B stack with EViT (keep 50% at blocks 3, 6, 9) against the
  unpruned stack.
"""

from __future__ import annotations

from typing import List, Optional

import torch

import mmkernels
from mmkernels.reduce import reference
from mmkernels.reduce.methods import EViT, tome_block_step

from .case import Case

TOKEN_SHAPES = [("vit_b16", 197, 768), ("llava_576", 577, 1024), ("dinov2_s14", 257, 384)]


def tome_step_case(name, n, c, batch, r=16, metric_dim=64) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, c, generator=g)
    metric = torch.randn(batch, n, metric_dim, generator=g)
    size = torch.ones(batch, n)

    def ours():
        plan = mmkernels.tome_plan(metric, r)
        return mmkernels.tome_merge(x, plan, size)

    def ref():
        src_to_out, keep_idx, _, _ = reference.tome_plan(metric, r, 1)
        return reference.tome_merge(x, src_to_out, keep_idx.shape[1], size)

    def error():
        return (ours()[0] - ref()[0]).abs().max().item()

    return Case(
        f"tome_step-{name}-b{batch}",
        f"tome_plan+tome_merge N={n} C={c} r={r} B={batch}",
        {"mmkernels": ours, "reference": ref},
        error,
    )


def tome_plan_wide_case(n: int, width: int, batch: int, r: int = 16) -> Case:
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(batch, n, width, generator=g)

    def ours():
        return mmkernels.tome_plan(metric, r)

    def ref():
        return reference.tome_plan(metric, r, 1)

    def error():  # index plans: the number of tokens routed differently (0 when they agree)
        return float((ours()[0] != ref()[0]).sum())

    return Case(
        f"tome_plan_wide-n{n}-c{width}-b{batch}",
        f"tome_plan N={n} metric width {width} r={r} B={batch}",
        {"mmkernels": ours, "reference": ref},
        error,
    )


def select_case(name, n, c, batch, keep_ratio=0.5) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, c, generator=g)
    scores = torch.rand(batch, n, generator=g)
    k = 1 + int(keep_ratio * (n - 1))

    def ours():
        return mmkernels.gather_tokens(x, mmkernels.select_tokens(scores, k))

    def torch_way():
        top = torch.topk(scores[:, 1:], k - 1, dim=1).indices + 1
        idx = torch.cat([torch.zeros(batch, 1, dtype=torch.long), top], 1).sort(1).values
        return x.gather(1, idx[..., None].expand(-1, -1, c))

    def error():
        return (ours() - torch_way()).abs().max().item()

    return Case(
        f"select-{name}-b{batch}",
        f"select_tokens+gather_tokens N={n} C={c} k={k} B={batch}",
        {"mmkernels": ours, "topk_sort_gather": torch_way},
        error,
    )


def _vit(depth, dim=768, heads=12):
    from mmkernels.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads).eval()


def block_tome_case(batch, r=16) -> Case:
    block = _vit(1).blocks[0]
    x = torch.randn(batch, 197, 768)
    size = torch.ones(batch, 197)

    @torch.no_grad()
    def ours():
        return tome_block_step(block, x, size, r)

    @torch.no_grad()
    def plain():
        return block(x)

    # Merging inside one block only shortens its MLP (~4-5% less time), while single rounds on
    # this shared VM scatter by +-15% (measured: paired ratios 0.85-1.31 over 40 rounds at batch
    # 32): take up to 100 rounds so that the median's own spread (~1.5%) is below the effect.
    return Case(
        f"vit_b_block_tome-b{batch}",
        f"ViT-B block + ToMe r={r} vs plain block, B={batch}",
        {"mmkernels": ours, "block_without_merging": plain},
        budget_s=150.0 if batch > 8 else 20.0,
        max_rounds=100 if batch > 8 else 400,
    )


def stack_evit_case(batch) -> Case:
    model = _vit(12)
    evit = EViT(model, keep_rate=0.5, prune_at=(3, 6, 9))
    x = torch.randn(batch, 197, 768)

    @torch.no_grad()
    def ours():
        return evit.forward_tokens(x)

    @torch.no_grad()
    def plain():
        h = x
        for blk in model.blocks:
            h = blk(h)
        return model.norm(h)

    return Case(
        f"vit_b_stack_evit-b{batch}",
        f"12-block ViT-B, EViT keep 50% at 3/6/9, B={batch}",
        {"mmkernels": ours, "unpruned_stack": plain},
    )


def all_cases(quick: bool = False, only: Optional[str] = None) -> List[Case]:
    cases: List[Case] = []
    shapes = TOKEN_SHAPES[:1] if quick else TOKEN_SHAPES
    for name, n, c in shapes:
        for batch in (1,) if quick else (1, 32):
            cases.append(tome_step_case(name, n, c, batch))
        cases.append(select_case(name, n, c, 1))
    if not quick:
        cases.append(tome_plan_wide_case(577, 1024, 1))
    try:
        import mmkernels.models  # noqa: F401

        has_models = True
    except ImportError:
        has_models = False
    if has_models and not quick:
        cases += [block_tome_case(1), block_tome_case(32), stack_evit_case(8)]
    if only:
        cases = [c for c in cases if only in c.id]
    return cases
