"""The C++ CPU kernels raise no floating-point exception but "inexact" on finite, ordinary inputs.

An underflow (a result that is denormal or rounds to 0 from below the normal range) or a denormal
operand takes a microcode assist on Intel cores (~100 cycles by Intel's optimisation manual; not
measured here; AMD's take it in hardware), and
the kernels run with the default MXCSR (no flush-to-zero). Attention used to raise an underflow on
every call: exp2 of each -inf lane (a ragged key block, a causal tail, a -inf key bias) scaled 1
by 2^-150. The flags are the calling thread's, so the op runs on one thread here.

float16 attention is left out: its output is rounded to half precision, where outputs below
6.1e-5 are legitimately subnormal halves (and raise the underflow flag when converted).
"""

import ctypes
import ctypes.util
import math

import pytest
import torch

import mmkernels
from backend_params import cpu_isa_paths

FE_INVALID, FE_DIVBYZERO, FE_OVERFLOW, FE_UNDERFLOW = 0x01, 0x04, 0x08, 0x10
FE_NOT_INEXACT = FE_INVALID | FE_DIVBYZERO | FE_OVERFLOW | FE_UNDERFLOW
NAMES = {FE_INVALID: "invalid", FE_DIVBYZERO: "divide-by-zero", FE_OVERFLOW: "overflow", FE_UNDERFLOW: "underflow"}


def _libm():
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return None  # the flag values above are x86's
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        lib.feclearexcept, lib.fetestexcept  # noqa: B018
        return lib
    except (OSError, AttributeError):
        return None


LIBM = _libm()
pytestmark = pytest.mark.skipif(LIBM is None, reason="needs x86-64 and C99 fenv (feclearexcept) in libm")


@pytest.fixture(autouse=True)
def no_poison(monkeypatch):
    """Outputs are not filled with NaN first: making a NaN tensor raises "invalid" itself."""
    import mmkernels.quant.cpu

    monkeypatch.setenv("MMKERNELS_DEBUG_POISON", "0")
    monkeypatch.setattr(mmkernels.quant.cpu, "_POISON", False)


def raised(fn) -> list:
    """Names of the exceptions other than inexact that fn raises on this thread (its second call:
    the first one packs weights and fills caches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        LIBM.feclearexcept(FE_NOT_INEXACT)
        fn()
        flags = LIBM.fetestexcept(FE_NOT_INEXACT)
    finally:
        torch.set_num_threads(threads)
    return [name for bit, name in NAMES.items() if flags & bit]


def rnd(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _cpu_available(family):
    import importlib

    try:
        return importlib.import_module(f"mmkernels.{family}.cpu").is_available()
    except ImportError:
        return False


def _isas(family):
    return cpu_isa_paths(family) if _cpu_available(family) else []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("isa", _isas("attention"))
def test_attention_raises_no_underflow(isa, dtype, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    q, k, v = (rnd(2, 4, 77, 64, dtype=dtype, seed=s) for s in range(3))
    qs, ks, vs = (rnd(1, 2, 577, 64, dtype=dtype, seed=s) for s in range(3, 6))  # several key blocks
    bias = rnd(2, 4, 77, seed=9)
    bias[..., 70:] = -math.inf  # key padding
    bias[..., 3] = -math.inf
    lens = torch.tensor([0, 50, 50, 127], dtype=torch.int32)  # an empty sequence too
    qv, kv, vv = (rnd(127, 3, 40, dtype=dtype, seed=s) for s in range(6, 9))
    # Probabilities down to 2^-160 (logits 80-110 below the row max, natural log): the band
    # where 2^x is denormal or underflows.
    far = torch.zeros(2, 77)
    far[:, 1:] = -torch.linspace(80.0, 110.0, 76)
    calls = {
        "tiny probabilities": lambda: mmkernels.attention(q, k, v, key_bias=far, scale=1e-4, backend="cpu"),
        "causal": lambda: mmkernels.attention(q, k, v, causal=True, backend="cpu"),
        "ragged block": lambda: mmkernels.attention(q[..., :45, :], k, v, backend="cpu"),
        "key_bias -inf, scores, lse": lambda: mmkernels.attention(
            q, k, v, key_bias=bias, scores="mean", return_lse=True, backend="cpu"
        ),
        "causal, several blocks, scores": lambda: mmkernels.attention(
            qs, ks, vs, causal=True, scores="cls", backend="cpu"
        ),
        "varlen causal": lambda: mmkernels.attention(
            qv, kv, vv, causal=True, cu_seqlens_q=lens, cu_seqlens_k=lens, backend="cpu"
        ),
    }
    if isa == "scalar" or (isa == "amx_emulated" and dtype == torch.bfloat16):
        # The portable path multiplies and adds apart (no FMA): p * v of p near 2^-125 can itself
        # underflow there; so can the emulated tdpbf16ps, unless the compiler fuses its multiply
        # and add (the tiles themselves flush denormals: no assist on AMX). Masked keys still cost
        # nothing on either (p is exactly 0).
        del calls["tiny probabilities"]
    for what, call in calls.items():
        assert raised(call) == [], f"{isa} {dtype} {what}"


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("isa", _isas("quant"))
def test_qmatmul_raises_no_underflow(isa, dtype, bits, group, act_bits, monkeypatch):
    if act_bits and bits != 8:
        pytest.skip("W8A8 only")
    monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    qw = mmkernels.quantize_weight(rnd(96, 256, seed=1), bits, group)
    for m in (1, 5, 33):
        x = rnd(m, 256, dtype=dtype, seed=m)
        assert raised(lambda: mmkernels.qmatmul(x, qw, act_bits=act_bits, backend="cpu")) == [], f"{isa} M={m}"


@pytest.mark.parametrize("isa", _isas("quant"))
def test_linear_raises_no_underflow(isa, monkeypatch):
    from mmkernels.linear import cpu as linear_cpu

    monkeypatch.setattr(linear_cpu, "_POISON", False)
    monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    w, b = rnd(96, 300, seed=1), rnd(96, seed=2)
    for m in (1, 5, 33):
        x = rnd(m, 300, seed=m)
        assert raised(lambda: mmkernels.linear(x, w, b, backend="cpu")) == [], f"{isa} M={m}"


@pytest.mark.parametrize("isa", _isas("reduce"))
def test_token_reduction_raises_no_underflow(isa, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    metric, x = rnd(2, 197, 64, seed=1), rnd(2, 197, 96, seed=2)
    size = rnd(2, 197, seed=3).abs() + 0.5

    def tome():
        plan = mmkernels.tome_plan(metric, 16, protect_first=1, backend="cpu")
        merged, msize = mmkernels.tome_merge(x, plan, size, backend="cpu")
        mmkernels.tome_unmerge(merged, plan, backend="cpu")

    assert raised(tome) == [], isa
    assert raised(lambda: mmkernels.select_tokens(rnd(2, 197, seed=4), 64, backend="cpu")) == [], isa


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("isa", _isas("quant"))
def test_activations_raise_no_underflow(isa, activation, monkeypatch):
    """The epilogue's activations on pre-activations from -40 to 40 (gelu's and the sigmoids'
    tails fall far below float's normal range there: they must come out as 0, not denormal)."""
    from mmkernels.linear import cpu as linear_cpu

    monkeypatch.setattr(linear_cpu, "_POISON", False)
    monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    k = 64
    x = torch.linspace(-40, 40, 7 * 33).reshape(33, 7)
    w = torch.zeros(96, k)
    w[:, :7] = torch.randn(96, 7, generator=torch.Generator().manual_seed(3)).sign()  # +-x
    x = torch.cat([x, torch.zeros(33, k - 7)], 1)
    for m in (1, 5, 33):
        xm = x[:m].contiguous()
        assert raised(lambda: mmkernels.linear(xm, w, backend="cpu", activation=activation)) == [], f"{isa} M={m}"
        qw = mmkernels.quantize_weight(w, 8, None)
        for act_bits in (None, 8):
            call = lambda: mmkernels.qmatmul(xm, qw, act_bits=act_bits, backend="cpu", activation=activation)  # noqa: E731
            assert raised(call) == [], f"{isa} M={m} act_bits={act_bits}"
