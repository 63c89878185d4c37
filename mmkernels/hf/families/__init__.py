"""Per-family additions to the generic patch (keyed by ``config.model_type`` of any submodel).

Most families need nothing beyond the attention interface: ViT, DINOv2, CLIP, SigLIP, BERT,
Whisper, Llama, Qwen2 and LLaVA route every attention through it. A family file exists only where
the interface alone would lose something (Qwen2-VL's vision tower: packed images as varlen).
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from . import qwen2_vl

# model_type -> apply(model, settings, record)
FAMILIES: Dict[str, Callable] = {
    "qwen2_vl": qwen2_vl.apply,
    "qwen2_vl_vision": qwen2_vl.apply,
}


def apply_family(model: nn.Module, settings, record) -> None:
    seen = set()
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        apply = FAMILIES.get(model_type)
        if apply is not None and id(module) not in seen and apply not in seen:
            seen.add(apply)
            apply(model, settings, record)
