"""mmkernels.linear's API: argument errors, dispatch (auto-selection per CPU class and by
calibration), autograd, torch.compile, and the drop-in module mmkernels.nn.Linear."""

import pytest
import torch

import mmkernels
from mmkernels import _calibration, _dispatch
from mmkernels._extension import CPU as _EXT
from mmkernels.linear import backends
from mmkernels.linear.api import _select
from mmkernels.linear.reference import linear_reference

HAS_KERNEL = _EXT.availability("linear_f32")[0]
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="mmkernels._C has no linear kernel")


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (([1.0], torch.randn(3, 1)), {}, TypeError, "x must be a torch.Tensor"),
        ((torch.randn(2, 3), "w"), {}, TypeError, "weight must be a torch.Tensor"),
        ((torch.randn(2, 3).int(), torch.randn(4, 3)), {}, TypeError, "x must be float32"),
        ((torch.randn(2, 3), torch.randn(4, 3, 1)), {}, ValueError, "weight must be 2-D"),
        ((torch.randn(2, 3), torch.randn(4, 3).double()), {}, ValueError, "weight must be float32"),
        (
            (torch.randn(2, 3), torch.randn(4, 5)),
            {},
            ValueError,
            r"x must be \(\.\.\., K\) with K = weight.shape\[1\] = 5",
        ),
        (
            (torch.randn(2, 3), torch.randn(4, 3)),
            {"bias": torch.randn(5)},
            ValueError,
            r"bias must be float32 \(N,\) = \(4,\)",
        ),
        ((torch.randn(2, 3), torch.randn(4, 3)), {"bias": torch.randn(4).double()}, ValueError, "bias must be float32"),
        ((torch.randn(2, 3), torch.randn(4, 3)), {"bias": [0.0] * 4}, TypeError, "bias must be a torch.Tensor"),
        ((torch.randn(2, 3), torch.randn(4, 3)), {"backend": 3}, TypeError, "backend must be a str"),
        ((torch.randn(2, 3), torch.randn(4, 3)), {"backend": "triton"}, ValueError, "triton"),
        ((torch.randn(2, 3), torch.randn(4, 3)), {"activation": 1}, TypeError, "activation must be a str or None"),
        (
            (torch.randn(2, 3), torch.randn(4, 3)),
            {"activation": "tanh"},
            ValueError,
            r"activation must be None or one of \['gelu', 'gelu_tanh', 'quick_gelu', 'relu', 'silu'\], got 'tanh'",
        ),
    ],
)
def test_bad_arguments_name_what_is_wrong(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mmkernels.linear(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_served_and_the_cpu_backend_says_why_not(dtype):
    x, w, b = torch.randn(9, 20, dtype=dtype), torch.randn(7, 20, dtype=dtype), torch.randn(7, dtype=dtype)
    torch.testing.assert_close(mmkernels.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    chosen = _select(x, w, "")
    assert chosen.name == ("reference" if dtype == torch.float64 else "torch")
    with pytest.raises(_dispatch.NoBackendError, match="served by"):
        mmkernels.linear(x, w, b, backend="cpu")


def _auto(monkeypatch, klass, vendor, calibrate="0", family=26):
    monkeypatch.setenv("MMKERNELS_CALIBRATE", calibrate)
    monkeypatch.setattr(backends, "cpu_class", lambda: klass)
    monkeypatch.setattr(backends, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(backends, "cpu_family", lambda: family)
    _dispatch.clear_selection_cache()
    try:
        return _select(torch.randn(256, 64), torch.randn(96, 64), "").name  # above TINY_MACS
    finally:
        _dispatch.clear_selection_cache()


@needs_kernel
def test_auto_selection_follows_the_measured_class(monkeypatch):
    monkeypatch.delenv("MMKERNELS_CPU_ISA", raising=False)
    ours = torch.ops.mmkernels_C.qmatmul_cpu_isa().startswith("avx512")
    assert _auto(monkeypatch, "avx512", "amd") == ("cpu" if ours else "torch")
    for klass, vendor in (("amx", "intel"), ("avx512", "intel"), ("avx2", "amd"), ("scalar", "")):
        assert _auto(monkeypatch, klass, vendor) == "torch", (klass, vendor)
    assert _auto(monkeypatch, "avx512", "amd", family=25) == "torch"  # Zen 4: not measured


@needs_kernel
def test_forcing_a_lower_isa_keeps_torch(monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", "scalar")
    assert _auto(monkeypatch, "avx512", "amd") == "torch"


@needs_kernel
@pytest.mark.parametrize("winner", ["cpu", "torch"])
def test_calibration_decides_where_it_is_on(monkeypatch, tmp_path, winner):
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path))
    _calibration.clear()
    timed = []

    def fake_measure(contenders):
        timed.append(sorted(contenders))
        for f in contenders.values():
            f()  # both contenders really run
        return {"cpu": 1.0 if winner == "cpu" else 3.0, "torch": 2.0}, {}

    monkeypatch.setattr(_calibration, "_measure", fake_measure)
    try:
        assert _auto(monkeypatch, "amx", "intel", calibrate="1") == winner
        assert timed == [["cpu", "torch"]]
    finally:
        _calibration.clear()


def test_info_table_lists_the_op():
    rows = [r for r in _dispatch.capability_table() if r.get("op") == "linear"]
    assert {r["backend"] for r in rows} >= {"torch", "cpu", "reference"}


@needs_kernel
@pytest.mark.parametrize("backend", ["cpu", None])
def test_autograd_matches_torch(backend):
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(2, 19, 24, generator=g), torch.randn(33, 24, generator=g), torch.randn(33, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    twins = [t.clone().requires_grad_() for t in (x, w, b)]
    up = torch.randn(2, 19, 33, generator=g)
    (mmkernels.linear(*leaves, backend=backend) * up).sum().backward()
    (torch.nn.functional.linear(*twins) * up).sum().backward()
    for a, t in zip(leaves, twins):
        torch.testing.assert_close(a.grad, t.grad, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_autograd_with_an_activation_matches_torch(backend, activation):
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(2, 9, 24, generator=g), torch.randn(33, 24, generator=g) / 3, torch.randn(33, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    twins = [t.clone().requires_grad_() for t in (x, w, b)]
    up = torch.randn(2, 9, 33, generator=g)
    (mmkernels.linear(*leaves, backend=backend, activation=activation) * up).sum().backward()
    (linear_reference(*twins, activation) * up).sum().backward()
    for a, t in zip(leaves, twins):
        torch.testing.assert_close(a.grad, t.grad, rtol=1e-5, atol=1e-5)
    # no bias, and a gradient asked for x only
    xs = x.clone().requires_grad_()
    y = mmkernels.linear(xs, w, backend=backend, activation=activation)
    (gx,) = torch.autograd.grad((y * up).sum(), xs)
    xt = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((linear_reference(xt, w, None, activation) * up).sum(), xt)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gradcheck_in_float64_through_the_op_with_an_activation():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for activation in ("gelu", "silu"):
        assert torch.autograd.gradcheck(lambda *t: mmkernels.linear(*t, activation=activation), (x, w, b))


@needs_kernel
def test_double_backward_with_an_activation():
    """create_graph keeps the recomputed product and the activation in the graph."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for activation in (None, "gelu", "silu"):
        assert torch.autograd.gradgradcheck(lambda *t: mmkernels.linear(*t, activation=activation), (x, w, b))


@needs_kernel
def test_torch_compile_forward_and_backward_with_an_activation():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(70, 40, generator=g).div(6).requires_grad_()
    x = torch.randn(3, 11, 40, generator=g, requires_grad=True)
    f = torch.compile(lambda x, w: mmkernels.linear(x, w, backend="cpu", activation="gelu").sum(), backend="aot_eager")
    f(x, w).backward()
    xt, wt = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    linear_reference(xt, wt, None, "gelu").sum().backward()
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wt.grad, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gradcheck_in_float64_through_the_op():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: mmkernels.linear(*t), (x, w, b))


@needs_kernel
def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(70, 40, generator=g), torch.randn(70, generator=g)
    f = torch.compile(lambda x: torch.relu(mmkernels.linear(x, w, b, backend="cpu")), fullgraph=True, backend="eager")
    x = torch.randn(3, 11, 40, generator=g)
    torch.testing.assert_close(f(x), torch.relu(torch.nn.functional.linear(x, w, b)), rtol=1e-5, atol=1e-5)


def test_module_shares_parameters_and_state_dict():
    layer = torch.nn.Linear(24, 40)
    m = mmkernels.nn.Linear.from_linear(layer)
    assert isinstance(m, torch.nn.Linear)
    assert m.weight is layer.weight and m.bias is layer.bias
    assert m.state_dict().keys() == layer.state_dict().keys()
    x = torch.randn(5, 24)
    torch.testing.assert_close(m(x), layer(x), rtol=1e-5, atol=1e-5)
    m(x).sum().backward()
    assert layer.weight.grad is not None
    no_bias = mmkernels.nn.Linear.from_linear(torch.nn.Linear(24, 40, bias=False))
    assert no_bias.bias is None and no_bias.state_dict().keys() == {"weight"}
    torch.testing.assert_close(no_bias(x), x @ no_bias.weight.detach().T, rtol=1e-5, atol=1e-5)
    fresh = mmkernels.nn.Linear(24, 40, bias=False, backend="torch")
    assert fresh.bias is None and "backend='torch'" in repr(fresh)
    fresh.load_state_dict({"weight": layer.weight.detach()})
    torch.testing.assert_close(fresh(x), x @ layer.weight.detach().T)
    with pytest.raises(TypeError, match="layer must be a torch.nn.Linear"):
        mmkernels.nn.Linear.from_linear(torch.nn.Conv1d(2, 2, 1))


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_schema_fake_and_autograd_registration(with_bias):
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = torch.randn(33, 24, requires_grad=True)
    b = torch.randn(33, requires_grad=True) if with_bias else None
    for activation in ("", "gelu"):
        torch.library.opcheck(torch.ops.mmkernels.linear.default, (x, w, b, "cpu", activation))


@needs_kernel
def test_torch_compile_inductor():
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(70, 40, generator=g), torch.randn(70, generator=g)
    f = torch.compile(lambda x: torch.relu(mmkernels.linear(x, w, b, backend="cpu")) * 2, fullgraph=True)
    x = torch.randn(3, 11, 40, generator=g)
    torch.testing.assert_close(f(x), torch.relu(torch.nn.functional.linear(x, w, b)) * 2, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_torch_compile_with_an_activation(compiler):
    g = torch.Generator().manual_seed(9)
    w, b = torch.randn(70, 40, generator=g) / 6, torch.randn(70, generator=g)
    f = torch.compile(
        lambda x: mmkernels.linear(x, w, b, backend="cpu", activation="gelu"), fullgraph=True, backend=compiler
    )
    x = torch.randn(3, 11, 40, generator=g)
    torch.testing.assert_close(f(x), linear_reference(x, w, b, "gelu"), rtol=1e-5, atol=1e-5)


def test_module_with_an_activation():
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(5, 24)
    fused = mmkernels.nn.Linear.from_linear(layer, activation="quick_gelu")
    assert fused.weight is layer.weight and "activation='quick_gelu'" in repr(fused)
    torch.testing.assert_close(fused(x), layer(x) * torch.sigmoid(1.702 * layer(x)), rtol=1e-5, atol=1e-5)
    fresh = mmkernels.nn.Linear(24, 40, activation="relu")
    assert torch.equal(fresh(x), torch.relu(torch.nn.functional.linear(x, fresh.weight, fresh.bias)))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        mmkernels.nn.Linear(24, 40, activation="gelu_new")
    with pytest.raises(ValueError, match="activation must be None or one of"):
        mmkernels.nn.Linear.from_linear(layer, activation="tanh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_activation_in_other_dtypes(dtype):
    x, w = torch.randn(9, 20, dtype=dtype), torch.randn(7, 20, dtype=dtype)
    got = mmkernels.linear(x, w, activation="silu")
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch.nn.functional.silu(torch.nn.functional.linear(x, w)))


def test_autocast_with_an_activation_runs_torch():
    layer = torch.nn.Linear(24, 40)
    m = mmkernels.nn.Linear.from_linear(layer, activation="gelu")
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), torch.nn.functional.gelu(layer(x))
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_autocast_decides_the_compute_dtype_as_for_nn_linear():
    layer = torch.nn.Linear(24, 40)
    m = mmkernels.nn.Linear.from_linear(layer)
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), layer(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


@needs_kernel
def test_tiny_calls_stay_with_torch_on_the_measured_class(monkeypatch):
    monkeypatch.setenv("MMKERNELS_CALIBRATE", "0")
    monkeypatch.setattr(backends, "_measured_class", lambda: True)
    _dispatch.clear_selection_cache()
    try:
        assert _select(torch.randn(1, 64), torch.randn(64, 64), "").name == "torch"
        assert _select(torch.randn(1, 384), torch.randn(384, 384), "").name == "cpu"
    finally:
        _dispatch.clear_selection_cache()
