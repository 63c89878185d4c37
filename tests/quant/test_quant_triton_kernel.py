"""The Triton qmatmul backend (mmkernels/quant/triton.py) against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): small shapes (K 64 / 100 / 256, odd N = 67) that
still cover every path: the split-K GEMV (M = 1, 3: CUDA-core FMA; M = 7: 16-row dot tile) with
several splits and the reduce kernel, and the GEMM (M = 16, 33: several row / column tiles).
With a GPU the same tests run compiled on CUDA tensors, and the @gpu tests add layer-sized shapes
and the CUDA C++ int4 GEMV.

Tolerances (FlashAttention's 2x rule, tests/oracle.py): weight-only
``|y - y64| <= 2 |y_torch - y64| + floor`` where y64 is the reference in float64 and y_torch the
same layer in PyTorch in the input precision (``F.linear(x, W_hat.to(dtype), bias)``). W8A8 integer
paths must match the reference computed in the same dtype up to the final float rounding (exactly
under the interpreter), and the activation-quantization kernel must equal
reference.quantize_activations[_fp8] bit for bit.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from mmkernels import _dispatch  # noqa: E402
from mmkernels.quant import qmatmul, qmatmul_reference, quantize_weight  # noqa: E402
from mmkernels.quant import reference as R  # noqa: E402
from mmkernels.quant import triton as T  # noqa: E402
from mmkernels.quant.packing import FP8_DTYPE  # noqa: E402
from oracle import FLOOR, max_err  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
INTERPRETED = not GPU or os.environ.get("TRITON_INTERPRET") == "1"

# (id, quantize_weight kwargs): every storage format, sym / asym, per channel and groups
WO_FORMATS = [
    ("int8-sym-pc", dict(bits=8, group_size=None, symmetric=True)),
    ("int8-asym-g64", dict(bits=8, group_size=64, symmetric=False)),
    ("int4-sym-pc", dict(bits=4, group_size=None, symmetric=True)),
    ("int4-sym-g32", dict(bits=4, group_size=32, symmetric=True)),
    ("int4-asym-g128", dict(bits=4, group_size=128, symmetric=False)),
    ("fp8-pc", dict(bits=8, group_size=None, fp8=True)),
    ("fp8-g32", dict(bits=8, group_size=32, fp8=True)),
]
W8A8_FORMATS = [
    ("int8-sym", dict(bits=8, symmetric=True)),
    ("int8-asym", dict(bits=8, symmetric=False)),
    ("fp8", dict(bits=8, fp8=True)),
]


def _weight(n, k, kw, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes, one all-zero row
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0.5, n)[:, None]
    w[min(2, n - 1)] = 0
    return quantize_weight(w, **kw).to(DEVICE)


def _x(m, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


def _linear_same_precision(x, qw, bias, smooth):
    """The layer in PyTorch in x's precision: the comparison point of the 2x rule."""
    dtype = x.dtype
    if smooth is not None:
        x = (x.float() / smooth.float()).to(dtype)
    return F.linear(x, qw.dequantize(dtype), None if bias is None else bias.to(dtype))


def assert_weight_only_ok(x, qw, bias=None, smooth=None, backend="triton"):
    y = qmatmul(x, qw, bias, backend=backend, smooth=smooth)
    assert y.shape == (*x.shape[:-1], qw.out_features) and y.dtype == x.dtype
    assert not torch.isnan(y).any()

    def up(t):
        return None if t is None else t.double()

    y64 = qmatmul_reference(x.double(), qw, up(bias), smooth=up(smooth))
    err = max_err(y, y64)
    base = max_err(_linear_same_precision(x, qw, bias, smooth), y64)
    floor = FLOOR[x.dtype]
    assert err <= 2 * base + floor, f"max error {err:.3g} > 2 x {base:.3g} (PyTorch) + {floor}"


def assert_w8a8_ok(x, qw, bias=None, smooth=None):
    y = qmatmul(x, qw, bias, act_bits=8, backend="triton", smooth=smooth)
    assert y.shape == (*x.shape[:-1], qw.out_features) and y.dtype == x.dtype
    same = qmatmul_reference(x, qw, bias, act_bits=8, smooth=smooth)  # reference in x's dtype
    if not qw.fp8:
        # exact integer accumulation: only the epilogue's float rounding may differ (FMA
        # contraction on the GPU); the interpreter does the same float32 ops in the same order
        if INTERPRETED and x.dtype == torch.float32:
            assert torch.equal(y, same)
        else:
            eps = torch.finfo(x.dtype).eps
            assert (y.double() - same.double()).abs().max() <= 2 * eps * same.double().abs().max() + 1e-30

    def up(t):
        return None if t is None else t.double()

    y64 = qmatmul_reference(x.double(), qw, up(bias), act_bits=8, smooth=up(smooth))
    err, base = max_err(y, y64), max_err(same, y64)
    assert err <= 2 * base + FLOOR[x.dtype], f"max error {err:.3g} > 2 x {base:.3g} + floor"


# --- weight-only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("fmt", [f[1] for f in WO_FORMATS], ids=[f[0] for f in WO_FORMATS])
def test_weight_only_float32(fmt, m):
    n, k = 67, 256
    qw = _weight(n, k, fmt)
    bias = _x(1, n, torch.float32, seed=5)[0] if m % 2 else None
    assert_weight_only_ok(_x(m, k, torch.float32), qw, bias)


@pytest.mark.parametrize(
    "fmt", [WO_FORMATS[0][1], WO_FORMATS[4][1], WO_FORMATS[6][1]], ids=["int8-sym-pc", "int4-asym-g128", "fp8-g32"]
)
def test_weight_only_gemv_dot_tile(fmt):
    """5 <= M < 16: the GEMV multiplies a 16-row padded tile with tl.dot."""
    qw = _weight(67, 256, fmt)
    assert_weight_only_ok(_x(7, 256, torch.float32), qw, _x(1, 67, torch.float32, seed=3)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(
    "fmt", [WO_FORMATS[1][1], WO_FORMATS[4][1], WO_FORMATS[5][1]], ids=["int8-asym-g64", "int4-asym-g128", "fp8-pc"]
)
def test_weight_only_16bit(fmt, m, dtype):
    qw = _weight(67, 256, fmt)
    assert_weight_only_ok(_x(m, 256, dtype), qw, _x(1, 67, torch.float32, seed=4)[0])


@pytest.mark.parametrize("m", [1, 20])
def test_weight_only_k_not_multiple_of_32(m):
    """Per-channel K = 100: masked tails in every K step (int4 and int8)."""
    for kw in (dict(bits=4, group_size=None, symmetric=False), dict(bits=8, symmetric=True)):
        assert_weight_only_ok(_x(m, 100, torch.float32), _weight(67, 100, kw))


@pytest.mark.parametrize("m", [1, 16])
def test_weight_only_small_k(m):
    """K = 64 is smaller than one GEMV split step (BLOCK_K * UNROLL): a single split."""
    assert_weight_only_ok(_x(m, 64, torch.float32), _weight(19, 64, dict(bits=4, group_size=32)))


@pytest.mark.parametrize("m", [3, 20])
def test_weight_only_non_contiguous_x(m):
    qw = _weight(67, 128, dict(bits=4, group_size=32, symmetric=False))
    wide = _x(m, 256, torch.float32)
    assert_weight_only_ok(wide[:, ::2], qw)  # stride 2 along K
    x3 = _x(2 * m * 128, 1, torch.float32).reshape(128, m, 2).permute(2, 1, 0)  # (2, m, 128)
    assert not x3.is_contiguous()
    assert_weight_only_ok(x3, qw, _x(1, 67, torch.float32, seed=9)[0])


@pytest.mark.parametrize("m", [1, 16])
def test_weight_only_smooth(m):
    qw = _weight(67, 128, dict(bits=8, symmetric=True))
    smooth = (torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5).to(DEVICE)
    assert_weight_only_ok(_x(m, 128, torch.float32), qw, smooth=smooth)


def test_empty_batch():
    qw = _weight(67, 64, dict(bits=4))
    for act_bits in (None, 8):
        if act_bits:
            qw = _weight(67, 64, dict(bits=8))
        y = qmatmul(_x(0, 64, torch.float32), qw, act_bits=act_bits, backend="triton")
        assert y.shape == (0, 67)


# --- W8A8 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 7, 16, 33])
@pytest.mark.parametrize("fmt", [f[1] for f in W8A8_FORMATS], ids=[f[0] for f in W8A8_FORMATS])
def test_w8a8_float32(fmt, m):
    n, k = 67, 256
    qw = _weight(n, k, fmt)
    bias = _x(1, n, torch.float32, seed=6)[0] if m % 2 else None
    smooth = (torch.rand(k, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEVICE) if m in (3, 16) else None
    assert_w8a8_ok(_x(m, k, torch.float32), qw, bias, smooth)


@pytest.mark.parametrize("m", [3, 33])
@pytest.mark.parametrize("fmt", [W8A8_FORMATS[1][1], W8A8_FORMATS[2][1]], ids=["int8-asym", "fp8"])
def test_w8a8_bfloat16(fmt, m):
    qw = _weight(67, 256, fmt)
    assert_w8a8_ok(_x(m, 256, torch.bfloat16), qw, _x(1, 67, torch.float32, seed=7)[0])


def _tie_rows(k, dtype):
    """Rows whose x / s_x land exactly on .5 (ties), zero rows, -0.0, tiny and huge values."""
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(4)) * 3
    x[0] = torch.arange(k) * 0.5 - k / 4
    x[0, 0] = 127.0  # s_x = 1: every x / s_x is an exact half step
    x[1] = 0
    x[2, :5] = -0.0
    x[3] = x[3] * 1e-30
    x[4, 7] = 1e4
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_quant_int8_bit_identical(dtype):
    x = _tie_rows(300, dtype).to(DEVICE)
    for smooth in (None, (torch.rand(300, generator=torch.Generator().manual_seed(5)) + 0.5)):
        xs = x.float() if smooth is None else x.float() / smooth.to(DEVICE)
        xq, sx, rowsum = T.quantize_activations(x, smooth=None if smooth is None else smooth.to(DEVICE))
        want_q, want_s = R.quantize_activations(xs)
        assert xq.dtype == torch.int8 and torch.equal(xq, want_q)
        assert torch.equal(sx, want_s)
        assert torch.equal(rowsum, want_q.to(torch.int32).sum(1))


def test_activation_quant_fp8_bit_identical():
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = torch.sort(torch.unique(grid[torch.isfinite(grid)])).values
    mids = ((grid[:-1].double() + grid[1:].double()) / 2).float()  # ties between neighbours
    g = torch.Generator().manual_seed(6)
    row = torch.cat(
        [
            torch.tensor([448.0, -0.0, 0.0]),
            grid,
            mids,
            torch.linspace(-448, 448, 4001),
            torch.randn(2000, generator=g) * 1e-2,
        ]
    )
    x = torch.stack([row, row * 3.7, torch.randn(row.numel(), generator=g)])  # s_x 1, 3.7, other
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype).to(DEVICE)
        xq, sx, _ = T.quantize_activations(xd, fp8=True)
        want_q, want_s = R.quantize_activations_fp8(xd.float())
        assert xq.dtype == FP8_DTYPE
        assert torch.equal(xq.view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(sx, want_s)


# --- dispatch, configs, compile targets -------------------------------------------------------------


def test_dispatch_reasons():
    qw = _weight(8, 64, dict(bits=4))
    x64 = torch.randn(2, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(_dispatch.NoBackendError, match="triton: x dtype float64 not supported"):
        qmatmul(x64, qw, backend="triton")
    reasons = {b.name: b.reasons(_call(qw, "float32")) for b in _dispatch.backends_for("qmatmul")}
    assert "triton" in reasons and "cuda" in reasons
    if not GPU:
        assert any("mmkernels._cuda" in r or "CUDA" in r for r in reasons["cuda"])
    call8 = _call(_weight(8, 64, dict(bits=8)), "bfloat16", act_bits=8)
    from mmkernels.quant import cuda as C

    assert any("act_bits" in r for r in C.unsupported(call8))
    assert any("int8" in r for r in C.unsupported(call8))


def _call(qw, dtype_name, act_bits=0):
    from mmkernels.quant.api import QMatmulCall

    return QMatmulCall(DEVICE, dtype_name, qw.bits, qw.group_size or 0, qw.symmetric, act_bits, False, qw.fp8)


def test_every_selectable_config_is_a_compile_target():
    """Whatever select_config answers on sm_80 / sm_90 for any shape class is compiled by the gate."""
    targets = T.compile_targets((80, 90))
    have = {
        (t.kernel, t.capability, t.dtype, tuple(sorted(t.constexprs.items())), t.num_warps, t.num_stages)
        for t in targets
    }
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for cc in (80, 90):
        for m in (1, 2, 4, 5, 15, 16, 64, 65, 4096):
            for dt in T.SUPPORTED_DTYPES:
                for fmt in (T.FMT_INT8, T.FMT_INT4, T.FMT_FP8):
                    for gs in (32, 64, 128, 4096):
                        kind = "wo_gemm" if m > T.GEMV_MAX_M else "wo_gemv"
                        cfg = T.select_config(kind, m, 4096, 4096, dt, cc, gs, fmt)
                        consts = dict(
                            stride_xk=1, W_FMT=fmt, UPCAST=False, PRECISION=T.dot_precision(dt, False), **T._blocks(cfg)
                        )
                        if kind == "wo_gemv":
                            consts["USE_DOT"] = cfg["BLOCK_M"] >= 16
                        key = (
                            "_" + kind + "_kernel",
                            cc,
                            names[dt],
                            tuple(sorted(consts.items())),
                            cfg["num_warps"],
                            cfg["num_stages"],
                        )
                        assert key in have, key
    kinds = {t.kernel for t in targets}
    assert kinds == {
        "_wo_gemm_kernel",
        "_wo_gemv_kernel",
        "_splitk_reduce_kernel",
        "_act_quant_kernel",
        "_w8a8_gemm_kernel",
        "_w8a8_gemv_kernel",
    }
    assert len(targets) == 2 * 87
    assert all(t.needs_tensor_cores for t in targets if "gemm" in t.kernel)


def test_split_k_covers_k_exactly():
    for n, k, bn, step, sms in [
        (67, 256, 32, 64, 2),
        (4096, 4096, 64, 128, 132),
        (11008, 4096, 64, 128, 108),
        (64, 96, 64, 64, 132),
    ]:
        splits, per = T.split_k(n, k, bn, step, sms)
        assert per % step == 0 and splits >= 1
        assert (splits - 1) * per < k <= splits * per  # no empty split, K covered


# --- GPU (compiled kernels at layer shapes; skipped without CUDA) -----------------------------------

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4, 8, 15, 16, 128, 512])
@pytest.mark.parametrize("fmt", [f[1] for f in WO_FORMATS], ids=[f[0] for f in WO_FORMATS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_triton_weight_only_layer_shapes(dtype, fmt, m):
    for n, k in GPU_SHAPES[:2]:
        qw = _weight(n, k, fmt)
        assert_weight_only_ok(_x(m, k, dtype), qw, _x(1, n, torch.float32, seed=2)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16, 256])
@pytest.mark.parametrize("fmt", [f[1] for f in W8A8_FORMATS], ids=[f[0] for f in W8A8_FORMATS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_triton_w8a8_layer_shapes(dtype, fmt, m):
    n, k = GPU_SHAPES[0]
    assert_w8a8_ok(_x(m, k, dtype), _weight(n, k, fmt), _x(1, n, torch.float32, seed=8)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_activation_quant_bit_identical(dtype):
    x = (torch.randn(64, 4096) * 4).to(dtype).cuda()
    xq, sx, _ = T.quantize_activations(x)
    want_q, want_s = R.quantize_activations(x.float())
    assert torch.equal(xq, want_q) and torch.equal(sx, want_s)
    fq, fsx, _ = T.quantize_activations(x, fp8=True)
    want_fq, want_fs = R.quantize_activations_fp8(x.float())
    assert torch.equal(fq.view(torch.uint8), want_fq.view(torch.uint8)) and torch.equal(fsx, want_fs)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("group_size,symmetric", [(None, True), (32, True), (64, False), (128, False), (128, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_qgemv_int4(dtype, group_size, symmetric):
    from mmkernels.quant import cuda as C

    ok, why = C.availability()
    if not ok:
        pytest.skip(why)
    kw = dict(bits=4, group_size=group_size, symmetric=symmetric)
    shapes = GPU_SHAPES[:2] + ([(67, 1000)] if group_size is None else [])  # K % 32 != 0: byte path
    for n, k in shapes:
        qw = _weight(n, k, kw)
        for m in range(1, 9):
            x = _x(m, k, dtype)
            bias = _x(1, n, torch.float32, seed=m)[0]
            y = qmatmul(x, qw, bias, backend="cuda")
            y64 = qmatmul_reference(x.double(), qw, bias.double())
            err, base = max_err(y, y64), max_err(_linear_same_precision(x, qw, bias, None), y64)
            assert err <= 2 * base + FLOOR[dtype], (n, k, m, err, base)
    # larger M goes to the Triton GEMM; auto-selection picks cuda for int4 fp16 / bf16 on the GPU
    qw = _weight(4096, 4096, kw)
    assert_weight_only_ok(_x(33, 4096, dtype), qw, backend="cuda")
    assert _dispatch.select("qmatmul", _call(qw, str(dtype).replace("torch.", "")), "cuda").name == "cuda"
