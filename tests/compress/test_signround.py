"""SignRound (mmkernels.compress.signround, quantize_model(method="signround")): starts exactly at
GPTQ, exports the integers its forward used, beats RTN and GPTQ on held-out output error of a
small three-block BERT encoder with correlated inputs, deterministic, clear argument errors."""

import copy

import pytest
import torch
from torch import nn

from mmkernels.nn import QuantLinear
from mmkernels.compress import Hessian, gptq_quantize, quantize_model
from mmkernels.compress.signround import RoundingTuner, tune_block

from tiny_bert import D


def _quantized(model, calib, **kw):
    q = copy.deepcopy(model)
    report = quantize_model(q, bits=4, group_size=128, symmetric=False, calib_data=calib, progress=False, **kw)
    return q, report


def _err(q, model, x):
    with torch.no_grad():
        return float(((q(x) - model(x)) ** 2).mean())


def test_signround_beats_rtn_and_gptq_on_held_out_data(tiny):
    model, calib, x_test = tiny
    rtn = copy.deepcopy(model)
    quantize_model(rtn, bits=4, group_size=128, symmetric=False, progress=False)
    gptq, _ = _quantized(model, calib, method="gptq", desc_act=True, sequential=False)
    sr, report = _quantized(model, calib, method="signround", desc_act=True, signround_iters=100)
    e_rtn, e_gptq, e_sr = (_err(m, model, x_test) for m in (rtn, gptq, sr))
    # Measured: RTN 5.2e-3, GPTQ 1.13e-3, SignRound 1.07e-3 (deterministic, seeded).
    assert e_sr < 0.98 * e_gptq and e_gptq < 0.5 * e_rtn, f"RTN {e_rtn:.3g} GPTQ {e_gptq:.3g} SR {e_sr:.3g}"
    layers = [m for m in sr.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 18 and not any(type(m) is nn.Linear for m in sr.modules())
    assert all(
        m.quantized.bits == 4
        and m.quantized.group_size == 128
        and m.quantized.zeros is not None
        and m.input_perm is not None
        for m in layers
    )
    assert [r.method for r in report.layers] == ["signround"] * 18


def test_signround_is_deterministic(tiny):
    model, calib, _ = tiny
    a, _ = _quantized(model, calib, method="signround", signround_iters=20)
    b, _ = _quantized(model, calib, method="signround", signround_iters=20)
    for (_, ma), (_, mb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ma, mb)


def test_tuner_starts_at_gptq_and_exports_its_forward(tiny):
    model, calib, _ = tiny
    layer = model.layers[0].intermediate.dense
    hess = Hessian(D)
    for item in calib:
        hess.add(item)
    res = gptq_quantize(layer.weight.detach(), hess.H, 4, 128, symmetric=False, desc_act=True)
    tuner = RoundingTuner.from_gptq(res, layer.bias)
    start = tuner.export()
    assert torch.equal(start.quantized.qweight, res.qweight.qweight)
    assert torch.equal(start.quantized.scales, res.qweight.scales)
    assert torch.equal(start.input_perm, res.perm)
    # After tuning, the exported layer computes what the tuner's forward computed.
    block = copy.deepcopy(model.layers[0])
    bias = torch.zeros(16, 1, 1, 16)
    with torch.no_grad():
        wanted = [model.layers[0](x, bias) for x in calib]
    before, after = tune_block(block, {"intermediate.dense": tuner}, [((x, bias), {}) for x in calib], wanted, iters=30)
    assert after <= before
    x = calib[0]
    with torch.no_grad():
        torch.testing.assert_close(tuner.export()(x), tuner(x), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in block.parameters() if p is not tuner.V and p is not tuner.a)


def test_signround_argument_errors(tiny):
    model, calib, _ = tiny
    with pytest.raises(ValueError, match="calib_data"):
        quantize_model(copy.deepcopy(model), bits=4, group_size=128, method="signround")
    with pytest.raises(ValueError, match="act_bits"):
        quantize_model(copy.deepcopy(model), bits=8, act_bits=8, method="signround", calib_data=calib)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="signround_iters"):
            quantize_model(
                copy.deepcopy(model), bits=4, group_size=128, method="signround", calib_data=calib, signround_iters=bad
            )
    for bad in (0.0, -1e-3, float("inf"), "0.01"):
        with pytest.raises(ValueError, match="signround_lr"):
            quantize_model(
                copy.deepcopy(model), bits=4, group_size=128, method="signround", calib_data=calib, signround_lr=bad
            )
    with pytest.raises(ValueError, match="float_target"):
        quantize_model(
            copy.deepcopy(model), bits=4, group_size=128, method="signround", calib_data=calib, float_target=True
        )
    with pytest.raises(ValueError, match="iters"):
        tune_block(model.layers[0], {}, [((calib[0],), {})], [calib[0]], iters=-1)
    with pytest.raises(ValueError, match="lr"):
        tune_block(model.layers[0], {}, [((calib[0],), {})], [calib[0]], lr=float("nan"))
