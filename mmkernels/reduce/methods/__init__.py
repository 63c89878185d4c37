"""Token-reduction methods built only from the primitives and ``mmkernels.attention``.

Each works on any ViT-like model whose blocks expose ``attention_step(x, *, key_bias=None,
scores=None, return_keys=False)`` and ``mlp_step(x)`` (``mmkernels.models.VisionTransformer`` does),
and whose ``embed(pixels)`` / ``norm`` give the token sequence and the final norm. The per-block
steps (``tome_block_step``, ``evit_block_step``, ``visionzip_block_step``, ``prumerge_block_step``)
take any such block, so the same code serves Hugging Face layers through
:mod:`mmkernels.hf.adapters` (``mmkernels.patch(model, reduce=...)``).
"""

from ._layers import block_with_scores
from .evit import EViT, evit_block_step, evit_count, evit_fuse, evit_keep
from .fastv import FastV, compact_kv_cache, fastv_keep_from_mask, fastv_keep_indices, fastv_prune
from .prumerge import PruMerge, iqr_keep_counts, prumerge, prumerge_block_step
from .tome import ToMe, tome_block_step, tome_schedule
from .visionzip import VisionZip, visionzip, visionzip_block_step

__all__ = [
    "VisionZip",
    "PruMerge",
    "FastV",
    "ToMe",
    "tome_block_step",
    "tome_schedule",
    "EViT",
    "evit_fuse",
    "visionzip",
    "prumerge",
    "iqr_keep_counts",
    "fastv_keep_indices",
    "fastv_keep_from_mask",
    "fastv_prune",
    "compact_kv_cache",
    "evit_block_step",
    "evit_count",
    "evit_keep",
    "visionzip_block_step",
    "prumerge_block_step",
    "block_with_scores",
]
