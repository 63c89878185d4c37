"""GPTQ (mmkernels.compress.gptq): better than RTN on held-out inputs of a layer with correlated
inputs, valid QuantizedWeight, act-order round trip through QuantLinear, determinism."""

import pytest
import torch

from mmkernels.nn import QuantLinear
from mmkernels.compress import Hessian, gptq_quantize
from mmkernels.quant import quantize_weight
from mmkernels.quant.packing import qrange, unpack_weight

K, N = 256, 96


def correlated_inputs(m, seed):
    """Rows of a 16-dim latent mixed into K channels (fixed mixing), per-channel scales from 0.2
    to 3, plus a little isotropic noise: the strongly correlated inputs GPTQ exploits."""
    mix = torch.randn(16, K, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 16, generator=g)
    return (z @ mix + 0.2 * torch.randn(m, K, generator=g)) * torch.linspace(0.2, 3.0, K)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N, K, generator=g) * 0.05
    bias = torch.randn(N, generator=g) * 0.1
    hess = Hessian(K)
    x_cal = correlated_inputs(4096, seed=3)
    for chunk in x_cal.split(1000):  # several batches, as hooks would see them
        hess.add(chunk)
    return w, bias, hess.H, correlated_inputs(2048, seed=4)  # held-out inputs


def out_err(x, w, w_hat):
    return float(((x @ (w_hat - w).T) ** 2).mean())


CONFIGS = [
    (4, 128, True),
    (4, 128, False),
    (8, None, True),
    (8, None, False),
    (4, 32, True),
    (4, None, False),
    (8, 64, True),
]


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_gptq_beats_rtn_on_held_out_inputs(layer, bits, group_size, symmetric):
    w, _, H, x_test = layer
    rtn = out_err(x_test, w, quantize_weight(w, bits, group_size, symmetric).dequantize())
    res = gptq_quantize(w, H, bits, group_size, symmetric)
    gptq = out_err(x_test, w, res.qweight.dequantize())
    assert res.perm is None
    assert gptq < 0.5 * rtn, f"GPTQ {gptq:.3g} vs RTN {rtn:.3g}"


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (8, None, True), (4, 64, False)])
def test_act_order_round_trips_through_quant_linear(layer, bits, group_size, symmetric):
    w, bias, H, x_test = layer
    res = gptq_quantize(w, H, bits, group_size, symmetric, desc_act=True)
    perm = res.perm
    assert perm is not None and torch.equal(perm.sort().values, torch.arange(K))
    # Visited in order of decreasing diag(H) (here: increasing channel scale, so reversed).
    assert bool((torch.diag(H)[perm][:-1] >= torch.diag(H)[perm][1:]).all())
    # g_idx: group of each original column.
    gs = group_size or K
    assert torch.equal(res.g_idx[perm], torch.arange(K) // gs)

    layer_q = QuantLinear.from_quantized(res.qweight, bias, input_perm=perm)
    w_hat = res.qweight.dequantize()[:, torch.argsort(perm)]  # original column order
    torch.testing.assert_close(layer_q.dequantized_weight(), w_hat)
    y = layer_q(x_test[:64])
    torch.testing.assert_close(y, x_test[:64] @ w_hat.T + bias, rtol=1e-4, atol=1e-4)

    rtn = out_err(x_test, w, quantize_weight(w, bits, group_size, symmetric).dequantize())
    assert out_err(x_test, w, w_hat) < 0.5 * rtn


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_result_is_a_valid_quantized_weight(layer, bits, group_size, symmetric):
    w, _, H, _ = layer
    qw = gptq_quantize(w, H, bits, group_size, symmetric, desc_act=True).qweight
    assert (qw.bits, qw.group_size, qw.symmetric, qw.shape) == (bits, group_size, symmetric, (N, K))
    qmin, qmax = qrange(bits, symmetric)
    q = unpack_weight(qw.qweight, bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert bool(torch.isfinite(qw.scales).all()) and bool((qw.scales > 0).all())
    if not symmetric:
        assert int(qw.zeros.max()) <= qmax
    assert qw.dequantize().shape == (N, K)


def test_deterministic(layer):
    w, _, H, _ = layer
    a = gptq_quantize(w, H, 4, 128, False, desc_act=True)
    b = gptq_quantize(w, H, 4, 128, False, desc_act=True)
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(a.qweight, name), getattr(b.qweight, name))
    assert torch.equal(a.perm, b.perm)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, True), (8, None, False), (4, 32, False)])
def test_diagonal_hessian_gives_the_rtn_grid_exactly(bits, group_size, symmetric):
    """With a diagonal H no error is fed to other columns: GPTQ must reproduce RTN bit for bit,
    which checks that its grid is quantize_weight's."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    H = torch.diag(torch.rand(128, dtype=torch.float64) + 0.5)
    got = gptq_quantize(w, H, bits, group_size, symmetric).qweight
    want = quantize_weight(w, bits, group_size, symmetric)
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
    if not symmetric:
        assert torch.equal(got.zeros, want.zeros)


def test_dead_columns_quantize_to_zero(layer):
    w, _, H, _ = layer
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq_quantize(w, H, 8, None, True)
    assert bool(res.dead[5]) and int(res.dead.sum()) == 1
    assert float(res.qweight.dequantize()[:, 5].abs().max()) == 0.0


def test_hessian_accumulator_is_the_mean_of_2xxT():
    x = torch.randn(3, 50, 8, dtype=torch.float64)
    h = Hessian(8)
    h.add(x[0])
    h.add(x[1:])
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(h.H, 2 * flat.T @ flat / flat.shape[0])
    assert h.n == 150


def test_grid_refinements_do_not_hurt(layer):
    w, _, H, x_test = layer
    base = out_err(x_test, w, gptq_quantize(w, H, 4, 128, False).qweight.dequantize())
    for kw in ({"clip_search": True}, {"refit_scales": True}):
        err = out_err(x_test, w, gptq_quantize(w, H, 4, 128, False, **kw).qweight.dequantize())
        assert err < 1.05 * base, kw


def test_argument_errors(layer):
    w, _, H, _ = layer
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, H[:10, :10])
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, H, 4, 100)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(w, H, percdamp=0)
