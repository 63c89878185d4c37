"""The token-reduction block interface over Hugging Face vision-encoder layers.

The reduction methods in :mod:`mmkernels.reduce.methods` work on any block that offers
``attention_step(x, *, key_bias=None, scores=None, return_keys=False)`` and ``mlp_step(x)``
(:class:`mmkernels.models.vit.Block` does). An adapter gives one HF layer that interface by calling
the layer's **own** submodules in the layer's own order (norms, attention module, layer scale,
drop path / dropout, MLP), so ``adapter.mlp_step(adapter.attention_step(x))`` equals
``layer(x)`` bit for bit. Per-key scores, keys and ``key_bias`` travel through the patched
attention module's :class:`~mmkernels.hf.hf_attention.ModuleState` side channel: they come from
:func:`mmkernels.attention` (the call mmkernels.patch routes), never from eager attention maps.

Families (transformers 5.x layouts, checked against 5.17 and 5.25; found by the layer's exact type,
the CLIP/SigLIP ones only in vision towers). Where releases differ the adapter follows the module
tree, not names: DINOv2's attention is ``attention.attention`` (+ ``attention.output``) up to 5.17
and one ``attention`` module (``q_proj`` ...) from 5.18; the adapter calls ``layer.attention`` as
the layer does and finds the module that calls the attention interface inside it.

============  =====================  ==========================================  ========  =======
family        layer class            attention branch / MLP branch               prefix    scores
============  =====================  ==========================================  ========  =======
vit           ViTLayer               layernorm_before, attention, dropout /      1 (CLS)   "cls"
                                     layernorm_after, mlp, dropout
dinov2        Dinov2Layer            norm1, attention, layer_scale1, drop_path /  1 (CLS)   "cls"
                                     norm2, mlp, layer_scale2, drop_path
clip          CLIPEncoderLayer       layer_norm1, self_attn / layer_norm2, mlp   1 (CLS)   "cls"
siglip        SiglipEncoderLayer     layer_norm1, self_attn / layer_norm2, mlp   0         "mean"
============  =====================  ==========================================  ========  =======

``prefix_tokens`` is the number of non-patch tokens in front (the CLS token); ``rank_scores`` is
the scores mode that ranks tokens for EViT / VisionZip / PruMerge: the attention each key
receives from CLS, or, for SigLIP (no CLS token), the mean attention it receives from every query.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple, Type

from torch import Tensor, nn

from . import hf_attention


class SideChannelError(RuntimeError):
    """The attention call that should give scores / keys / key_bias was not served by mmkernels."""


class LayerAdapter:
    """Block interface (``attention_step`` / ``mlp_step``) over one HF layer; subclasses name the
    layer's submodules. The adapter holds no weights: it reads the layer's submodules at every
    call, so replaced (e.g. quantized) submodules are used as the layer itself would."""

    family: str = ""
    prefix_tokens: int = 1
    rank_scores: str = "cls"

    def __init__(self, layer: nn.Module):
        self.layer = layer

    # -- per family ------------------------------------------------------------------------------
    @property
    def attention_block(self) -> nn.Module:
        """The layer's attention submodule, called as the layer calls it (it may wrap the module
        that calls transformers' attention interface, e.g. DINOv2 up to 5.17:
        ``attention.attention`` + ``attention.output``)."""
        raise NotImplementedError

    @property
    def attention(self) -> nn.Module:
        """The module mmkernels.patch records: the first module in :attr:`attention_block`
        (itself included) whose forward calls transformers' attention interface."""
        from .core import routes_through_interface

        block = self.attention_block
        return next((m for m in block.modules() if routes_through_interface(m)), block)

    def _attention_branch(self, x: Tensor) -> Tensor:
        """``x`` plus the attention branch, exactly as the layer's forward computes it."""
        raise NotImplementedError

    def mlp_step(self, x: Tensor) -> Tensor:
        """``x`` plus the MLP branch, exactly as the layer's forward computes it."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def _attend(self, h: Tensor) -> Tensor:
        out = self.attention_block(h)
        return out[0] if isinstance(out, tuple) else out

    def attention_step(
        self, x: Tensor, *, key_bias: Optional[Tensor] = None, scores: Optional[str] = None, return_keys: bool = False
    ):
        """Attention with its residual, through the layer's own attention module.

        Returns ``x``; ``(x, scores)`` when ``scores`` (``"cls" | "last" | "mean"``) is given;
        ``(x, scores_or_None, keys)`` with ``return_keys=True`` (keys ``(B, H, N, D)``): the
        convention of :meth:`mmkernels.models.vit.Block.attention_step`. ``key_bias (B, N)`` is
        added to every key's logit (ToMe's ``log(size)``).

        Raises :class:`SideChannelError` (a ``RuntimeError``) when scores, keys or a key bias are
        asked and the attention module is not patched by :func:`mmkernels.patch`, or when the call
        went to SDPA instead of mmkernels (the reason is named).
        """
        if key_bias is None and scores is None and not return_keys:
            return self._attention_branch(x)
        module = self.attention
        state = hf_attention.STATES.get(module)
        if state is None:
            raise SideChannelError(
                f"{type(module).__name__} is not patched by mmkernels.patch: token reduction reads "
                "per-key scores and keys from mmkernels' fused attention (patch with "
                "attention=True)"
            )
        served, fallbacks = state.served, dict(state.fallbacks)
        state.scores_mode, state.keys_wanted, state.key_bias = scores, return_keys, key_bias
        state.last_scores = state.last_keys = None
        try:
            out = self._attention_branch(x)
            got_scores, keys = state.last_scores, state.last_keys
        finally:
            state.scores_mode, state.keys_wanted, state.key_bias = None, False, None
            state.last_scores = state.last_keys = None
        if state.served == served:
            why = [r for r, n in state.fallbacks.items() if n > fallbacks.get(r, 0)]
            raise SideChannelError(
                f"{type(module).__name__} was served by SDPA instead of mmkernels "
                f"({'; '.join(why) or 'unknown reason'}): token reduction needs the scores, keys "
                "and key bias of mmkernels' fused attention"
            )
        if return_keys:
            return out, (got_scores if scores else None), keys
        if scores:
            return out, got_scores
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """The whole layer (no mask): ``mlp_step(attention_step(x))``."""
        return self.mlp_step(self.attention_step(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.layer).__name__})"


class ViTLayerAdapter(LayerAdapter):
    """``ViTLayer``: pre-norm, hidden dropout on both branches, no layer scale."""

    family = "vit"

    @property
    def attention_block(self) -> nn.Module:
        return self.layer.attention

    def _attention_branch(self, x: Tensor) -> Tensor:
        layer = self.layer
        h = self._attend(layer.layernorm_before(x))
        return layer.dropout(h) + x

    def mlp_step(self, x: Tensor) -> Tensor:
        layer = self.layer
        h = layer.mlp(layer.layernorm_after(x))
        return layer.dropout(h) + x


class Dinov2LayerAdapter(LayerAdapter):
    """``Dinov2Layer``: pre-norm, layer scale and drop path on both branches (MLP or SwiGLU)."""

    family = "dinov2"

    @property
    def attention_block(self) -> nn.Module:
        return self.layer.attention

    def _attention_branch(self, x: Tensor) -> Tensor:
        layer = self.layer
        h = layer.layer_scale1(self._attend(layer.norm1(x)))
        return layer.drop_path(h) + x

    def mlp_step(self, x: Tensor) -> Tensor:
        layer = self.layer
        h = layer.layer_scale2(layer.mlp(layer.norm2(x)))
        return layer.drop_path(h) + x


class ClipLayerAdapter(LayerAdapter):
    """``CLIPEncoderLayer`` of a vision tower: pre-norm, plain residuals."""

    family = "clip"

    @property
    def attention_block(self) -> nn.Module:
        return self.layer.self_attn

    def _attention_branch(self, x: Tensor) -> Tensor:
        return x + self._attend(self.layer.layer_norm1(x))

    def mlp_step(self, x: Tensor) -> Tensor:
        return x + self.layer.mlp(self.layer.layer_norm2(x))


class SiglipLayerAdapter(ClipLayerAdapter):
    """``SiglipEncoderLayer`` of a vision tower: CLIP's layout; SigLIP has no CLS token, so tokens
    are ranked by the mean attention they receive."""

    family = "siglip"
    prefix_tokens = 0
    rank_scores = "mean"


# (transformers module, layer class name, adapter, config model_types that mark a vision tower;
# None: every instance of the class is a vision layer).
_FAMILIES: List[Tuple[str, str, Type[LayerAdapter], Optional[Tuple[str, ...]]]] = [
    ("transformers.models.vit.modeling_vit", "ViTLayer", ViTLayerAdapter, None),
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Layer", Dinov2LayerAdapter, None),
    ("transformers.models.clip.modeling_clip", "CLIPEncoderLayer", ClipLayerAdapter, ("clip_vision_model",)),
    ("transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer", SiglipLayerAdapter, ("siglip_vision_model",)),
]
SUPPORTED_LAYERS = ", ".join(name + (" (vision tower)" if types else "") for _, name, _, types in _FAMILIES)
_CLASSES: Optional[Dict[type, Tuple[Type[LayerAdapter], Optional[Tuple[str, ...]]]]] = None


def _classes() -> Dict[type, Tuple[Type[LayerAdapter], Optional[Tuple[str, ...]]]]:
    global _CLASSES
    if _CLASSES is None:
        found = {}
        for module_name, class_name, adapter, types in _FAMILIES:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue  # a transformers without this family
            found[cls] = (adapter, types)
        _CLASSES = found
    return _CLASSES


def adapter_for(layer: nn.Module) -> Optional[LayerAdapter]:
    """The adapter for one HF vision-encoder layer, or ``None`` when ``layer`` is not one of the
    supported families (matched by exact type: a subclass may change the layout; CLIP/SigLIP
    layers only when their attention's config is a vision config)."""
    entry = _classes().get(type(layer))
    if entry is None:
        return None
    adapter, types = entry
    if types is not None:
        attention = adapter(layer).attention
        model_type = getattr(getattr(attention, "config", None), "model_type", None)
        if model_type not in types:
            return None
    return adapter(layer)
