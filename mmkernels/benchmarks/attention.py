"""Attention benchmark cases: the shapes of real vision towers, VLM prefill and LLM decoding, each
with its peers.

A case builds its inputs once and returns the contenders as zero-argument callables, plus a
function that measures our max error against the float64 oracle. Both the CLI
(``mmkernels bench``) and the pytest-benchmark files under bench/ use these definitions.

``mmkernels`` is our C++ CPU kernel, asked for by name (the gates measure it). Where automatic
selection serves the plain call with another backend on this machine (the ``torch`` backend on an
AMX CPU, see :mod:`mmkernels._dispatch`), the plain case adds ``mmkernels_auto``: what a user
calling ``mmkernels.attention`` without ``backend=`` gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

import mmkernels

from .. import _dispatch
from ..attention.api import describe_call
from .case import Case


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    length: int
    head_dim: int
    causal: bool = False
    # decoding: K / V as (B, L, H, D) views (projections of an encoder's output, as cross-attention
    # caches hold them) instead of the self-attention cache's contiguous (B, H, L, D)
    kv_from_projection: bool = False


SHAPES = [
    Shape("vit_b16", 8, 12, 12, 197, 64),
    Shape("dinov2_s14", 8, 6, 6, 257, 64),
    Shape("vit_l14_336", 4, 16, 16, 577, 64),
    Shape("siglip_so400m", 4, 16, 16, 729, 72),
    Shape("llava_prefill", 1, 32, 8, 2048, 128, causal=True),
]
# Mixed image sizes packed together (224/14 -> 257, 336/14 -> 577, 224/16 -> 197, a thumbnail 50).
VARLEN_LENGTHS = [257, 577, 197, 50, 257]
QUICK_SHAPES = [Shape("vit_b16", 1, 2, 2, 197, 64), Shape("dinov2_s14", 1, 2, 2, 257, 64)]


def _expand_kv(t, group):
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _sdpa(q, k, v, group, **kw):
    # SDPA on CPU has no GQA fast path in every version: expand kv heads outside the timing.
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _kernel_backend() -> Optional[str]:
    """Our C++ CPU kernel when it is built (None: automatic selection)."""
    cpu = next((b for b in _dispatch.backends_for("attention") if b.name == "cpu"), None)
    return "cpu" if cpu is not None and cpu.availability()[0] else None


def _auto_backend(q, k, v, causal) -> str:
    call = describe_call(q, k, v, causal, None, False, None, False)
    return _dispatch.select("attention", call, q.device.type).name


def _with_auto(contenders, desc, q, k, v, causal, kernel) -> str:
    """Adds ``mmkernels_auto`` (what a call without ``backend=`` gets) where automatic selection
    serves the plain call with another backend than ``kernel``; returns the description, saying so."""
    auto = _auto_backend(q, k, v, causal)
    if kernel is None or auto == kernel:
        return desc
    contenders["mmkernels_auto"] = lambda: mmkernels.attention(q, k, v, causal=causal)
    return desc + f" (automatic selection: {auto})"


def _max_err(got, q, k, v, **kw):
    want = mmkernels.reference_attention(q.double(), k.double(), v.double(), **kw)[0]
    return (got.double() - want).abs().max().item()


def dense_cases(shape: Shape, dtype: torch.dtype, extras: bool) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, L, d = shape.batch, shape.heads_q, shape.heads_kv, shape.length, shape.head_dim
    # (B, L, H, D) storage viewed as (B, H, L, D), as projections produce it.
    q = torch.randn(b, L, hq, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, L, hkv, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(b, L, hkv, d, generator=g).to(dtype).transpose(1, 2)
    group = hq // hkv
    k_full, v_full = _expand_kv(k, group), _expand_kv(v, group)
    flops = 4.0 * b * hq * L * L * d * (0.5 if shape.causal else 1.0)
    dt = str(dtype).replace("torch.", "")
    base = f"{shape.name}-{dt}"
    desc = f"B={b} Hq={hq} Hkv={hkv} L={L} D={d}{' causal' if shape.causal else ''} {dt}"
    causal = shape.causal

    kernel = _kernel_backend()

    def ours(**kw):
        return lambda: mmkernels.attention(q, k, v, causal=causal, backend=kernel, **kw)

    def err(**kw):
        def measure():
            res = mmkernels.attention(q, k, v, causal=causal, backend=kernel, **kw)
            out = res if isinstance(res, torch.Tensor) else res.out
            return _max_err(out, q, k, v, causal=causal, **{x: y for x, y in kw.items() if x == "key_bias"})

        return measure

    plain = {"mmkernels": ours(), "sdpa": lambda: _sdpa(q, k_full, v_full, group, is_causal=causal)}
    cases = [Case(base, _with_auto(plain, desc, q, k, v, causal, kernel), plain, err(), flops)]
    if not extras:
        return cases

    def eager_scores(mode):
        def run():
            out = _sdpa(q, k_full, v_full, group, is_causal=causal)
            # As HF "eager" attention does: logits in the input dtype, softmax in float32.
            logits = (q @ k_full.transpose(-1, -2)) * (1.0 / math.sqrt(d))
            p = torch.softmax(logits, dim=-1, dtype=torch.float32)
            rows = {"cls": p[:, :, 0], "last": p[:, :, -1], "mean": p.mean(2)}[mode]
            return out, rows.mean(1)

        return run

    for mode in ("cls", "mean"):
        cases.append(
            Case(
                f"{base}-scores_{mode}",
                desc + f" scores={mode}",
                {
                    "mmkernels": ours(scores=mode),
                    "mmkernels_plain": ours(),
                    "eager_sdpa_plus_softmax": eager_scores(mode),
                },
                err(scores=mode),
                flops,
            )
        )
    bias = torch.randn(b, L, generator=g)
    bias[:, -L // 10 :] = float("-inf")  # padded keys
    dense_mask = bias[:, None, None, :].expand(b, 1, L, L).to(dtype).contiguous()
    cases.append(
        Case(
            f"{base}-key_bias",
            desc + " key_bias (B, Lk)",
            {
                "mmkernels": ours(key_bias=bias),
                "sdpa_dense_mask": lambda: _sdpa(q, k_full, v_full, group, attn_mask=dense_mask),
                "sdpa_broadcast_mask": lambda: _sdpa(
                    q, k_full, v_full, group, attn_mask=bias[:, None, None, :].to(dtype)
                ),
            },
            err(key_bias=bias),
            flops,
        )
    )
    return cases


def varlen_case(dtype: torch.dtype, lengths=VARLEN_LENGTHS, heads=12, d=64) -> Case:
    g = torch.Generator().manual_seed(1)
    total, n = sum(lengths), len(lengths)
    q, k, v = (torch.randn(total, heads, d, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    longest = max(lengths)
    pieces = [
        (q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None])
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
    ]
    # Padded peer: pad every image to the longest and mask the padding with a dense float mask.
    qp = torch.zeros(n, heads, longest, d, dtype=dtype)
    kp, vp = qp.clone(), qp.clone()
    mask = torch.full((n, 1, longest, longest), float("-inf"), dtype=dtype)
    for i, (qs, ks, vs) in enumerate(pieces):
        m = qs.shape[2]
        qp[i, :, :m], kp[i, :, :m], vp[i, :, :m] = qs[0], ks[0], vs[0]
        mask[i, :, :, :m] = 0
    dt = str(dtype).replace("torch.", "")

    def ours():
        return mmkernels.attention(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest
        )

    def error():
        want = mmkernels.reference_attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu, cu_seqlens_k=cu)[0]
        return (ours().double() - want).abs().max().item()

    flops = sum(4.0 * heads * m * m * d for m in lengths)
    return Case(
        f"varlen_mixed_images-{dt}",
        f"varlen lengths={lengths} H={heads} D={d} {dt}",
        {
            "mmkernels": ours,
            "sdpa_per_image_loop": lambda: [F.scaled_dot_product_attention(*p) for p in pieces],
            "sdpa_padded_dense_mask": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask),
        },
        error,
        flops,
    )


# Decoding: one new token's query against the KV cache (transformers' (B, H, L, D) cache layout).
DECODE_SHAPES = [
    Shape("decode_smollm2_135m", 1, 9, 3, 2048, 64),  # GQA 3:1 (the LLaVA-style bench's LM)
    Shape("decode_llama3_8b", 1, 32, 8, 4096, 128),  # GQA 4:1
    Shape("decode_vicuna_7b", 1, 32, 32, 2048, 128),  # MHA (LLaVA-1.5's LM)
    # Whisper-tiny's decoder cross-attention over 30 s of audio (1500 encoder frames)
    Shape("decode_whisper_tiny_cross", 1, 6, 6, 1500, 64, kv_from_projection=True),
]
QUICK_DECODE_SHAPES = [Shape("decode_smollm2_135m", 1, 9, 3, 100, 64)]


def decode_case(shape: Shape, dtype: torch.dtype) -> Case:
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, lk, d = shape.batch, shape.heads_q, shape.heads_kv, shape.length, shape.head_dim
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype).transpose(1, 2)
    if shape.kv_from_projection:
        k, v = (torch.randn(b, lk, hkv, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(b, hkv, lk, d, generator=g).to(dtype) for _ in range(2))
    group = hq // hkv
    kernel = _kernel_backend()
    dt = str(dtype).replace("torch.", "")
    desc = f"B={b} Hq={hq} Hkv={hkv} Lq=1 Lk={lk} D={d} {dt}"

    def ours():
        return mmkernels.attention(q, k, v, backend=kernel)

    contenders = {
        "mmkernels": ours,
        # what transformers' SDPA path runs for a GQA cache (no copy of the kv heads)
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1),
    }
    return Case(
        f"{shape.name}-lk{lk}-{dt}",
        _with_auto(contenders, desc, q, k, v, False, kernel),
        contenders,
        lambda: _max_err(ours(), q, k, v),
        4.0 * b * hq * lk * d,
    )


def all_cases(quick: bool = False, only: Optional[str] = None) -> List[Case]:
    """Every attention case. ``quick``: tiny shapes for a smoke run (CI), not for gates."""
    cases: List[Case] = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        gated = shape.name in ("vit_b16", "dinov2_s14")
        cases += dense_cases(shape, torch.float32, extras=gated)
        cases += dense_cases(shape, torch.bfloat16, extras=gated)
        if gated:  # float16 (HF models loaded in half): plain calls against SDPA in float16, no gate
            cases += dense_cases(shape, torch.float16, extras=False)
    cases.append(varlen_case(torch.float32, [30, 50, 7] if quick else VARLEN_LENGTHS))
    for shape in QUICK_DECODE_SHAPES if quick else DECODE_SHAPES:
        cases += [decode_case(shape, torch.float32), decode_case(shape, torch.bfloat16)]
    if only:
        cases = [c for c in cases if only in c.id]
    return cases
