"""mmkernels.linear's CPU kernel (mmkernels_C::linear_f32 on the weight-only GEMM's micro-kernels,
mmkernels/linear/cpu.py) against the float64 oracle, on every ISA path this CPU can run (forced with
MMKERNELS_CPU_ISA; the same paths as qmatmul's, whose kernels it shares).

Tolerance (tests/oracle.py's rule): max |cpu - oracle| <= 2 * max |torch float32 - oracle| + a
small floor. conftest sets MMKERNELS_DEBUG_POISON=1: outputs are NaN-filled before the kernel runs.
"""

import pytest
import torch

import mmkernels
from mmkernels._extension import CPU as _EXT
from mmkernels.linear import cpu as lcpu
from mmkernels.linear import linear_reference
from mmkernels.quant import cpu as qcpu

from backend_params import cpu_isa_paths
from oracle import FLOOR, max_err

_OK, _WHY = _EXT.availability(lcpu.REQUIRED_OP)
if not _OK:
    pytest.skip(f"mmkernels._C has no linear kernel: {_WHY}", allow_module_level=True)

ISAS = cpu_isa_paths("quant")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", request.param)
    assert qcpu.cpu_isa() == request.param
    return request.param


def check(x, w, bias=None, activation=None):
    got = mmkernels.linear(x, w, bias, backend="cpu", activation=activation)
    assert got.dtype == torch.float32 and got.shape == (*x.shape[:-1], w.shape[0])
    assert not torch.isnan(got).any(), "NaN in the output (an element was not written)"
    exact = linear_reference(x.double(), w.double(), None if bias is None else bias.double(), activation)
    same = linear_reference(x, w, bias, activation)
    err, base = max_err(got, exact), max_err(same, exact)
    floor = FLOOR[torch.float32] * max(1.0, exact.abs().max().item())
    assert err <= 2 * base + floor, f"max error {err:.3g} > 2 x {base:.3g} (torch float32) + {floor:.3g}"
    return got


# M: 1 (one row), tails of the 6-row register tile, > one 192-row item; K: below / across the
# 256-feature panel blocks, odd; N: below / across / not a multiple of the 64-channel strip.
SIZES = [
    (1, 1, 1),
    (1, 384, 384),
    (2, 45, 70),
    (5, 257, 63),
    (6, 256, 64),
    (7, 513, 65),
    (13, 3, 129),
    (17, 300, 200),
    (64, 96, 1),
    (193, 130, 131),
    (400, 64, 256),
]


@pytest.mark.parametrize("m,k,n", SIZES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle(isa, m, k, n, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    check(x, w, bias)


def test_leading_dims_and_views(isa):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(3, 41, 150, generator=g)
    x = wide[:, :, 7:107]  # stride(1) == 1, row stride 150: read in place
    w_big = torch.randn(90, 2 * 100, generator=g)
    w = w_big[:, ::2]  # a non-contiguous weight is packed from its strides
    bias = torch.randn(180, generator=g)[::2]
    check(x, w, bias)
    check(x.transpose(0, 1), w)  # 3-D, not viewable as (M, K): copied
    xt = torch.randn(100, 30, generator=g).T  # stride(-1) != 1: copied
    check(xt, w)
    check(torch.randn(1, 100, generator=g).expand(20, 100), w)  # row stride 0


def test_empty_sizes(isa):
    w, b = torch.randn(5, 4), torch.randn(5)
    assert mmkernels.linear(torch.randn(0, 4), w, b, backend="cpu").shape == (0, 5)
    assert mmkernels.linear(torch.randn(3, 4), torch.randn(0, 4), backend="cpu").shape == (3, 0)
    # K = 0: the empty sum, i.e. the bias (or zeros)
    got = mmkernels.linear(torch.randn(3, 0), torch.randn(5, 0), b, backend="cpu")
    assert torch.equal(got, b.expand(3, 5))
    assert torch.equal(mmkernels.linear(torch.randn(3, 0), torch.randn(5, 0), backend="cpu"), torch.zeros(3, 5))


def test_nan_and_inf_follow_ieee(isa):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 70, generator=g), torch.randn(66, 70, generator=g)
    x[2, 5] = float("nan")
    x[4, 9] = float("inf")
    w[3, 11] = float("nan")
    got = mmkernels.linear(x, w, backend="cpu")
    want = linear_reference(x, w)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isnan(got[2]).all() and torch.isnan(got[:, 3]).all()


ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "quick_gelu", "silu"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m,k,n", [(1, 37, 70), (7, 513, 65), (13, 300, 129), (193, 130, 131)])
def test_activation_matches_oracle(isa, activation, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    # pre-activations of a few units either side of 0, where the activations bend
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * (3 / k**0.5)
    check(x, w, torch.randn(n, generator=g), activation)
    check(x, w, None, activation)


# pre-activation -> output; sigmoid-type activations and gelu: +inf -> +inf, -inf -> NaN (the
# formulas' inf * 0; torch's vectorised float32 gelu gives NaN at +inf, ours its limit +inf); relu: -inf -> 0.
SPECIAL = [float("-inf"), float("inf"), float("nan"), -100.0, -20.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 1e30]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_special_values(isa, activation):
    v = torch.tensor(SPECIAL)
    # K = 1, weight 1: each row's pre-activation is exactly v (16 channels: one vector, lanes equal)
    got = mmkernels.linear(v[:, None], torch.ones(16, 1), backend="cpu", activation=activation)
    torch.testing.assert_close(got, got[:, :1].expand(-1, 16), rtol=0, atol=0, equal_nan=True)
    got = got[:, 0]
    exact = linear_reference(v[:, None].double(), torch.ones(1, 1, dtype=torch.float64), None, activation)[:, 0]
    nan_in = torch.isnan(v) | ((v == float("-inf")) & (activation != "relu"))
    assert torch.equal(torch.isnan(got), nan_in), got
    assert got[1] == float("inf") and (got[0] == 0 if activation == "relu" else True)
    finite = torch.isfinite(v)
    # atol: the erf approximation's absolute error (torch's float32 gelu is off by 2.4e-7 at -5)
    torch.testing.assert_close(got[finite].double(), exact[finite], rtol=2e-6, atol=3e-8)


def test_activation_of_the_empty_sum_is_the_activated_bias():
    b = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    for activation in ACTIVATIONS:
        got = mmkernels.linear(torch.randn(3, 0), torch.randn(5, 0), b, backend="cpu", activation=activation)
        want = linear_reference(
            torch.zeros(3, 0, dtype=torch.float64), torch.zeros(5, 0, dtype=torch.float64), b.double(), activation
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_in_place_weight_change_is_seen():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(20, 33, generator=g), torch.randn(40, 33, generator=g)
    first = mmkernels.linear(x, w, backend="cpu")
    assert lcpu._packed_cache.is_cached(w)
    with torch.no_grad():
        w.mul_(-2.0)
    second = mmkernels.linear(x, w, backend="cpu")
    torch.testing.assert_close(second, -2.0 * first, rtol=1e-5, atol=1e-5)


def test_numpy_write_needs_clear_caches():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(20, 33, generator=g), torch.randn(40, 33, generator=g)
    mmkernels.linear(x, w, backend="cpu")
    w.numpy()[:] = 0.0  # bypasses the version counter: not seen ...
    assert mmkernels.linear(x, w, backend="cpu").abs().sum() > 0
    mmkernels.clear_caches()  # ... until the caches are cleared
    assert torch.equal(mmkernels.linear(x, w, backend="cpu"), torch.zeros(20, 40))


def test_cache_entry_dies_with_its_weight():
    import gc

    before = lcpu._packed_cache.size()
    w = torch.randn(40, 33)
    mmkernels.linear(torch.randn(20, 33), w, backend="cpu")
    assert lcpu._packed_cache.size() == before + 1
    del w
    gc.collect()
    assert lcpu._packed_cache.size() == before


def test_op_refuses_bad_arguments():
    ops = torch.ops.mmkernels_C
    w = torch.randn(70, 45)
    packed = ops.linear_prepack(w)
    assert packed.shape == (2, 45, 64)
    assert torch.equal(packed[1, :, 6:], torch.zeros(45, 58))  # padding channels
    x, out = torch.randn(5, 45), torch.empty(5, 70)
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear_f32(x, packed[:1], None, out, 0)  # too few strips for N
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.linear_f32(torch.randn(5, 44), packed, None, out, 0)  # K differs from the packed weight
    with pytest.raises(RuntimeError, match="x2 must be"):
        ops.linear_f32(x.double(), packed, None, out, 0)
    with pytest.raises(RuntimeError, match="x2 must be"):
        ops.linear_f32(torch.randn(45, 5).T, packed, None, out, 0)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.linear_f32(x, packed, None, torch.empty(70, 5).T, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear_f32(x, packed, torch.randn(69), out, 0)
    with pytest.raises(RuntimeError, match="act must be"):
        ops.linear_f32(x, packed, None, out, 6)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.linear_prepack(w.double())


def test_empty_sizes_with_leading_dims_and_their_gradients():
    got = mmkernels.linear(torch.randn(2, 3, 0), torch.randn(5, 0), torch.ones(5), backend="cpu")
    assert torch.equal(got, torch.ones(2, 3, 5))
    assert mmkernels.linear(torch.randn(2, 0, 4), torch.randn(5, 4), backend="cpu").shape == (2, 0, 5)
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(0, 4, requires_grad=True)
    mmkernels.linear(x, w, backend="cpu").sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 3, 4)) and w.grad.shape == (0, 4)


def test_output_follows_x_not_the_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, w = torch.randn(20, 33, dtype=torch.float32), torch.randn(40, 33, dtype=torch.float32)
        check(x, w)
    finally:
        torch.set_default_dtype(old)


def test_data_writes_need_clear_caches():
    layer = torch.nn.Linear(33, 40)
    x = torch.randn(20, 33)
    before = mmkernels.linear(x, layer.weight, layer.bias, backend="cpu")
    layer.weight.data.mul_(-1.0)  # `.data` has its own version counter: not seen ...
    assert torch.equal(mmkernels.linear(x, layer.weight, layer.bias, backend="cpu"), before)
    mmkernels.clear_caches()  # ... until the caches are cleared (documented: mmkernels.clear_caches)
    torch.testing.assert_close(
        mmkernels.linear(x, layer.weight, layer.bias, backend="cpu"),
        torch.nn.functional.linear(x, layer.weight, layer.bias),
        rtol=1e-5,
        atol=1e-5,
    )
    assert ".data" in mmkernels.clear_caches.__doc__
