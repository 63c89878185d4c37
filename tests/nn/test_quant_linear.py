"""mmkernels.nn.QuantLinear: from_linear, state dict round trip, input_perm, smoothing."""

import io

import pytest
import torch
from torch import nn

from mmkernels.nn import QuantLinear
from mmkernels.quant import quantize_weight


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=8),
        dict(bits=4, group_size=32),
        dict(bits=4, group_size=64, symmetric=False),
        dict(bits=8, act_bits=8),
        dict(bits=8, fp8=True),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_dequantized(kw, bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 19, bias=bias)
    q = QuantLinear.from_linear(lin, **kw)
    x = torch.randn(3, 5, 64)
    y = q(x)
    assert y.shape == (3, 5, 19)
    if "act_bits" not in kw:
        expect = x.double() @ q.dequantized_weight(torch.float64).T
        if bias:
            expect = expect + lin.bias.double()
        assert torch.allclose(y.double(), expect, atol=1e-4, rtol=1e-4)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < (0.2 if kw.get("bits") == 4 else 0.05)
    # state dict round trip into an empty layer of the same configuration
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    empty = QuantLinear(64, 19, bias=bias, **kw)
    empty.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(empty(x), y)


def test_input_perm_and_smooth():
    torch.manual_seed(1)
    lin = nn.Linear(64, 7)
    perm = torch.randperm(64)
    smooth = torch.rand(64) + 0.5
    w = lin.weight.detach() * smooth[None, :]
    qw = quantize_weight(w[:, perm].contiguous(), bits=4, group_size=32)
    q = QuantLinear.from_quantized(qw, lin.bias, smooth=smooth[perm], input_perm=perm)
    x = torch.randn(4, 64)
    expect = x.double() @ q.dequantized_weight(torch.float64).T + lin.bias.double()
    assert torch.allclose(q(x).double(), expect, atol=1e-4)
    assert (q(x) - lin(x)).norm() / lin(x).norm() < 0.2
    with pytest.raises(ValueError, match="permutation"):
        QuantLinear.from_quantized(qw, input_perm=torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias must be a \\(7,\\)"):
        QuantLinear.from_quantized(qw, torch.zeros(8))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="act_bits"):
        QuantLinear.from_quantized(qw, act_bits=8)
