"""NaN / inf semantics of ``mmkernels.qmatmul`` (docs/nan_semantics.md), the same on every backend.

* W8A8 (int8 sym / asym, fp8): a row of ``x / smooth`` holding a NaN or +-inf has the per-token
  scale NaN, so its output row is NaN (every column, bias or not); the other rows are untouched.
* Weight-only: IEEE arithmetic of ``(x / smooth) @ W_hat.T``: a NaN in a row makes that output
  row NaN; +-inf gives +-inf or NaN (0 * inf, inf - inf) exactly where the float64 reference has them.
* A zero in ``smooth`` divides by zero like any other value: W8A8 rows all NaN; weight-only the
  IEEE pattern of the reference. Every backend gives the same result (no error: checking the
  values would cost a host sync per call).

Backends: reference; cpu on each ISA path this CPU runs (MMKERNELS_CPU_ISA); triton in the
interpreter. M = 3 takes the GEMV / row-dot kernels, M = 33 the GEMM kernels. conftest sets
MMKERNELS_DEBUG_POISON=1 (outputs start as NaN: an unwritten element fails the checks).
"""

import pytest
import torch

from mmkernels.quant import qmatmul, qmatmul_reference, quantize_weight

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN on purpose


EVERY_CPU_ISA = True  # conftest's backend fixture: the cpu backend once per ISA path


DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]
W8A8 = [
    pytest.param(dict(bits=8, symmetric=True), id="int8-sym"),
    pytest.param(dict(bits=8, symmetric=False), id="int8-asym"),
    pytest.param(dict(bits=8, fp8=True), id="fp8"),
]
WEIGHT_ONLY = [
    pytest.param(dict(bits=8, group_size=None), id="int8-pc"),
    pytest.param(dict(bits=4, group_size=32), id="int4-g32"),
    pytest.param(dict(bits=4, group_size=None, symmetric=False), id="int4-asym-pc"),
]
N, K = 67, 96


def weight(kw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(N, K, generator=g), **kw)


def x_rows(m, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, K, generator=g).to(dtype)


def skip_unsupported(backend, kw):
    if backend.name == "cpu" and kw.get("fp8"):
        pytest.skip("fp8 weights have no CPU kernel")


def assert_close(got, want, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.double().abs().max().item()), f"max error {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", W8A8)
@pytest.mark.parametrize("m", [3, 33])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_w8a8_nonfinite_row_is_nan(backend, dtype, kw, m, with_bias):
    skip_unsupported(backend, kw)
    qw = weight(kw)
    bias = torch.randn(N) if with_bias else None
    x = x_rows(m, dtype)
    x[1, 5] = NAN
    x[2, 0] = INF
    x[m - 1, K - 1] = -INF
    got = qmatmul(x, qw, bias, act_bits=8, backend=backend.name)
    bad = torch.zeros(m, dtype=torch.bool)
    bad[[1, 2, m - 1]] = True
    assert got.isnan().all(1).equal(bad) and not got[~bad].isnan().any()
    clean = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    assert_close(got[~bad], qmatmul_reference(clean, qw, bias, 8)[~bad], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", W8A8)
def test_w8a8_smooth_zero(backend, dtype, kw):
    """A zero smoothing factor divides by zero: every row gets a +-inf / NaN, so every row is NaN."""
    skip_unsupported(backend, kw)
    qw = weight(kw)
    smooth = torch.rand(K) + 0.5
    smooth[7] = 0.0
    x = x_rows(5, dtype)
    x[2, 7] = 0.0  # 0 / 0: NaN
    got = qmatmul(x, qw, None, act_bits=8, backend=backend.name, smooth=smooth)
    assert got.isnan().all()
    # a NaN factor too, and a finite one elsewhere stays finite
    smooth[7] = 1.0
    smooth[9] = NAN
    assert qmatmul(x, qw, None, act_bits=8, backend=backend.name, smooth=smooth).isnan().all()


def ieee_pattern(t):
    t = t.double()
    return torch.stack([t.isnan(), t == INF, t == -INF])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", WEIGHT_ONLY)
@pytest.mark.parametrize("m", [3, 33])
def test_weight_only_ieee(backend, dtype, kw, m):
    qw = weight(kw)
    x = x_rows(m, dtype)
    x[1, 5] = NAN
    x[2, 4] = INF
    x[m - 1, 17] = -INF
    got = qmatmul(x, qw, None, backend=backend.name)
    want = qmatmul_reference(x.double(), qw)
    assert got[1].isnan().all()
    assert torch.equal(ieee_pattern(got), ieee_pattern(want))
    ok = torch.isfinite(want)
    clean = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    assert_close(got[ok], qmatmul_reference(clean.double(), qw)[ok], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 33])
def test_weight_only_smooth_zero(backend, dtype, m):
    qw = weight(dict(bits=4, group_size=32))
    smooth = torch.rand(K) + 0.5
    smooth[7] = 0.0
    x = x_rows(m, dtype)
    x[0, 7] = 0.0  # 0 / 0: a NaN row
    got = qmatmul(x, qw, None, backend=backend.name, smooth=smooth)
    want = qmatmul_reference(x.double(), qw, None, None, smooth.double())
    assert got[0].isnan().all() and torch.isinf(got[1:]).any()
    assert torch.equal(ieee_pattern(got), ieee_pattern(want))
