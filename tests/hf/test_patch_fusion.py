"""mmkernels.patch(model, linear=True) fuses an activation that a module applies straight to a
Linear's output into that layer's epilogue (mmkernels.hf.fusion): which forwards qualify, that the
model's outputs stay within float32 noise of the unpatched model's, and that unpatch puts the very
activation modules back."""

import pytest
import torch
from torch import nn

import mmkernels
import tiny_models
from mmkernels import _dispatch
from mmkernels._extension import CPU as _EXT
from mmkernels.hf.fusion import activation_kind, foreign_calls, fusable_activation
from mmkernels.linear import backends

pytestmark = pytest.mark.skipif(not _EXT.availability("linear_f32")[0], reason="mmkernels._C has no linear kernel")


@pytest.fixture(autouse=True)
def ours_measured_faster(monkeypatch):
    """Auto-selection as on a CPU where our float32 GEMM was measured faster, whatever this
    machine's class (so every layer is replaced and can be fused)."""
    monkeypatch.setenv("MMKERNELS_CALIBRATE", "0")
    monkeypatch.setattr(backends, "_measured_class", lambda: True)
    _dispatch.clear_selection_cache()
    yield
    _dispatch.clear_selection_cache()


# family: (the fused layer of the first block, its activation, the activation module's path)
FAMILIES = {
    "dinov2": ("encoder.layer.0.mlp.fc1", "gelu", "encoder.layer.0.mlp.activation_fn"),
    "clip": ("vision_model.encoder.layers.0.mlp.fc1", "quick_gelu", "vision_model.encoder.layers.0.mlp.activation_fn"),
    "siglip": ("vision_model.encoder.layers.0.mlp.fc1", "gelu_tanh", "vision_model.encoder.layers.0.mlp.activation_fn"),
    "bert": ("encoder.layer.0.intermediate.dense", "gelu", "encoder.layer.0.intermediate.intermediate_act_fn"),
    "llama": ("model.layers.0.mlp.gate_proj", "silu", "model.layers.0.mlp.act_fn"),
    "whisper": ("model.encoder.layers.0.fc1", "gelu", "model.encoder.layers.0.activation_fn"),
    "qwen2_vl_vision": ("blocks.0.mlp.fc1", "quick_gelu", "blocks.0.mlp.act"),
    "qwen2": ("model.layers.0.mlp.gate_proj", "silu", "model.layers.0.mlp.act_fn"),
    "llava": ("model.multi_modal_projector.linear_1", "gelu", "model.multi_modal_projector.act"),
    "vit": ("layers.0.mlp.fc1", "gelu", "layers.0.mlp.activation_fn"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mlp_activations_are_fused_exact_enough_and_restored(family):
    fc_path, kind, act_path = FAMILIES[family]
    torch.manual_seed(0)
    c = getattr(tiny_models, family)()
    model = c.build().eval()
    inputs = c.make_inputs()
    modules = dict(model.named_modules())
    with torch.no_grad():
        want = c.outputs(model(**inputs))
    report = mmkernels.patch(model, attention=False, linear=True)
    fused = {r.path: r for r in report.rows if "fused" in r.detail}
    assert fc_path in fused and f"{kind} fused ({act_path} -> Identity)" in fused[fc_path].detail
    assert f"activations fused into their layer: {len(fused)}" in str(report)
    layer = model.get_submodule(fc_path)
    assert type(layer) is mmkernels.nn.Linear and layer.activation == kind
    assert layer.weight is modules[fc_path].weight
    assert type(model.get_submodule(act_path)) is nn.Identity
    for row in fused.values():  # each fused row's activation module is the Identity it names
        act = row.detail.split(" fused (")[1].split(" -> ")[0]
        assert type(model.get_submodule(act)) is nn.Identity and type(modules[act]) is not nn.Identity
    with torch.no_grad():
        got = c.outputs(model(**inputs))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    mmkernels.unpatch(model)
    assert all(model.get_submodule(name) is m for name, m in modules.items() if name)


class SequentialMLP(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 48), act, nn.Linear(48, 16)

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        return self.fc2(h)


class NestedMLP(SequentialMLP):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ActivationTwice(SequentialMLP):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(self.act(h))


class KeepsThePreActivation(SequentialMLP):
    def forward(self, x):
        h = self.fc1(x)
        a = self.act(h)
        return self.fc2(a + h)


class CallsFcTwice(SequentialMLP):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + self.fc1(x).sum(-1, keepdim=True)


class GatedMLP(nn.Module):  # Llama's shape
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down, self.act_fn = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16), nn.SiLU()

    def forward(self, x):
        return self.down(self.act_fn(self.gate(x)) * self.up(x))


@pytest.mark.parametrize(
    "module,expected",
    [
        (SequentialMLP(nn.GELU()), ("act", "gelu")),
        (SequentialMLP(nn.GELU(approximate="tanh")), ("act", "gelu_tanh")),
        (SequentialMLP(nn.ReLU()), ("act", "relu")),
        (NestedMLP(nn.SiLU()), ("act", "silu")),
        (SequentialMLP(nn.Tanh()), None),  # a kind the kernel does not compute
        (ActivationTwice(nn.GELU()), None),
        (KeepsThePreActivation(nn.GELU()), None),
        (CallsFcTwice(nn.GELU()), None),
    ],
    ids=["gelu", "gelu_tanh", "relu", "nested_silu", "tanh", "act_twice", "keeps_pre", "fc_twice"],
)
def test_which_forwards_qualify(module, expected):
    assert fusable_activation(module, "fc1") == expected
    assert fusable_activation(module, "fc2") is None


class UsesAHelper(SequentialMLP):
    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        return self.fc2(h) + self._shortcut(x)

    def _shortcut(self, x):
        return self.fc2(self.fc1(x))  # the pre-activation again, out of forward's sight


class CallsSuper(SequentialMLP):
    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        return self.fc2(h) + super().forward(x)


class ReadsTheActivationElsewhere(SequentialMLP):
    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        return self.fc2(h)

    def gate(self, x):
        return self.act(x)


class Grandparent(nn.Module):  # calls its child MLP's fc1 directly: its pre-activation
    def __init__(self):
        super().__init__()
        self.mlp = SequentialMLP(nn.GELU())

    def forward(self, x):
        return self.mlp(x) + self.mlp.fc2(torch.tanh(self.mlp.fc1(x)))


@pytest.mark.parametrize("cls", [UsesAHelper, CallsSuper, ReadsTheActivationElsewhere])
def test_forwards_with_hidden_uses_are_not_fused(cls):
    assert fusable_activation(cls(nn.GELU()), "fc1") is None


def test_a_call_from_another_module_blocks_the_fusion():
    model = Grandparent().eval()
    assert fusable_activation(model.mlp, "fc1") == ("act", "gelu")  # alone it qualifies
    assert fusable_activation(model.mlp, "fc1", foreign_calls(model)) is None
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
    report = mmkernels.patch(model, attention=False, linear=True)
    assert not [r for r in report.rows if "fused" in r.detail]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    mmkernels.unpatch(model)


class Aliased(SequentialMLP):  # one layer under two names of one parent
    def __init__(self):
        super().__init__(nn.GELU())
        self.fc1_again = self.fc1

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h)
        return self.fc2(h) + self.fc2(self.fc1_again(x))


def test_a_quantized_layer_registered_twice_is_not_fused():
    from mmkernels.hf import core

    torch.manual_seed(5)
    model = nn.Sequential(Aliased()).eval()
    x = torch.randn(4, 16)
    # quantize_model replaces the layer at its first name only: the alias keeps the float layer,
    # so fusing the QuantLinear changes nothing at the alias's call site
    report = mmkernels.patch(model, attention=False, quantize={"bits": 8})
    assert [r.path for r in report.rows if "fused" in r.detail] == ["0.fc1"]
    assert type(model[0].fc1_again) is nn.Linear
    mmkernels.unpatch(model)
    # the QuantLinear itself under two names: its activation would also apply at the alias
    mmkernels.patch(model, attention=False, quantize={"bits": 8}, fuse_activations=False)
    model[0].fc1_again = model[0].fc1
    with torch.no_grad():
        want = model(x)
    core._fuse_quantized(model, core._RECORDS[model])
    assert model[0].fc1.activation is None and type(model[0].act) is nn.GELU
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_gated_mlp_fuses_the_gate_only():
    mlp = GatedMLP()
    assert fusable_activation(mlp, "gate") == ("act_fn", "silu")
    assert fusable_activation(mlp, "up") is None


def test_hooks_subclasses_and_own_forwards_are_not_fused():
    hooked = SequentialMLP(nn.GELU())
    hooked.act.register_forward_hook(lambda *a: None)
    assert fusable_activation(hooked, "fc1") is None

    class MyGELU(nn.GELU):
        pass

    assert activation_kind(MyGELU()) is None
    bound = SequentialMLP(nn.GELU())
    bound.forward = lambda x: bound.fc2(bound.act(bound.fc1(x)) * 2)
    assert fusable_activation(bound, "fc1") is None


@pytest.mark.parametrize("cls", [SequentialMLP, NestedMLP, KeepsThePreActivation, ActivationTwice])
def test_custom_models_patched_match_and_restore(cls):
    torch.manual_seed(1)
    model = nn.Sequential(cls(nn.GELU()), nn.LayerNorm(16), cls(nn.SiLU())).eval()
    x = torch.randn(3, 7, 16)
    modules = dict(model.named_modules())
    with torch.no_grad():
        want = model(x)
    report = mmkernels.patch(model, attention=False, linear=True)
    fused = [r.path for r in report.rows if "fused" in r.detail]
    assert fused == (["0.fc1", "2.fc1"] if cls in (SequentialMLP, NestedMLP) else [])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    mmkernels.unpatch(model)
    assert all(model.get_submodule(name) is m for name, m in modules.items() if name)


def test_a_module_reachable_by_two_paths_is_fused_once():
    torch.manual_seed(2)
    mlp = SequentialMLP(nn.GELU())
    model = nn.ModuleDict({"a": mlp, "b": mlp}).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = mlp(x)
    report = mmkernels.patch(model, attention=False, linear=True)
    assert {r.path for r in report.rows if "fused" in r.detail} == {"a.fc1", "b.fc1"}
    assert model["a"].fc1 is model["b"].fc1 and model["a"].fc1.activation == "gelu"
    with torch.no_grad():
        torch.testing.assert_close(model["b"](x), want, rtol=1e-5, atol=1e-5)
    mmkernels.unpatch(model)
    assert type(mlp.fc1) is nn.Linear and type(mlp.act) is nn.GELU


@pytest.mark.parametrize("quantize", [{"bits": 8, "act_bits": 8}, {"bits": 4, "group_size": 32}], ids=["w8a8", "int4"])
def test_quantized_layers_take_the_activation_too(quantize):
    torch.manual_seed(3)
    c = tiny_models.dinov2()
    fused_model, plain_model = c.build().eval(), c.build().eval()
    plain_model.load_state_dict(fused_model.state_dict())
    inputs = c.make_inputs()
    modules = dict(fused_model.named_modules())
    report = mmkernels.patch(fused_model, attention=False, quantize=quantize)
    mmkernels.patch(plain_model, attention=False, quantize=quantize, fuse_activations=False)
    row = next(r for r in report.rows if r.path == "encoder.layer.0.mlp.fc1")
    assert row.action == "quantized" and "gelu fused (encoder.layer.0.mlp.activation_fn -> Identity)" in row.detail
    layer = fused_model.get_submodule("encoder.layer.0.mlp.fc1")
    assert type(layer) is mmkernels.nn.QuantLinear and layer.activation == "gelu"
    assert "activation='gelu'" in repr(layer)
    assert plain_model.get_submodule("encoder.layer.0.mlp.fc1").activation is None
    with torch.no_grad():
        got, want = c.outputs(fused_model(**inputs)), c.outputs(plain_model(**inputs))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    mmkernels.unpatch(fused_model)
    assert all(fused_model.get_submodule(name) is m for name, m in modules.items() if name)


def test_fuse_activations_false_leaves_every_activation():
    torch.manual_seed(4)
    model = tiny_models.dinov2().build().eval()
    report = mmkernels.patch(model, attention=False, linear=True, fuse_activations=False)
    assert "fuse_activations=False" in str(report.settings)
    assert not [r for r in report.rows if "fused" in r.detail]
    assert type(model.get_submodule("encoder.layer.0.mlp.activation_fn")).__name__ == "GELUActivation"
    assert all(m.activation is None for m in model.modules() if isinstance(m, mmkernels.nn.Linear))
    mmkernels.unpatch(model)
    with pytest.raises(TypeError, match="fuse_activations must be a bool"):
        mmkernels.patch(model, linear=True, fuse_activations="no")
