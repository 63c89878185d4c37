"""Quantized-matmul benchmark cases: ``qmatmul`` against float matmul and the quantization peers;
and ``linear`` (our float32 GEMM) against torch's float32 matmul on the same shapes
(``linear-fp32-m<M>-k<K>-n<N>``).

Case ids: ``qmatmul-<format>-m<M>-k<K>-n<N>`` with format ``int4g128`` (int4 weight-only, groups of
128, symmetric), ``int8wo`` (int8 weight-only per channel) or ``w8a8`` (int8 per-channel weights,
dynamic per-token int8 activations). Our contender runs float32 activations (``mmkernels``) and,
for weight-only formats, bfloat16 activations too (``mmkernels_bf16``); the int4 g128 1x4096x4096
GEMV also runs float16 activations (``mmkernels_f16``, against ``torch_f16``; no gate). Peers, built
from the same float weight:

* ``torch_fp32`` / ``torch_bf16`` / ``torch_f16``: ``x @ W.T`` in float32 / bfloat16 / float16.
* ``torch_int4_cpu``: torch's own CPU int4 op ``aten._weight_int4pack_mm_for_cpu`` (bfloat16
  activations, groups of 128, asymmetric tinygemm-style zero points) — what torchao's CPU int4
  layout calls.
* ``bnb_nf4`` / ``bnb_int8``: bitsandbytes' ``Linear4bit`` (NF4, float32 compute) and
  ``Linear8bitLt`` on CPU.
* ``torchao_int8wo`` / ``torchao_w8a8`` (eager) and ``*_compiled`` (``torch.compile``, only on the
  gate shapes: each compile costs tens of seconds): torchao's ``Int8WeightOnlyConfig`` and
  ``Int8DynamicActivationInt8WeightConfig``.

A peer that is not installed, or that fails on this machine, is left out of the case with a note
in ``meta`` (the report shows only contenders that ran).
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import mmkernels
from mmkernels._activations import apply_activation
from mmkernels.quant import quantize_weight, unpack_int4

from .case import Case

# (name, M, K, N): the shapes, then MiniLM (batch 32 x 128 tokens) and ViT-B/16 (batch 8)
SHAPES = [
    ("llama_4k", 1, 4096, 4096),
    ("llama_mlp", 1, 4096, 11008),
    ("decode_b8", 8, 4096, 4096),
    ("prefill", 128, 4096, 4096),
    ("vit_mlp", 512, 768, 3072),
    ("minilm_ffn_up", 4096, 384, 1536),
    ("minilm_ffn_down", 4096, 1536, 384),
    ("vit_b_qkv", 1576, 768, 2304),
]
QUICK_SHAPES = [("tiny_gemv", 1, 256, 512), ("tiny_gemm", 32, 256, 512)]
# The float32 Linear with a GELU fused into its epilogue: an MLP's fc1 (MiniLM / DINOv2-S width).
GELU_SHAPE = ("minilm_ffn_up", 4096, 384, 1536)
QUICK_GELU_SHAPE = ("tiny_gemm", 32, 256, 512)
FORMATS = ("int4g128", "int8wo", "w8a8")
# Shapes on which torch.compile'd torchao peers run (the gates compare with them).
COMPILED_PEER_SHAPES = {("int8wo", 1, 4096, 4096), ("w8a8", 128, 4096, 4096)}
# Cases that also run float16 activations (ours and torch's float16 matmul).
F16_SHAPES = {("int4g128", 1, 4096, 4096)}


def _quiet(fn):
    def wrapped(*a, **k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*a, **k)

    return wrapped


@_quiet
def _torchao_linear(linear: nn.Linear, kind: str, compiled: bool):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(linear)
    quantize_(m, Int8WeightOnlyConfig() if kind == "int8wo" else Int8DynamicActivationInt8WeightConfig())
    return torch.compile(m) if compiled else m


@_quiet
def _bnb_linear(linear: nn.Linear, kind: str):
    import bitsandbytes as bnb

    k, n = linear.in_features, linear.out_features
    if kind == "nf4":
        m = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        m.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    else:
        m = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False)
        m.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    return m.to("cpu")


def _torch_int4(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's CPU int4 op on our own asymmetric g128 quantization of ``w``.

    The op computes ``W = (q - 8) * scale + zero`` per group, so our ``(q - z) * s`` maps to
    ``scale = s``, ``zero = (8 - z) * s``.
    """
    qw = quantize_weight(w, bits=4, group_size=128, symmetric=False)
    q = unpack_int4(qw.qweight, signed=False).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    s, z = qw.scales, qw.zeros.to(torch.float32)
    scale_zero = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return lambda xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 128, scale_zero)


def _try(peers: Dict[str, Callable], notes: Dict[str, str], name: str, build: Callable, x: torch.Tensor):
    """Add peer ``name`` if it builds and runs on ``x``; otherwise record why not."""
    try:
        fn = build()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(x)
    except Exception as exc:  # a peer's failure is reported, not fatal
        notes[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        return
    peers[name] = fn


def qmatmul_case(fmt: str, name: str, m: int, k: int, n: int) -> Case:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    w = linear.weight.detach()
    x = torch.randn(m, k, generator=g)
    xb = x.to(torch.bfloat16)
    w_bf16 = w.to(torch.bfloat16)
    if fmt == "int4g128":
        qw, act_bits = quantize_weight(w, bits=4, group_size=128), None
    else:
        qw, act_bits = quantize_weight(w, bits=8), (8 if fmt == "w8a8" else None)

    contenders: Dict[str, Callable[[], object]] = {
        "mmkernels": lambda: mmkernels.qmatmul(x, qw, act_bits=act_bits),
    }
    if act_bits is None:
        contenders["mmkernels_bf16"] = lambda: mmkernels.qmatmul(xb, qw)
    contenders["torch_fp32"] = lambda: x @ w.T
    contenders["torch_bf16"] = lambda: xb @ w_bf16.T
    if (fmt, m, k, n) in F16_SHAPES:
        xh, w_f16 = x.to(torch.float16), w.to(torch.float16)
        contenders["mmkernels_f16"] = lambda: mmkernels.qmatmul(xh, qw)
        contenders["torch_f16"] = lambda: xh @ w_f16.T

    peers: Dict[str, Callable] = {}
    notes: Dict[str, str] = {}
    if fmt == "int4g128":
        _try(peers, notes, "torch_int4_cpu", lambda: _torch_int4(w), xb)
        _try(peers, notes, "bnb_nf4", lambda: _bnb_linear(linear, "nf4"), x)
    else:
        kind = "int8wo" if fmt == "int8wo" else "w8a8"
        _try(peers, notes, f"torchao_{kind}", lambda: _torchao_linear(linear, kind, False), x)
        if (fmt, m, k, n) in COMPILED_PEER_SHAPES:
            _try(peers, notes, f"torchao_{kind}_compiled", lambda: _torchao_linear(linear, kind, True), x)
        _try(peers, notes, "bnb_int8", lambda: _bnb_linear(linear, "int8"), x)
    for peer, fn in peers.items():
        arg = xb if peer == "torch_int4_cpu" else x
        contenders[peer] = _no_grad_call(fn, arg)

    def error() -> float:
        """Max |ours - reference| relative to max |reference| (float64 reference of the same
        quantized weight: the kernel's own error, not the quantization error)."""
        want = mmkernels.quant.qmatmul_reference(x.double(), qw, act_bits=act_bits)
        got = contenders["mmkernels"]().double()
        return ((got - want).abs().max() / want.abs().max()).item()

    desc = {
        "int4g128": "int4 g128 weight-only",
        "int8wo": "int8 weight-only per-channel",
        "w8a8": "W8A8 (per-token int8 activations)",
    }[fmt]
    return Case(
        _case_id(fmt, name, m, k, n),
        f"{desc}, {name} (M={m}, K={k}, N={n})",
        contenders,
        error,
        flops=2.0 * m * k * n,
        meta={"peers_missing": notes, **({"bytes": _weight_bytes(qw)} if m == 1 else {})},
    )


def linear_case(name: str, m: int, k: int, n: int, activation: Optional[str] = None) -> Case:
    """``mmkernels.linear`` (our float32 GEMM, ``backend="cpu"``) against torch's float32 matmul
    (``F.linear``: MKL / oneDNN) on the same weight; torch's bfloat16 matmul for context. With an
    ``activation``: ours fused into the epilogue, against torch's activation after torch's GEMM
    (``torch_fp32``) and after ours (``mmkernels_unfused``)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    xb, w_bf16, b_bf16 = x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)

    def act(y):
        return apply_activation(y, activation)

    contenders: Dict[str, Callable[[], object]] = {
        "mmkernels": lambda: mmkernels.linear(x, w, b, backend="cpu", activation=activation),
        "torch_fp32": lambda: act(torch.nn.functional.linear(x, w, b)),
        "torch_bf16": lambda: act(torch.nn.functional.linear(xb, w_bf16, b_bf16)),
    }
    if activation is not None:
        contenders["mmkernels_unfused"] = lambda: act(mmkernels.linear(x, w, b, backend="cpu"))

    def error() -> float:
        """Max |ours - float64| relative to max |float64|."""
        want = act(torch.nn.functional.linear(x.double(), w.double(), b.double()))
        got = contenders["mmkernels"]().double()
        return ((got - want).abs().max() / want.abs().max()).item()

    fused = f" + {activation} in the epilogue" if activation else ""
    return Case(
        _linear_id(name, m, k, n, activation),
        f"float32 Linear (mmkernels.linear){fused}, {name} (M={m}, K={k}, N={n})",
        contenders,
        error,
        flops=2.0 * m * k * n,
        meta={"bytes": 4 * n * k} if m == 1 else {},
    )


def _linear_id(name: str, m: int, k: int, n: int, activation: Optional[str] = None) -> str:
    return f"linear-fp32{'-' + activation if activation else ''}-m{m}-k{k}-n{n}"


def _weight_bytes(qw) -> int:
    """Bytes a GEMV must read at least: the stored weight, its scales and zero points (the report
    gives the case's fraction of the measured memory bandwidth from it)."""
    parts = (qw.qweight, qw.scales, qw.zeros)
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _no_grad_call(fn, arg):
    @torch.no_grad()
    def call():
        return fn(arg)

    return call


MINILM_CASE_ID = "minilm_w8a8-b32-l128"


def minilm_windows(batch: int) -> List[str]:
    """``batch`` windows of 160 words over all-MiniLM-L6-v2's README prose: sentences of at least
    128 tokens (the tokenizer truncates them to 128)."""
    from mmkernels.models import minilm as mm

    words = " ".join(mm.readme_sentences(None)).split()
    step = max(1, (len(words) - 160) // batch)
    return [" ".join((words * 2)[i * step : i * step + 160]) for i in range(batch)]


def minilm_case(batch: int = 32, length: int = 128) -> Case:
    """Whole all-MiniLM-L6-v2 (real weights) on ``batch`` sentences of ``length`` tokens: every
    Linear at W8A8 (RTN weights, SmoothQuant alpha=0.5 calibrated on other text) against the float32
    model, plus torchao's int8 dynamic quantization of the same model (eager) as a peer.
    ``error`` is 1 - mean cosine of the mean-pooled sentence embeddings to float32."""
    from mmkernels.models import minilm as mm
    from mmkernels.compress import quantize_model

    base = mm.minilm_l6_v2()
    inputs = base.tokenize(minilm_windows(batch))
    assert inputs["input_ids"].shape == (batch, length), inputs["input_ids"].shape
    calib = [base.tokenize(mm.calibration_sentences(64)[i : i + 16]) for i in range(0, 64, 16)]
    ours = copy.deepcopy(base)
    quantize_model(ours, bits=8, act_bits=8, smooth_alpha=0.5, calib_data=calib, progress=False)

    contenders: Dict[str, Callable[[], object]] = {
        "mmkernels": _no_grad_call(lambda kw: ours(**kw), inputs),
        "fp32_eager": _no_grad_call(lambda kw: base(**kw), inputs),
    }
    peers: Dict[str, Callable] = {}
    notes: Dict[str, str] = {}

    def torchao_model():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return lambda kw: m(**kw)

    _try(peers, notes, "torchao_w8a8", torchao_model, inputs)
    for peer, fn in peers.items():
        contenders[peer] = _no_grad_call(fn, inputs)

    def error() -> float:
        mask = inputs["attention_mask"]
        with torch.no_grad():
            a = mm.mean_pool(ours(**inputs), mask)
            b = mm.mean_pool(base(**inputs), mask)
        return 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double()).mean().item()

    return Case(
        MINILM_CASE_ID,
        f"all-MiniLM-L6-v2, every Linear W8A8 (RTN + SmoothQuant 0.5), "
        f"batch {batch} x {length} tokens, vs float32 eager",
        contenders,
        error,
        meta={"peers_missing": notes, "error": "1 - mean cosine to fp32"},
    )


def _has_minilm() -> bool:
    try:
        from mmkernels.models import minilm as mm

        mm.minilm_dir()
        return True
    except Exception:
        return False


def _case_id(fmt: str, name: str, m: int, k: int, n: int) -> str:
    return f"qmatmul-{fmt}-m{m}-k{k}-n{n}"


def case_ids(quick: bool = False) -> List[str]:
    """The ids :func:`all_cases` would build (without building them: cases hold large weights)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    return (
        [_case_id(fmt, *shape) for shape in shapes for fmt in FORMATS]
        + [_linear_id(*shape) for shape in shapes]
        + [_linear_id(*(QUICK_GELU_SHAPE if quick else GELU_SHAPE), "gelu")]
        + ([] if quick else [MINILM_CASE_ID])
    )


def all_cases(quick: bool = False, only: Optional[str] = None) -> List[Case]:
    shapes: List[Tuple[str, int, int, int]] = QUICK_SHAPES if quick else SHAPES
    specs = [(fmt, *shape) for shape in shapes for fmt in FORMATS]
    if only:
        specs = [s for s in specs if only in _case_id(*s)]
    # Built lazily, one at a time: each case holds float copies of a (up to 4096 x 11008) weight.
    makers = [lambda s=s: qmatmul_case(*s) for s in specs]
    makers += [lambda s=shape: linear_case(*s) for shape in shapes if not only or only in _linear_id(*shape)]
    gelu_shape = QUICK_GELU_SHAPE if quick else GELU_SHAPE
    if not only or only in _linear_id(*gelu_shape, "gelu"):
        makers.append(lambda: linear_case(*gelu_shape, "gelu"))
    if not quick and (not only or only in MINILM_CASE_ID) and _has_minilm():
        makers.append(minilm_case)
    return _LazyCases(makers)


class _LazyCases(list):
    """A list of case factories that builds each case when iterated (memory stays bounded)."""

    def __iter__(self):
        for make in super().__iter__():
            yield make()
