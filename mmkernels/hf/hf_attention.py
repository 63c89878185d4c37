"""The bridge between transformers' attention interface and :func:`mmkernels.attention`.

Two functions are registered once per process under the name ``"mmkernels"``:

* an **attention function** (``AttentionInterface``): ``(module, query (B, H, Lq, D), key, value,
  attention_mask, scaling, dropout, **kwargs) -> (out (B, Lq, H, Dv), None)``;
* a **mask function** (``AttentionMaskInterface``), so that transformers does not drop the mask
  (an implementation without one receives ``None``): for a plain causal or bidirectional pattern
  it returns the 2-D boolean key-padding mask (or ``None`` without padding), which the attention
  function turns into a per-key ``key_bias`` (``-inf`` on padded keys) and ``causal=True``
  (bottom-right aligned, which is HF's alignment when the cache holds exactly the keys seen).
  Every other pattern (sliding window, chunked, packed sequences, static-cache slots, custom
  ``or``/``and`` masks) is built by transformers' own ``sdpa_mask`` as a 4-D mask, and the
  attention function hands such a call to SDPA and records why.

Registering a new name changes nothing for models that do not select it. Only modules recorded
by :func:`mmkernels.patch` are served by our kernels; any other module that reaches this function
(for instance a second model sharing a patched model's config object) is served by SDPA exactly
as with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .. import attention as mmk_attention
from .._dispatch import NoBackendError

NAME = "mmkernels"

_registered = False
_register_lock = threading.Lock()


@dataclass
class ModuleState:
    """What a patched attention module needs at call time."""

    backend: Optional[str] = None
    served: int = 0
    fallbacks: Dict[str, int] = field(default_factory=dict)
    # Side channel for token reduction (mmkernels.hf.adapters): when ``scores_mode`` is set, the
    # next call served by our kernels stores its (B, Lk) float32 scores in ``last_scores``; with
    # ``keys_wanted`` it stores its keys (B, Hkv, Lk, D) in ``last_keys``; ``key_bias`` (B, Lk) is
    # added to every call's per-key bias (ToMe's proportional attention).
    scores_mode: Optional[str] = None
    last_scores: Optional[Tensor] = None
    key_bias: Optional[Tensor] = None
    keys_wanted: bool = False
    last_keys: Optional[Tensor] = None

    def fell_back(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1


# module -> ModuleState for every attention module that mmkernels.patch recorded.
STATES: "weakref.WeakKeyDictionary[torch.nn.Module, ModuleState]" = weakref.WeakKeyDictionary()


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, mask)
        _registered = True


# ----------------------------------------------------------------------------------------------
# Mask function
# ----------------------------------------------------------------------------------------------


def mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[Tensor] = None,
    **kwargs,
):
    """Key-padding mask ``(B, Lk)`` (bool, True = attend) or ``None`` for the plain patterns;
    transformers' 4-D ``sdpa_mask`` for every other pattern."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    plain = mask_function is mu.bidirectional_mask_function or (
        mask_function is mu.causal_mask_function
        and kv_offset == 0
        and _is_int(q_offset)
        and int(q_offset) == kv_length - q_length
    )
    if plain and (attention_mask is None or attention_mask.shape[-1] >= kv_length):
        if attention_mask is None:
            return None
        padding = attention_mask[:, -kv_length:].to(torch.bool)
        if not torch.compiler.is_compiling() and bool(padding.all()):
            return None
        return padding
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )


def _is_int(value) -> bool:
    return isinstance(value, int) or (
        isinstance(value, Tensor) and value.numel() == 1 and not torch.compiler.is_compiling()
    )


# ----------------------------------------------------------------------------------------------
# Attention function
# ----------------------------------------------------------------------------------------------


def _unsupported(module, query, key, value, attention_mask, dropout, kwargs) -> Optional[str]:
    """Why this call cannot run on mmkernels.attention (None when it can)."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True asks for the full attention maps"
    if dropout and module.training:
        return "attention dropout in training"
    for name in ("softcap", "sliding_window", "s_aux", "position_bias", "head_mask", "sinks"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query/key/value are not (B, H, L, D)"
    if key.shape[0] != query.shape[0]:
        return "query and key batch sizes differ (broadcast queries)"
    if attention_mask is not None:
        if attention_mask.dim() == 4 and attention_mask.shape[2] != 1:
            return "arbitrary 4-D mask"
        if attention_mask.dim() not in (2, 4) or attention_mask.shape[-1] != key.shape[2]:
            return f"mask of shape {tuple(attention_mask.shape)}"
        if attention_mask.dim() == 4 and attention_mask.shape[1] != 1:
            return "per-head mask"
    return None


def _key_bias(attention_mask: Optional[Tensor], query: Tensor) -> Optional[Tensor]:
    """A 2-D bool padding mask or a per-key 4-D ``(B, 1, 1, Lk)`` mask -> ``(B, Lk)`` bias."""
    if attention_mask is None:
        return None
    m = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, 0, :]
    if m.dtype == torch.bool:
        return torch.full(m.shape, float("-inf"), dtype=torch.float32, device=m.device).masked_fill_(m, 0.0)
    return m.to(torch.float32)


def _causal(module, kwargs, q_length: int) -> bool:
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    return bool(is_causal) and q_length > 1


def sdpa_fallback(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA path, given a mask from our mask function (2-D padding masks become
    the 4-D boolean mask SDPA expects)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        lq, lk = query.shape[2], key.shape[2]
        full = attention_mask[:, None, None, :].expand(-1, 1, lq, lk)
        if _causal(module, kwargs, lq):
            rows = torch.arange(lq, device=query.device)[:, None] + (lk - lq)
            full = full & (torch.arange(lk, device=query.device)[None, :] <= rows)
        attention_mask = full
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def attention_forward(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention-interface entry: ``(out (B, Lq, H, Dv), None)``."""
    state = STATES.get(module)
    if state is None:
        return sdpa_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    reason = _unsupported(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is None:
        key_bias = _key_bias(attention_mask, query)
        if state.key_bias is not None:
            key_bias = state.key_bias if key_bias is None else key_bias + state.key_bias
        causal = _causal(module, kwargs, query.shape[2])
        try:
            result = mmk_attention(
                query,
                key,
                value,
                causal=causal,
                scale=scaling,
                key_bias=key_bias,
                scores=state.scores_mode,
                backend=state.backend,
            )
        except NoBackendError as exc:
            reason = f"no mmkernels backend: {str(exc).splitlines()[0]}"
        else:
            state.served += 1
            if state.scores_mode is not None:
                out, state.last_scores = result.out, result.scores
            else:
                out = result
            if state.keys_wanted:
                state.last_keys = key
            return out.transpose(1, 2), None
    state.fell_back(reason)
    return sdpa_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
