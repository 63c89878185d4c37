"""mmkernels.patch(model, linear=True): float32 CPU nn.Linear layers become mmkernels.nn.Linear
(same Parameters, mmkernels.linear's product), alone or beside quantize=; reported row by row;
unpatch restores the very module objects."""

import pytest
import torch
from torch import nn

import mmkernels
import tiny_models
from mmkernels import _dispatch
from mmkernels._extension import CPU as _EXT
from mmkernels.linear import backends

pytestmark = pytest.mark.skipif(not _EXT.availability("linear_f32")[0], reason="mmkernels._C has no linear kernel")


def _force_rule(monkeypatch, ours_faster: bool):
    """Auto-selection as on a CPU where our float32 GEMM was measured faster (or not), whatever
    this machine's class: no calibration."""
    monkeypatch.setenv("MMKERNELS_CALIBRATE", "0")
    monkeypatch.setattr(backends, "_measured_class", lambda: ours_faster)
    _dispatch.clear_selection_cache()


@pytest.fixture(autouse=True)
def ours_measured_faster(monkeypatch):
    _force_rule(monkeypatch, True)
    yield
    _dispatch.clear_selection_cache()


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize(
    "case", [tiny_models.bert, tiny_models.dinov2, tiny_models.llama], ids=["bert", "dinov2", "llama"]
)
def test_linear_patch_is_exact_enough_reported_and_reversible(case):
    torch.manual_seed(0)
    c = case()
    model = c.build().eval()
    inputs = c.make_inputs()
    before = _linears(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = c.outputs(model(**inputs))
    report = mmkernels.patch(model, attention=False, linear=True)
    assert "linear=True" in str(report.settings)
    rows = {r.path: r for r in report.rows if r.kind == "linear"}
    assert set(rows) == set(before)  # lm_head included
    assert all(r.action == "mmkernels" and "mmkernels.linear" in r.detail for r in rows.values())
    for name, original in before.items():
        new = model.get_submodule(name)
        assert type(new) is mmkernels.nn.Linear and new.weight is original.weight and new.bias is original.bias
    with torch.no_grad():
        got = c.outputs(model(**inputs))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    mmkernels.unpatch(model)
    assert all(model.get_submodule(n) is m for n, m in before.items())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_linear_beside_quantize_takes_the_layers_quantize_left():
    torch.manual_seed(0)
    model = tiny_models.bert().build().eval()
    report = mmkernels.patch(model, attention=True, quantize={"bits": 8, "exclude": ["*.output.dense"]}, linear=True)
    rows = {r.path: r for r in report.rows if r.kind == "linear"}
    quantized = [p for p, r in rows.items() if r.action == "quantized"]
    dense = [p for p, r in rows.items() if r.action == "mmkernels"]
    assert quantized and dense and not report.left("linear")
    assert all(p.endswith("output.dense") for p in dense)
    assert all("not quantized" in rows[p].detail for p in dense)
    assert all(type(model.get_submodule(p)) is mmkernels.nn.QuantLinear for p in quantized)
    mmkernels.unpatch(model)
    assert all(type(m) is nn.Linear for m in _linears(model).values())


def test_non_float32_and_subclassed_linears_are_left_with_a_reason():
    class MyLinear(nn.Linear):
        pass

    hooked = nn.Linear(64, 64)
    hooked.register_forward_hook(lambda module, args, out: out)
    model = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16), MyLinear(64, 64), nn.Linear(64, 64), hooked)
    report = mmkernels.patch(model, attention=False, linear=True)
    left = {r.path: r.detail for r in report.left("linear")}
    assert "bfloat16 weight" in left["0"] and "subclass of nn.Linear (MyLinear)" in left["1"]
    assert "has hooks" in left["3"]
    assert [r.path for r in report.patched("linear")] == ["2"]
    mmkernels.unpatch(model)


def test_linear_flag_must_be_a_bool_and_settings_compare():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="linear must be a bool"):
        mmkernels.patch(model, attention=False, linear="yes")
    first = mmkernels.patch(model, attention=False, linear=True)
    assert mmkernels.patch(model, attention=False, linear=True) is first
    with pytest.raises(ValueError, match="already patched"):
        mmkernels.patch(model, attention=False, linear=False)
    mmkernels.unpatch(model)


def test_layers_where_torch_serves_their_size_are_left_with_the_reason(monkeypatch):
    _force_rule(monkeypatch, False)
    torch.manual_seed(0)
    model = tiny_models.bert().build().eval()
    with pytest.raises(ValueError, match="torch serves float32 GEMMs of this size here"):
        mmkernels.patch(model, attention=False, linear=True)  # nothing left to patch
    report = mmkernels.patch(model, attention=True, linear=True)
    left = report.left("linear")
    assert left and not report.patched("linear")
    assert all("torch serves float32 GEMMs of this size here" in r.detail for r in left)
    assert all(type(m) is nn.Linear for m in _linears(model).values())
    mmkernels.unpatch(model)


def test_unpatch_drops_the_packed_copies():
    from mmkernels import _packed_cache

    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    mmkernels.patch(model, attention=False, linear=True)
    model(torch.randn(32, 64))
    assert _packed_cache.is_cached(model[0].weight) and _packed_cache.is_cached(model[2].weight)
    mmkernels.unpatch(model)
    assert not _packed_cache.is_cached(model[0].weight) and not _packed_cache.is_cached(model[2].weight)


def test_a_layer_reachable_by_two_paths_is_replaced_once_and_restored_at_both():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    mmkernels.patch(model, attention=False, linear=True)
    assert type(model[0]) is mmkernels.nn.Linear and model[0] is model[2]
    mmkernels.unpatch(model)
    assert model[0] is shared and model[2] is shared


def test_a_forced_backend_is_named_as_the_reason(monkeypatch):
    monkeypatch.setenv("MMKERNELS_LINEAR_BACKEND", "torch")
    _dispatch.clear_selection_cache()
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="MMKERNELS_LINEAR_BACKEND=torch forces it"):
        mmkernels.patch(model, attention=False, linear=True)


def test_layers_too_small_for_our_kernel_are_left():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 32), nn.Linear(64, 64))
    report = mmkernels.patch(model, attention=False, linear=True)
    assert [r.path for r in report.patched("linear")] == ["2"]
    assert all("per-call costs decide" in r.detail for r in report.left("linear"))
    mmkernels.unpatch(model)
