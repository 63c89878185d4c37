"""End-to-end scale tuning (mmkernels.compress.tune_scales, EfficientQAT's E2E-QP): keeps every
integer, lowers the held-out error of the model's final output (mse and cosine losses, a custom
output_fn), the exported layers compute what the tuner computed, start scales kept when tuning
cannot help, biases changed only with bias_lr, only weight-only integer layers are touched, clear
argument errors."""

import copy

import pytest
import torch
from torch import nn

from mmkernels.nn import QuantLinear
from mmkernels.compress import quantize_model, tune_scales
from mmkernels.compress.scale_tuning import ScaleTuner, tunable


def _rtn(model, **kw):
    q = copy.deepcopy(model)
    quantize_model(q, bits=4, group_size=128, symmetric=False, progress=False, **kw)
    return q


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _pooled(out, item):
    return out.mean(dim=1)  # a sentence-embedding stand-in


def test_tuning_lowers_held_out_error_and_keeps_integers(tiny):
    model, calib, x_test = tiny
    start = _rtn(model)
    tuned = copy.deepcopy(start)
    before, after = tune_scales(tuned, model, calib, epochs=3, lr=2e-3)
    with torch.no_grad():
        err = [float(((m(x_test) - model(x_test)) ** 2).mean()) for m in (start, tuned)]
    assert after < 0.9 * before, (before, after)
    assert err[1] < 0.9 * err[0], err
    old, new = _layers(start), _layers(tuned)
    assert list(old) == list(new) and len(new) == 18
    changed = 0
    for name, layer in new.items():
        a, b = old[name].quantized, layer.quantized
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.zeros, b.zeros)
        assert b.scales.dtype == a.scales.dtype and torch.all(b.scales > 0)
        ratio = b.scales / a.scales
        assert float((ratio - 1).abs().max()) <= 0.2 + 1e-6
        changed += int(not torch.equal(a.scales, b.scales))
    assert changed == 18
    assert not any(isinstance(m, ScaleTuner) for m in tuned.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_cosine_loss_on_custom_output(tiny):
    model, calib, x_test = tiny
    start = _rtn(model)
    tuned = copy.deepcopy(start)
    before, after = tune_scales(tuned, model, calib, output_fn=_pooled, loss="cosine", epochs=3, lr=2e-3)

    def miss(m):
        with torch.no_grad():
            a, b = m(x_test).mean(1), model(x_test).mean(1)
        return float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())

    assert after < 0.9 * before and miss(tuned) < 0.9 * miss(start), (before, after)


def test_bias_tuning_changes_only_biases_when_asked(tiny):
    model, calib, _ = tiny
    start = _rtn(model)
    tuned = copy.deepcopy(start)
    before, after = tune_scales(tuned, model, calib[:4], epochs=2, lr=1e-3, bias_lr=1e-3)
    assert after < before
    old, new = _layers(start), _layers(tuned)
    assert all(not torch.equal(old[n].bias, m.bias) and m.bias.dtype == old[n].bias.dtype for n, m in new.items())
    plain = copy.deepcopy(start)
    tune_scales(plain, model, calib[:4], epochs=1)
    assert all(torch.equal(old[n].bias, m.bias) for n, m in _layers(plain).items())


def test_export_computes_what_the_tuner_computed(tiny):
    model, calib, _ = tiny
    layer = _layers(_rtn(model))["layers.0.intermediate.dense"]
    tuner = ScaleTuner(layer)
    with torch.no_grad():
        tuner.a.uniform_(0.9, 1.1)
    x = torch.randn(5, 3, layer.in_features)
    exported = tuner.export()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), tuner(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(exported.quantized.scales, (tuner.s0 * tuner.a).detach())


def test_a_fused_activation_is_kept(tiny):
    """A QuantLinear given its MLP's activation by mmkernels.patch tunes and exports with it."""
    model, _, _ = tiny
    layer = _layers(_rtn(model))["layers.0.intermediate.dense"]
    layer.activation = "gelu"
    tuner = ScaleTuner(layer)
    x = torch.randn(5, 3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(tuner(x), layer(x), rtol=1e-4, atol=1e-4)
        exported = tuner.export()
        assert exported.activation == "gelu"
        torch.testing.assert_close(exported(x), tuner(x), rtol=1e-5, atol=1e-5)


def test_act_order_permutation_is_kept(tiny):
    model, calib, x_test = tiny
    start = copy.deepcopy(model)
    quantize_model(
        start, bits=4, group_size=128, symmetric=False, method="gptq", desc_act=True, calib_data=calib, progress=False
    )
    tuned = copy.deepcopy(start)
    before, after = tune_scales(tuned, model, calib, epochs=1)
    assert after <= before
    for name, layer in _layers(tuned).items():
        assert torch.equal(layer.input_perm, _layers(start)[name].input_perm)


def test_start_kept_when_tuning_cannot_help(tiny):
    model, calib, _ = tiny
    start = _rtn(model)
    tuned = copy.deepcopy(start)
    # lr so large that every step overshoots to the clamp: the loss rises, the start is kept
    before, after = tune_scales(tuned, model, calib[:2], epochs=1, lr=10.0)
    assert after == before
    for name, layer in _layers(tuned).items():
        assert torch.equal(layer.quantized.scales, _layers(start)[name].quantized.scales)


def test_only_weight_only_integer_layers(tiny):
    model, calib, _ = tiny
    w8a8 = copy.deepcopy(model)
    quantize_model(w8a8, bits=8, act_bits=8, progress=False)
    assert not any(tunable(m) for m in w8a8.modules())
    with pytest.raises(ValueError, match="no weight-only integer QuantLinear"):
        tune_scales(w8a8, model, calib)
    fp8 = copy.deepcopy(model)
    quantize_model(fp8, fp8=True, progress=False)
    assert not any(tunable(m) for m in fp8.modules())
    part = _rtn(model)
    keep = {n: m.quantized.scales.clone() for n, m in _layers(part).items()}
    tune_scales(part, model, calib[:4], include=lambda n: n.startswith("layers.2."))
    for name, layer in _layers(part).items():
        same = torch.equal(layer.quantized.scales, keep[name])
        assert same == (not name.startswith("layers.2.")), name


def test_interrupted_tuning_leaves_the_model_as_it_was(tiny):
    model, calib, _ = tiny
    q = _rtn(model)
    layers = _layers(q)
    calls = []

    def failing(out, item):
        calls.append(1)
        if len(calls) > 2 * len(calib) + 2:  # targets, loss before, then 2 steps: stop
            raise RuntimeError("stop")
        return out

    with pytest.raises(RuntimeError, match="stop"):
        tune_scales(q, model, calib, output_fn=failing)
    assert len(calls) == 2 * len(calib) + 3
    assert all(m is layers[n] for n, m in _layers(q).items()) and len(_layers(q)) == 18
    assert not any(isinstance(m, ScaleTuner) for m in q.modules())
    assert all(p.requires_grad for p in q.parameters())


def test_exported_flat():
    import mmkernels

    assert mmkernels.tune_scales is tune_scales and mmkernels.compress.tune_scales is tune_scales


def test_argument_errors(tiny):
    model, calib, _ = tiny
    q = _rtn(model)
    with pytest.raises(ValueError, match="loss"):
        tune_scales(q, model, calib, loss="l1")
    with pytest.raises(ValueError, match="epochs"):
        tune_scales(q, model, calib, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        tune_scales(q, model, calib, lr=float("nan"))
    with pytest.raises(ValueError, match="bias_lr"):
        tune_scales(q, model, calib, bias_lr=-1.0)
    with pytest.raises(ValueError, match="scale_range"):
        tune_scales(q, model, calib, scale_range=1.0)
    with pytest.raises(ValueError, match="calib_data is empty"):
        tune_scales(q, model, [])
    with pytest.raises(TypeError, match="nn.Module"):
        tune_scales(q, lambda x: x, calib)
    with pytest.raises(ValueError, match="single QuantLinear"):
        tune_scales(_layers(q)["layers.0.output.dense"], nn.Linear(256, 128), [torch.randn(2, 256)])
