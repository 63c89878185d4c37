"""``mmkernels.nn.Attention``: drop-in multi-head self/cross-attention on ``mmkernels.attention``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..attention import attention

# Names other code bases give the output projection; loading a state dict accepts each of them.
_OUT_PROJ_ALIASES = ("out_proj.", "o_proj.", "proj.", "dense.")


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (the HF layout), GQA/MQA, varlen,
    an additive per-key bias, key padding, and optional per-key scores.

    ``forward(x, context=None, ...)``: x ``(B, L, E)`` (or packed ``(T, E)`` with ``cu_seqlens_*``);
    ``context`` gives keys/values for cross-attention (defaults to x). Returns ``out`` with x's
    shape, or ``(out, scores)`` when ``scores`` (``"cls" | "last" | "mean"``) is set on the module
    or passed to forward.

    Load weights from ``nn.MultiheadAttention`` with :meth:`from_torch_mha`, from four Linear layers
    with :meth:`from_linears`, or with ``load_state_dict`` using HF-style names
    (``q_proj/k_proj/v_proj`` and ``o_proj`` or ``out_proj``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        bias: bool = True,
        out_bias: Optional[bool] = None,
        causal: bool = False,
        scale: Optional[float] = None,
        scores: Optional[str] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or embed_dim // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim * num_heads != embed_dim and head_dim == embed_dim // num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads}); pass head_dim explicitly"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim, self.causal, self.scale = head_dim, causal, scale
        self.scores, self.backend = scores, backend
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim or embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim or embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias if out_bias is None else out_bias, **factory)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_linears(
        cls,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        o: nn.Linear,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        **kwargs,
    ) -> "Attention":
        """Build from four existing projections (weights are copied, not shared)."""
        module = cls(
            o.out_features,
            num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=q.out_features // num_heads,
            kdim=k.in_features,
            vdim=v.in_features,
            bias=q.bias is not None,
            out_bias=o.bias is not None,
            device=q.weight.device,
            dtype=q.weight.dtype,
            **kwargs,
        )
        for mine, theirs in ((module.q_proj, q), (module.k_proj, k), (module.v_proj, v), (module.o_proj, o)):
            mine.load_state_dict(theirs.state_dict())
        return module

    @classmethod
    def from_torch_mha(cls, mha: nn.MultiheadAttention, **kwargs) -> "Attention":
        """Build from ``nn.MultiheadAttention`` (either packed ``in_proj_weight`` or separate
        q/k/v weights). Call the result with batch-first ``(B, L, E)`` inputs."""
        e = mha.embed_dim
        kdim, vdim = mha.kdim, mha.vdim
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
        has_bias = mha.in_proj_bias is not None
        module = cls(
            e,
            mha.num_heads,
            kdim=kdim,
            vdim=vdim,
            bias=has_bias,
            out_bias=mha.out_proj.bias is not None,
            device=mha.out_proj.weight.device,
            dtype=mha.out_proj.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w, i in ((module.q_proj, wq, 0), (module.k_proj, wk, 1), (module.v_proj, wv, 2)):
                proj.weight.copy_(w)
                if has_bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
            module.o_proj.load_state_dict(mha.out_proj.state_dict())
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for alias in _OUT_PROJ_ALIASES:
            for suffix in ("weight", "bias"):
                old, new = f"{prefix}{alias}{suffix}", f"{prefix}o_proj.{suffix}"
                if old in state_dict and new not in state_dict:
                    state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        context: Optional[Tensor] = None,
        *,
        key_bias: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        cu_seqlens_q: Optional[Tensor] = None,
        cu_seqlens_k: Optional[Tensor] = None,
        max_seqlen_q: Optional[int] = None,
        max_seqlen_k: Optional[int] = None,
        scores: Optional[str] = None,
        return_keys: bool = False,
    ):
        """``key_padding_mask``: bool ``(B, Lk)`` (or ``(Tk,)`` packed), True marks a padded key
        (nn.MultiheadAttention's convention); it is turned into a ``-inf`` key bias.

        ``return_keys=True`` also returns the projected keys, ``(B, Hkv, Lk, D)`` (packed
        ``(Tk, Hkv, D)``): token merging (ToMe) uses them as its similarity metric. The return value
        is then ``(out, scores_or_None, keys)``."""
        context = x if context is None else context
        scores = scores or self.scores
        varlen = cu_seqlens_q is not None
        if varlen and cu_seqlens_k is None and context is x:
            cu_seqlens_k, max_seqlen_k = cu_seqlens_q, max_seqlen_q
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(context).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(context).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if not varlen:  # (B, L, H, D) -> (B, H, L, D) views, no copy
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
            pad = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=x.device)
            pad.masked_fill_(key_padding_mask, float("-inf"))
            key_bias = pad if key_bias is None else key_bias + (pad[:, None] if key_bias.dim() == 3 else pad)
        kwargs = {}
        if varlen:
            kwargs = dict(
                cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k,
            )
        res = attention(
            q,
            k,
            v,
            causal=self.causal,
            scale=self.scale,
            key_bias=key_bias,
            scores=scores,
            backend=self.backend,
            **kwargs,
        )
        out = res.out if scores else res
        out = out.flatten(-2) if varlen else out.transpose(1, 2).flatten(-2)
        out = self.o_proj(out)
        if return_keys:
            return out, (res.scores if scores else None), k
        return (out, res.scores) if scores else out

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, causal={self.causal}"
            + (f", scores={self.scores!r}" if self.scores else "")
        )
