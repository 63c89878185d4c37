"""The ``torch`` qmatmul backend (W8A8 int8 through torch._int_mm): equal to the reference bit for
bit, as our kernels are; what it refuses and why; the auto-selection rule per CPU class
(monkeypatched: never a timing)."""

import pytest
import torch

import mmkernels
from mmkernels import _dispatch
from mmkernels.quant import reference as R
from mmkernels.quant.api import QMatmulCall
from mmkernels.quant.quantize import quantize_weight

NAN, INF = float("nan"), float("inf")
BACKENDS = {b.name: b for b in _dispatch.backends_for("qmatmul")}


def _bits(t):
    """The raw bits (NaN == NaN, -0.0 != 0.0): bit-identity, not closeness."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _reference(x, qw, bias=None, smooth=None):
    return R.qmatmul_tensors(x, qw.qweight, qw.scales, qw.zeros, qw.bits, bias, 8, smooth)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (5, 70, 37), (33, 257, 65), (0, 32, 16)])
def test_bit_identical_to_the_reference(symmetric, dtype, m, k, n):
    qw = quantize_weight(torch.randn(n, k), 8, None, symmetric)
    x = (torch.randn(3, m, k) * 4).to(dtype)
    bias, smooth = torch.randn(n), torch.rand(k) + 0.5
    if m > 1:
        x[0, 1] = 0  # an all-zero row: scale 1
    for b, s in ((None, None), (bias, None), (bias, smooth)):
        got = mmkernels.qmatmul(x, qw, b, act_bits=8, smooth=s, backend="torch")
        assert got.dtype == dtype and got.shape == (3, m, n)
        assert torch.equal(_bits(got), _bits(_reference(x, qw, b, s)))


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_rows_are_nan_rows(value):
    """docs/nan_semantics.md: a row of x / smooth with a NaN or inf has a NaN scale: its output row
    is NaN, the other rows are untouched (and equal to the reference)."""
    qw = quantize_weight(torch.randn(24, 48), 8, None, False)
    x = torch.randn(4, 48)
    x[2, 7] = value
    got = mmkernels.qmatmul(x, qw, act_bits=8, backend="torch")
    assert got[2].isnan().all() and not got[[0, 1, 3]].isnan().any()
    assert torch.equal(_bits(got), _bits(_reference(x, qw)))


def test_refuses_what_it_does_not_serve():
    torch_backend = BACKENDS["torch"]
    wo = QMatmulCall("cpu", "float32", 4, 128, False, 0, False)
    reasons = torch_backend.reasons(wo)
    assert any("int4 weights are not served" in r for r in reasons)
    assert any("grouped scales" in r for r in reasons)
    assert any("weight-only calls are not served" in r for r in reasons)
    fp8 = QMatmulCall("cpu", "float64", 8, 0, True, 8, False, True)
    assert [r for r in torch_backend.reasons(fp8) if "float64" in r or "fp8" in r] == [
        "float64 is the reference's (the test oracle)",
        "fp8 weights are not served (the reference serves them)",
    ]
    qw = quantize_weight(torch.randn(8, 64), 8)
    with pytest.raises(_dispatch.NoBackendError, match="weight-only calls are not served"):
        mmkernels.qmatmul(torch.randn(2, 64), qw, backend="torch")


@pytest.mark.skipif(not BACKENDS["cpu"].availability()[0], reason="the rule compares with the cpu backend")
@pytest.mark.parametrize("klass", ["avx512", "amx"])
def test_our_w8a8_kernel_stays_the_choice_torch_takes_what_it_cannot(cpu_class, klass, recwarn):
    """Our VNNI W8A8 beats eager torch._int_mm W8A8 on both CPU classes: torch is chosen only for
    the W8A8 calls the cpu kernel cannot take (none of float32 / bfloat16 / float16 x since the cpu
    kernel took float16), where it beats the reference."""
    cpu_class(klass)
    for dtype in ("float32", "bfloat16", "float16"):
        for sym, smooth in ((True, False), (False, True)):
            call = QMatmulCall("cpu", dtype, 8, 0, sym, 8, smooth)
            assert _dispatch.select("qmatmul", call, "cpu").name == "cpu"
    # weight-only float16 goes to the cpu kernel too; float64 to the reference
    assert _dispatch.select("qmatmul", QMatmulCall("cpu", "float16", 4, 128, True, 0, False), "cpu").name == "cpu"
    assert _dispatch.select("qmatmul", QMatmulCall("cpu", "float64", 8, 0, True, 8, False), "cpu").name == "reference"
    chosen, trail = _dispatch.auto_choice("qmatmul", QMatmulCall("cpu", "float32", 8, 0, True, 8, False), "cpu")
    assert chosen.name == "cpu" and "our VNNI W8A8 kernel is faster" in dict(trail)["torch"]
