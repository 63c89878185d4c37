"""Token-reduction methods built only from the primitives and ``mmkernels.attention``.

Each works on any ViT-like model whose blocks expose ``attention_step(x, *, key_bias=None,
scores=None, return_keys=False)`` and ``mlp_step(x)`` (``mmkernels.models.VisionTransformer`` does),
and whose ``embed(pixels)`` / ``norm`` give the token sequence and the final norm.
"""
from .evit import EViT, evit_fuse
from .fastv import FastV, compact_kv_cache, fastv_keep_indices, fastv_prune
from .prumerge import PruMerge, iqr_keep_counts, prumerge
from .tome import ToMe, tome_block_step, tome_schedule
from .visionzip import VisionZip, visionzip

__all__ = ["VisionZip", "PruMerge", "FastV", "ToMe", "tome_block_step", "tome_schedule", "EViT", "evit_fuse", "visionzip",
           "prumerge", "iqr_keep_counts", "fastv_keep_indices", "fastv_prune",
           "compact_kv_cache"]
