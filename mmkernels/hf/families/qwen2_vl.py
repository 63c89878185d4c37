"""Qwen2-VL's vision tower packs the patches of every image of a batch into one sequence with
``cu_seqlens``; without a FlashAttention implementation transformers splits it into one attention
call per image. Patched, each vision attention runs one varlen :func:`mmkernels.attention` call
over the packed sequence (``cu_seqlens`` / ``max_seqlen`` as the model computes them)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ... import attention as mmk_attention
from .. import hf_attention


def _varlen_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    state = hf_attention.STATES.get(self)
    if state is None or (self.training and self.attention_dropout):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen=max_seqlen, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is not None and not isinstance(max_seqlen, int):
        max_seqlen = int(max_seqlen)
    out = mmk_attention(
        q,
        k,
        v,
        scale=self.scaling,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        backend=state.backend,
    )
    state.served += 1
    return self.proj(out.reshape(seq_length, -1))


def apply(model: nn.Module, settings, record) -> None:
    from ..core import bind_forward

    for name, module in model.named_modules():
        if type(module).__name__ == "VisionAttention" and hasattr(module, "qkv") and module in hf_attention.STATES:
            bind_forward(module, _varlen_forward, record)
            for row in record.report.rows:
                if row.path == name:
                    row.detail = "varlen over the packed images (cu_seqlens)"
