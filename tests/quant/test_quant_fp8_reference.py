"""fp8 (e4m3) weights: quantizer, format, reference qmatmul (weight-only and fp8 W8A8)."""

import io

import pytest
import torch

from mmkernels.quant import QuantizedWeight, qmatmul, quantize_weight
from mmkernels.quant.packing import FP8_DTYPE

E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
E4M3_GRID = torch.unique(E4M3_GRID[torch.isfinite(E4M3_GRID)])  # all 253 finite values


@pytest.mark.parametrize("group_size", [None, 32])
def test_fp8_quantize_is_nearest_grid_point(group_size):
    torch.manual_seed(0)
    w = torch.randn(19, 64) * torch.logspace(-2, 1, 19)[:, None]
    w[4] = 0
    qw = quantize_weight(w, bits=8, group_size=group_size, fp8=True)
    assert qw.fp8 and qw.qweight.dtype == FP8_DTYPE and qw.meta.tolist()[-1] == 1
    gs = 64 if group_size is None else group_size
    s = qw.scales.double().repeat_interleave(gs, dim=1)
    scaled = w.double() / s
    assert scaled.abs().max() <= 448 * (1 + 1e-6)  # scale rounded to float32
    # the stored value is a nearest e4m3 value of w / s (independent search over the grid)
    dist = (scaled.reshape(-1, 1) - E4M3_GRID.double()[None, :]).abs()
    best = dist.min(dim=1).values.reshape(scaled.shape)
    got = (qw.qweight.double() - scaled).abs()
    assert torch.all(got <= best + 1e-12 * scaled.abs())
    assert torch.equal(qw.dequantize()[4], torch.zeros(64))
    assert torch.allclose(qw.dequantize(torch.float64), qw.qweight.double() * s)


def test_fp8_state_dict_roundtrip():
    qw = quantize_weight(torch.randn(8, 32), fp8=True)
    buf = io.BytesIO()
    torch.save(qw.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    back = QuantizedWeight.from_state_dict(sd)
    assert back.fp8 and torch.equal(back.qweight.view(torch.uint8), qw.qweight.view(torch.uint8))
    target = QuantizedWeight.empty((8, 32), bits=8, fp8=True)
    target.load_state_dict(sd)
    assert torch.equal(target.dequantize(), qw.dequantize())
    with pytest.raises(RuntimeError, match="meta"):
        QuantizedWeight.empty((8, 32), bits=8).load_state_dict(sd)


@pytest.mark.parametrize("m", [1, 5])
def test_fp8_weight_only_and_w8a8_reference(m):
    torch.manual_seed(1)
    w, x, b = torch.randn(23, 64), torch.randn(m, 64), torch.randn(23)
    qw = quantize_weight(w, fp8=True)
    y = qmatmul(x.double(), qw, b.double())
    assert torch.allclose(y, x.double() @ qw.dequantize(torch.float64).T + b.double())
    # fp8 W8A8: independent per-token e4m3 activation quantization
    y8 = qmatmul(x.double(), qw, b.double(), act_bits=8)
    sx = x.double().abs().amax(1) / 448
    xq = (x.double() / sx[:, None]).float().to(FP8_DTYPE).double()
    expect = (xq @ qw.qweight.double().T) * sx[:, None] * qw.scales.double()[:, 0] + b.double()
    assert torch.allclose(y8, expect, rtol=1e-12, atol=1e-12)
    rel = (y8 - x.double() @ w.double().T - b.double()).norm() / (x @ w.T).norm()
    assert rel < 0.1  # e4m3 on both sides: a few % at most
    assert qmatmul(x, qw, act_bits=8).dtype == torch.float32


def test_fp8_bad_args():
    with pytest.raises(ValueError, match="bits=8 and symmetric=True"):
        quantize_weight(torch.randn(4, 32), bits=4, fp8=True)
    with pytest.raises(ValueError, match="bits=8 and symmetric=True"):
        quantize_weight(torch.randn(4, 32), symmetric=False, fp8=True)
    with pytest.raises(TypeError, match="fp8 must be a bool"):
        quantize_weight(torch.randn(4, 32), fp8=1)
    qw = quantize_weight(torch.randn(4, 32), group_size=32, fp8=True)
    with pytest.raises(ValueError, match="per-channel"):
        qmatmul(torch.randn(2, 32), qw, act_bits=8)
