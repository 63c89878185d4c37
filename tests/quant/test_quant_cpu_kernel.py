"""The C++ CPU backend of qmatmul (csrc/cpu/qmatmul*.cpp via mmkernels/quant/cpu.py) against the
float64 oracle, on every ISA path this CPU can run (forced with MMKERNELS_CPU_ISA).

Tolerance (tests/oracle.py's rule): max |cpu - oracle| <= 2 * max |reference in x's dtype -
oracle| + a small floor, the oracle being qmatmul_reference in float64. W8A8 must equal the
reference run in x's dtype bit for bit (same integers, same epilogue roundings). conftest sets
MMKERNELS_DEBUG_POISON=1: the glue fills outputs with NaN before the kernel runs, so an element
the kernel forgets to write fails the NaN check.
"""

import gc

import pytest
import torch

import mmkernels
from mmkernels.quant import qmatmul, qmatmul_reference, quantize_weight
from mmkernels.quant import cpu as qcpu
from mmkernels.quant.packing import QuantizedWeight

from backend_params import cpu_isa_paths
from oracle import FLOOR, max_err

if not qcpu.is_available():
    pytest.skip(f"mmkernels._C has no qmatmul kernels: {qcpu.LOAD_ERROR}", allow_module_level=True)

ISAS = cpu_isa_paths("quant")  # every ISA path this CPU can run, lowest first
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
M_VALUES = (1, 3, 16, 33, 128)  # 1 / 3: row-dot kernel; >= 16: prepacked GEMM kernel


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", request.param)
    assert qcpu.cpu_isa() == request.param
    return request.param


def check(x, qw, bias=None, smooth=None, act_bits=None):
    """Run the cpu backend and compare with the float64 oracle (2x rule) / the reference."""
    got = qmatmul(x, qw, bias, act_bits=act_bits, backend="cpu", smooth=smooth)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], qw.shape[0])
    assert not torch.isnan(got).any(), "NaN in the output (an element was not written)"
    same = qmatmul_reference(x, qw, bias, act_bits, smooth)
    if act_bits is not None:
        assert torch.equal(got, same), f"W8A8 differs from the reference: {max_err(got, same)}"
        return got
    exact = qmatmul_reference(
        x.double(), qw, None if bias is None else bias.double(), None, None if smooth is None else smooth.double()
    )
    err, base = max_err(got, exact), max_err(same, exact)
    floor = FLOOR[x.dtype] * max(1.0, exact.abs().max().item())
    assert err <= 2 * base + floor, f"max error {err:.3g} > 2 x {base:.3g} (PyTorch {x.dtype}) + {floor:.3g}"
    return got


# int4: every group size incl. per channel; int8: per channel and grouped. K values are
# multiples of the group size that are not multiples of 64 where possible; odd N everywhere.
WO_CONFIGS = [  # (bits, group_size, K)
    (4, 32, 96),
    (4, 32, 160),
    (4, 64, 192),
    (4, 128, 384),
    (4, None, 98),
    (8, None, 97),
    (8, None, 160),
    (8, 32, 96),
    (8, 128, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size,k", WO_CONFIGS)
def test_weight_only(isa, bits, group_size, k, symmetric, dtype):
    n = 67
    qw = quantize_weight(torch.randn(n, k), bits, group_size, symmetric)
    bias = torch.randn(n)
    smooth = torch.rand(k) + 0.5
    for i, m in enumerate(M_VALUES):
        x = torch.randn(m, k).to(dtype)
        check(x, qw, bias if i % 2 == 0 else None, smooth if i % 3 == 1 else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, None), (4, None)])
def test_weight_only_large_blocks(isa, bits, group_size, dtype):
    """Several K blocks of the GEMM panel, several row blocks, a partial last strip."""
    n, k = 130, 640 if group_size else 514
    qw = quantize_weight(torch.randn(n, k), bits, group_size, symmetric=False)
    for m in (2, 200):
        check(torch.randn(m, k).to(dtype), qw, torch.randn(n))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_only_layouts_bias_smooth(isa, dtype):
    """Non-contiguous and 3-D x, bias in another dtype, SmoothQuant factors."""
    n, k = 33, 256
    qw = quantize_weight(torch.randn(n, k), 4, 64, symmetric=True)
    bias64 = torch.randn(n, dtype=torch.float64)
    smooth = torch.rand(k) + 0.5
    for m in (1, 3, 17, 40):
        base = torch.randn(k, 2 * m).to(dtype)
        check(base.t()[::2], qw, bias64)  # transposed, sliced view
        check(torch.randn(2, m, k).to(dtype), qw, smooth=smooth)  # 3-D x
        check(torch.randn(m, k).to(dtype), qw, bias64.float(), smooth=smooth)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_every_nibble(isa, symmetric):
    """All 256 byte values in every row (all 16 nibbles in both positions), several zero points."""
    n, k = 20, 512
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randperm(256, generator=g) for _ in range(n)])  # (n, 256)
    qweight = rows.to(torch.uint8)
    scales = torch.rand(n, k // 32, generator=g) + 0.1
    zeros = None if symmetric else torch.randint(0, 16, (n, k // 32), generator=g).to(torch.uint8)
    qw = QuantizedWeight(qweight, scales, zeros, bits=4, group_size=32, shape=(n, k))
    for m in (1, 2, 16):
        for dtype in DTYPES:
            check(torch.randn(m, k, generator=g).to(dtype), qw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w8a8_exact(isa, symmetric, dtype):
    for n, k in ((67, 256), (257, 97), (64, 1000)):
        w = torch.randn(n, k)
        w[3] = 0  # an all-zero channel
        qw = quantize_weight(w, 8, None, symmetric)
        bias = torch.randn(n)
        for i, m in enumerate(M_VALUES):
            x = (torch.randn(m, k) * 3).to(dtype)
            x[0, : k // 2] = 0
            if m > 1:
                x[1] = 0  # an all-zero token
            check(x, qw, bias if i % 2 else None, act_bits=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_w8a8_layouts_bias_smooth(isa, dtype):
    n, k = 31, 128
    qw = quantize_weight(torch.randn(n, k), 8, None, symmetric=False)
    smooth = torch.rand(k) + 0.5
    for m in (1, 7, 20):
        base = torch.randn(k, 3 * m).to(dtype)
        check(base.t()[1::3], qw, torch.randn(n, dtype=torch.bfloat16), act_bits=8)
        check(torch.randn(2, m, k).to(dtype), qw, smooth=smooth, act_bits=8)


@pytest.mark.parametrize("rows", [5, 33])
def test_w8a8_extreme_values(isa, rows):
    """Stored weights at the ends of their range (-128 symmetric, 0 / 255 asymmetric) against
    saturating activations: the int32 sums must be exact (33 rows: two whole AMX row tiles and the
    row past them, K = 300 with a tail of 11 quads)."""
    n, k = 65, 300
    x = torch.full((rows, k), 1e3)
    x[1::3] = -1e3
    x[2::3, ::2] = -1e3
    for zeros in (None, torch.full((n, 1), 255, dtype=torch.uint8), torch.zeros(n, 1, dtype=torch.uint8)):
        if zeros is None:
            qweight = torch.full((n, k), -128, dtype=torch.int8)
            qweight[1::2] = 127
        else:
            qweight = torch.full((n, k), 255, dtype=torch.uint8)
            qweight[1::2] = 0
        qw = QuantizedWeight(qweight, torch.rand(n, 1) + 0.5, zeros, bits=8, group_size=None, shape=(n, k))
        check(x, qw, act_bits=8)
        check(x.bfloat16(), qw, act_bits=8)
        # float16: the same saturating x_q, with the weight scales made small enough that the
        # output stays finite in float16 (|y| < 65504)
        qw16 = QuantizedWeight(qweight, qw.scales * 1e-4, zeros, bits=8, group_size=None, shape=(n, k))
        assert torch.isfinite(check(x.half(), qw16, act_bits=8)).all()


def test_empty_rows(isa):
    qw = quantize_weight(torch.randn(9, 64), 4, 32)
    assert qmatmul(torch.randn(0, 64), qw, backend="cpu").shape == (0, 9)
    assert qmatmul(torch.randn(2, 0, 64), qw, backend="cpu", act_bits=None).shape == (2, 0, 9)


def test_prepacked_cache_follows_weight_changes():
    """The prepacked layouts are cached per qweight tensor and rebuilt after in-place changes."""
    n, k = 70, 256
    for bits, act_bits, group_size in ((4, None, 64), (8, None, None), (8, 8, None)):
        qw = quantize_weight(torch.randn(n, k), bits, group_size)
        x = torch.randn(20, k)  # M >= 16: prepacked kernels
        y0 = check(x, qw, act_bits=act_bits)
        assert torch.equal(qmatmul(x, qw, act_bits=act_bits, backend="cpu"), y0)  # cache hit
        qw.qweight.copy_(quantize_weight(torch.randn(n, k), bits, group_size).qweight)
        y1 = check(x, qw, act_bits=act_bits)  # rebuilt from the new values
        assert not torch.equal(y0, y1)
        qw.scales.mul_(2)  # scales changed alone
        y2 = check(x, qw, act_bits=act_bits)
        torch.testing.assert_close(y2, 2 * y1, rtol=1e-6, atol=1e-5)
    del qw
    gc.collect()
    before = qcpu.cache_size()
    qw = quantize_weight(torch.randn(n, k), 8)
    qmatmul(torch.randn(20, k), qw, backend="cpu")
    assert qcpu.cache_size() == before + 1
    del qw
    gc.collect()
    assert qcpu.cache_size() == before  # the entry died with its weight


def test_dispatch_and_reasons():
    qw = quantize_weight(torch.randn(8, 64), 4, 32)
    qw8 = quantize_weight(torch.randn(8, 64), 8)
    from mmkernels import _dispatch
    from mmkernels.quant.api import _select

    for dtype, name in (
        (torch.float32, "cpu"),
        (torch.bfloat16, "cpu"),
        (torch.float16, "cpu"),
        (torch.float64, "reference"),
    ):
        x = torch.randn(2, 64, dtype=dtype)
        assert _select(x, qw.qweight, qw.scales, qw.zeros, 4, 0, False, "").name == name
        assert _select(x, qw8.qweight, qw8.scales, qw8.zeros, 8, 8, False, "").name == name  # W8A8
    with pytest.raises(_dispatch.NoBackendError, match="float64 is served by the reference"):
        qmatmul(torch.randn(2, 64).double(), qw, backend="cpu")
    rows = {r["backend"]: r for r in mmkernels._dispatch.capability_table() if r["op"] == "qmatmul"}
    assert rows["cpu"]["available"] == "yes"


def test_poison_is_on():
    """The NaN checks above rely on conftest's MMKERNELS_DEBUG_POISON=1 reaching the glue."""
    assert qcpu._POISON


def test_forced_isa_unknown(monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", "sse9")
    qw = quantize_weight(torch.randn(8, 64), 8)
    with pytest.raises(RuntimeError, match="MMKERNELS_CPU_ISA"):
        qmatmul(torch.randn(2, 64), qw, backend="cpu")


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_activation_in_the_epilogue(isa, activation, dtype):
    """Every output store path (row-dot, GEMM, W8A8; AVX-512 vector stores, scalar stores) applies
    the activation: weight-only by the 2x rule against float64, W8A8 within a few roundings of
    the reference in x's dtype (its pre-activation is bit-exact; the activation's formula is ours)."""
    g = torch.Generator().manual_seed(4)
    n, k = 67, 160
    bias = torch.randn(n, generator=g)
    for bits, group_size in ((4, 32), (8, None)):
        qw = quantize_weight(torch.randn(n, k, generator=g) / 4, bits, group_size, True)
        for m in (1, 5, 16, 37):
            x = torch.randn(m, k, generator=g).to(dtype)
            got = qmatmul(x, qw, bias, backend="cpu", activation=activation)
            assert not torch.isnan(got).any()
            exact = qmatmul_reference(x.double(), qw, bias.double(), activation=activation)
            same = qmatmul_reference(x, qw, bias, activation=activation)
            err, base = max_err(got, exact), max_err(same, exact)
            floor = FLOOR[x.dtype] * max(1.0, exact.abs().max().item())
            assert err <= 2 * base + floor, f"{bits}-bit m={m}: {err:.3g} > 2 x {base:.3g} + {floor:.3g}"
    qw = quantize_weight(torch.randn(n, k, generator=g) / 4, 8, None, True)
    for m in (1, 37):
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        got = qmatmul(x, qw, bias, 8, backend="cpu", activation=activation)
        same = qmatmul_reference(x, qw, bias, 8, activation=activation)
        bound = 2 * torch.finfo(dtype).eps * same.double().abs().max().item() + 1e-6
        assert max_err(got, same) <= bound, f"W8A8 m={m}: {max_err(got, same):.3g} > {bound:.3g}"
