"""Every qmatmul backend against the float64 oracle, the same tests for all of them (conftest's
``backend`` fixture: each backend the dispatch registry holds for qmatmul; one that is unavailable
here is a skipped param with its reason).

Weight-only, tests/oracle.py's 2x rule: ``|y - y64| <= 2 |y_same - y64| + floor`` with ``y64`` the
reference in float64 and ``y_same`` the same layer in PyTorch in x's precision
(``F.linear(x, W_hat.to(dtype), bias)``). W8A8: the activations are quantized per token in x's
dtype, so the comparison point is the reference in x's dtype (equal up to the output's final
rounding), and the 2x rule against float64 holds too. A backend may decline only what it declares
it does not serve (fp8 weights on the cpu backend; the cuda GEMV's int4 weight-only 16-bit scope;
a peer's narrower scope): that case skips with the declared reason, any other refusal fails.
Kernel-specific paths (ISA paths, tiles, split-K, caches) are tested in each backend's kernel file
(test_quant_cpu_kernel.py, test_quant_triton_kernel.py).
"""

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.quant import qmatmul, qmatmul_reference, quantize_weight
from mmkernels._activations import apply_activation
from mmkernels.quant.packing import is_fp8

from oracle import FLOOR, max_err

WEIGHT_ONLY = [
    pytest.param(dict(bits=8, group_size=None, symmetric=True), id="int8-sym-pc"),
    pytest.param(dict(bits=8, group_size=64, symmetric=False), id="int8-asym-g64"),
    pytest.param(dict(bits=4, group_size=None, symmetric=True), id="int4-sym-pc"),
    pytest.param(dict(bits=4, group_size=32, symmetric=True), id="int4-sym-g32"),
    pytest.param(dict(bits=4, group_size=128, symmetric=False), id="int4-asym-g128"),
    pytest.param(dict(bits=8, group_size=None, fp8=True), id="fp8-pc"),
]
W8A8 = [
    pytest.param(dict(bits=8, symmetric=True), id="int8-sym"),
    pytest.param(dict(bits=8, symmetric=False), id="int8-asym"),
    pytest.param(dict(bits=8, fp8=True), id="fp8"),
]
DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]
M_VALUES = (1, 3, 16, 33)  # GEMV / row-dot paths below 16 rows, GEMM paths from 16


def _weight(n, k, kw, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0.5, n)[:, None]  # rows of many scales
    w[2] = 0  # an all-zero row
    return quantize_weight(w, **kw).to(device)


def _up(t):
    return None if t is None else t.double()


def _out_of_declared_scope(backend, x, qw, act_bits) -> bool:
    """Calls a backend declares it does not serve (mmkernels/quant/backends.py): only these may be
    refused; any other refusal of our own backends fails the test."""
    if backend.name == "cpu":
        return is_fp8(qw.qweight)
    if backend.name == "cuda":
        return not (qw.bits == 4 and act_bits is None and x.dtype in (torch.float16, torch.bfloat16))
    return backend.name not in ("reference", "triton")  # peers with a narrower scope (torch)


def _run(backend, x, qw, bias=None, smooth=None, act_bits=None, activation=None):
    try:
        y = qmatmul(x, qw, bias, act_bits=act_bits, backend=backend.name, smooth=smooth, activation=activation)
    except mmkernels.NoBackendError as e:
        if not _out_of_declared_scope(backend, x, qw, act_bits):
            raise
        pytest.skip(f"{backend.name} declares it does not serve this call: {e}")
    assert y.shape == (*x.shape[:-1], qw.out_features) and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "NaN in the output (an element was not written)"
    return y


def check_weight_only(backend, x, qw, bias=None, smooth=None, activation=None):
    y = _run(backend, x, qw, bias, smooth, activation=activation)
    y64 = qmatmul_reference(x.double(), qw, _up(bias), smooth=_up(smooth), activation=activation)
    xs = x if smooth is None else (x.float() / smooth.float()).to(x.dtype)
    same = F.linear(xs, qw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
    same = apply_activation(same, activation)
    err, base = max_err(y, y64), max_err(same, y64)
    floor = FLOOR[x.dtype] * max(1.0, y64.abs().max().item())
    assert err <= 2 * base + floor, f"max error {err:.3g} > 2 x {base:.3g} (PyTorch {x.dtype}) + {floor:.3g}"


def check_w8a8(backend, x, qw, bias=None, smooth=None, activation=None):
    y = _run(backend, x, qw, bias, smooth, act_bits=8, activation=activation)
    same = qmatmul_reference(x, qw, bias, act_bits=8, smooth=smooth, activation=activation)  # in x's dtype
    eps = torch.finfo(x.dtype).eps
    assert max_err(y, same) <= 2 * eps * same.double().abs().max().item() + 1e-30, (
        f"W8A8 differs from the reference in {x.dtype} by {max_err(y, same):.3g}"
    )
    y64 = qmatmul_reference(x.double(), qw, _up(bias), act_bits=8, smooth=_up(smooth), activation=activation)
    err, base = max_err(y, y64), max_err(same, y64)
    assert err <= 2 * base + FLOOR[x.dtype], f"max error {err:.3g} > 2 x {base:.3g} + floor"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", WEIGHT_ONLY)
def test_weight_only(backend, kw, dtype):
    n, k = 67, 256  # odd N
    dev = backend.device
    qw = _weight(n, k, kw, dev)
    bias, smooth = torch.randn(n, device=dev), torch.rand(k, device=dev) + 0.5
    for i, m in enumerate(M_VALUES):
        x = torch.randn(m, k).to(dtype).to(dev)
        check_weight_only(backend, x, qw, bias if i % 2 == 0 else None, smooth if i % 3 == 1 else None)


@pytest.mark.parametrize(
    "kw, k",
    [(dict(bits=8, group_size=None), 97), (dict(bits=4, group_size=None), 98), (dict(bits=4, group_size=32), 160)],
    ids=["int8-pc-k97", "int4-pc-k98", "int4-g32-k160"],
)
def test_weight_only_k_not_a_multiple_of_64(backend, kw, k):
    qw = _weight(31, k, kw, backend.device)
    for m in (1, 20):
        check_weight_only(backend, torch.randn(m, k).to(backend.device), qw, torch.randn(31, device=backend.device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_layouts(backend, dtype):
    """A transposed, sliced view of x and a 3-D x: any strides, any leading dimensions."""
    dev = backend.device
    n, k = 33, 128
    qw = _weight(n, k, dict(bits=4, group_size=64, symmetric=True), dev)
    for m in (3, 17):
        view = torch.randn(k, 2 * m).to(dtype).to(dev).t()[::2]
        assert not view.is_contiguous()
        check_weight_only(backend, view, qw, torch.randn(n, device=dev))
        check_weight_only(backend, torch.randn(2, m, k).to(dtype).to(dev), qw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", W8A8)
def test_w8a8(backend, kw, dtype):
    n, k = 67, 256
    dev = backend.device
    qw = _weight(n, k, kw, dev)
    bias, smooth = torch.randn(n, device=dev), torch.rand(k, device=dev) + 0.5
    for i, m in enumerate(M_VALUES):
        x = (torch.randn(m, k) * 3).to(dtype)
        x[0, : k // 2] = 0
        if m > 1:
            x[1] = 0  # an all-zero token
        check_w8a8(backend, x.to(dev), qw, bias if i % 2 else None, smooth if i == 2 else None)


def test_w8a8_layouts(backend):
    dev = backend.device
    n, k = 31, 128
    qw = _weight(n, k, dict(bits=8, symmetric=False), dev)
    for m in (1, 20):
        view = torch.randn(k, 3 * m).to(dev).t()[1::3]
        check_w8a8(backend, view, qw, torch.randn(n, device=dev))
        check_w8a8(backend, torch.randn(2, m, k).to(dev), qw)


ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "quick_gelu", "silu"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_activation_weight_only(backend, activation, dtype):
    """The activation in the epilogue (or after the call), on the row-dot and GEMM paths, against
    the float64 oracle with the activation."""
    n, k = 67, 256
    dev = backend.device
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(n, generator=g).to(dev)
    for kw in (dict(bits=8, group_size=None), dict(bits=4, group_size=32)):
        qw = _weight(n, k, kw, dev)
        for i, m in enumerate(M_VALUES):
            x = (torch.randn(m, k, generator=g) * 0.3).to(dtype).to(dev)  # outputs of a few units
            check_weight_only(backend, x, qw, bias if i % 2 == 0 else None, activation=activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_activation_w8a8(backend, activation, dtype):
    n, k = 67, 256
    dev = backend.device
    g = torch.Generator().manual_seed(5)
    qw = _weight(n, k, dict(bits=8, symmetric=True), dev)
    for m in (1, 33):
        x = (torch.randn(m, k, generator=g) * 0.3).to(dtype).to(dev)
        check_w8a8(backend, x, qw, torch.randn(n, generator=g).to(dev), activation=activation)


@pytest.mark.parametrize("act_bits", [None, 8], ids=["weight-only", "w8a8"])
def test_empty_batch(backend, act_bits):
    qw = _weight(9, 64, dict(bits=8), backend.device)
    for shape in ((0, 64), (2, 0, 64)):
        y = _run(backend, torch.randn(*shape, device=backend.device), qw, act_bits=act_bits)
        assert y.shape == (*shape[:-1], 9)
