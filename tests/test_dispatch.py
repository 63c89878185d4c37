"""Backend selection: priority, overrides (argument and environment), the 'why not' report derived
from each backend's declarations, and the capability table built from the same data."""

import pytest

from mmkernels import _dispatch


class Call:
    def __init__(self, dtype_name="float32", device="cpu", head_dim=64, varlen=False, scores=False):
        self.dtype_name, self.device_type = dtype_name, device
        self.head_dim, self.head_dim_v = head_dim, head_dim
        self.varlen, self.scores = varlen, scores

    def __str__(self):
        return f"toy({self.dtype_name} on {self.device_type})"


OP = "toy_op_for_tests"


@pytest.fixture
def toy_op():
    _dispatch.define_op(OP, features={"varlen": lambda c: c.varlen, "scores": lambda c: c.scores})
    _dispatch.register(OP, _dispatch.Backend("cuda", lambda: "cuda", devices=("cuda",)))
    _dispatch.register(
        OP,
        _dispatch.Backend(
            "cpu",
            lambda: "cpu",
            devices=("cpu",),
            dtypes=("float32", "bfloat16"),
            dtype_notes={"float16": "float16 has no fast path here"},
            head_dims=_dispatch.HeadDims(8, 256, 8),
            features=("varlen",),
        ),
    )
    _dispatch.register(
        OP, _dispatch.Backend("triton", lambda: "triton", availability=lambda: (False, "triton not installed"))
    )
    _dispatch.register(OP, _dispatch.Backend("reference", lambda: "ref", devices=None))
    yield OP
    _dispatch._REGISTRY.pop(OP)
    _dispatch._OPS.pop(OP)
    _dispatch.clear_selection_cache()


def _backend(op, name):
    return {b.name: b for b in _dispatch.backends_for(op)}[name]


def test_priority_picks_first_capable(toy_op):
    assert _dispatch.select(toy_op, Call(), "cpu").name == "cpu"
    assert _dispatch.select(toy_op, Call(device="cuda"), "cuda").name == "cuda"


def test_every_reason_is_returned(toy_op):
    """Device, dtype, head dim and feature reasons all come back, not only the first."""
    reasons = _backend(toy_op, "cpu").reasons(Call("float16", "cuda", head_dim=12, scores=True))
    assert reasons == [
        "runs CPU tensors only, got cuda",
        "float16 has no fast path here",
        "head dim D=12 is not a multiple of 8 in [8, 256]",
        "value head dim Dv=12 is not a multiple of 8 in [8, 256]",
        "scores is not supported",
    ]
    assert _backend(toy_op, "cpu").reasons(Call("float64"))[0] == "dtype float64 not supported (float32, bfloat16)"
    # availability first, then the call's own reasons
    assert _backend(toy_op, "triton").reasons(Call()) == ["triton not installed"]
    assert _backend(toy_op, "cpu").reasons(Call(varlen=True)) == []


def test_check_hook_adds_reasons_and_tolerates_a_missing_module(toy_op):
    def check(call):
        if call.head_dim > 128:
            yield "head dim > 128 spills on this GPU"

    def broken(call):
        raise ImportError("no such module")

    b = _dispatch.Backend("cuda", lambda: 0, devices=("cuda",), check=check)
    assert b.reasons(Call(device="cuda", head_dim=256)) == ["head dim > 128 spills on this GPU"]
    assert _dispatch.Backend("cuda", lambda: 0, check=broken).reasons(Call()) == []


def test_run_spec_is_imported_once_then_bound():
    b = _dispatch.Backend("reference", "math:sqrt")
    assert b.run(16.0) == 4.0
    import math

    assert b.run is math.sqrt


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="backend name must be one of"):
        _dispatch.Backend("flash", lambda: 0)


def test_falls_back_to_reference_with_a_warning(toy_op):
    with pytest.warns(UserWarning, match=r"falls back to the slow reference(.|\n)*- cpu: float16"):
        chosen = _dispatch.select(toy_op, Call("float16"), "cpu")
    assert chosen.name == "reference"


def test_float64_goes_to_reference_silently(toy_op, recwarn):
    assert _dispatch.select(toy_op, Call("float64"), "cpu").name == "reference"
    assert not [w for w in recwarn if "slow reference" in str(w.message)]


def test_argument_then_environment_override(toy_op, monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    assert _dispatch.select(toy_op, Call(), "cpu").name == "reference"
    monkeypatch.setenv(f"MMKERNELS_{toy_op.upper()}_BACKEND", "cpu")
    assert _dispatch.select(toy_op, Call(), "cpu").name == "cpu"
    assert _dispatch.select(toy_op, Call(), "cpu", backend="reference").name == "reference"


def test_environment_override_read_on_every_call(toy_op):
    # Set and unset through os.environ directly (not monkeypatch): the fast read must see both.
    import os

    var = f"MMKERNELS_{toy_op.upper()}_BACKEND"
    assert _dispatch.select(toy_op, Call(), "cpu").name == "cpu"
    os.environ[var] = "reference"
    try:
        assert _dispatch.select(toy_op, Call(), "cpu").name == "reference"
    finally:
        del os.environ[var]
    assert _dispatch.select(toy_op, Call(), "cpu").name == "cpu"


def test_explicit_backend_that_cannot_run_explains(toy_op):
    with pytest.raises(_dispatch.NoBackendError) as info:
        _dispatch.select(toy_op, Call(), "cpu", backend="triton")
    text = str(info.value)
    assert "triton not installed" in text and "- cuda: runs CUDA tensors only, got cpu" in text


def test_no_capable_backend_lists_each_with_all_reasons(toy_op):
    _dispatch._REGISTRY[toy_op] = [b for b in _dispatch._REGISTRY[toy_op] if b.name != "reference"]
    _dispatch.clear_selection_cache()
    with pytest.raises(_dispatch.NoBackendError, match=r"No mmkernels backend can run toy") as info:
        _dispatch.select(toy_op, Call("float64", head_dim=12), "cpu")
    assert "- cpu: dtype float64 not supported (float32, bfloat16); head dim D=12 is not a multiple" in str(info.value)


def test_auto_rule_passes_a_capable_backend_over(toy_op):
    """An auto rule (e.g. 'torch only on AMX') steers auto-selection; explicit selection ignores it."""

    def rule(call):
        """only for bfloat16"""
        return call.dtype_name == "bfloat16", "toy rule: bfloat16 only"

    _dispatch.register(toy_op, _dispatch.Backend("torch", lambda: "torch", devices=("cpu",), auto_rule=rule))
    _dispatch._REGISTRY[toy_op].insert(0, _dispatch._REGISTRY[toy_op].pop())  # first in priority
    _dispatch.clear_selection_cache()
    assert _dispatch.select(toy_op, Call("bfloat16"), "cpu").name == "torch"
    assert _dispatch.select(toy_op, Call("float32"), "cpu").name == "cpu"
    assert _dispatch.select(toy_op, Call("float32"), "cpu", backend="torch").name == "torch"
    chosen, trail = _dispatch.auto_choice(toy_op, Call("float32"), "cpu")
    assert chosen.name == "cpu"
    assert dict(trail)["torch"] == "can run it, but auto-selection passes it over here: toy rule: bfloat16 only"
    row = next(r for r in _dispatch.capability_table() if r["op"] == toy_op and r["backend"] == "torch")
    assert "auto-selection: only for bfloat16" in row["notes"]


def test_capability_table_derives_from_declarations(toy_op):
    rows = {r["backend"]: r for r in _dispatch.capability_table() if r["op"] == toy_op}
    assert rows["cpu"]["dtypes"] == "f32,bf16" and rows["cpu"]["head dims"] == "8-256 /8"
    assert rows["cpu"]["features"] == "all but scores" and rows["cuda"]["features"] == "all"
    assert rows["triton"]["available"] == "no (triton not installed)"
    assert "f16: float16 has no fast path here" in rows["cpu"]["notes"]
    assert rows["reference"]["devices"] == "any"


def test_capability_table_has_every_attention_backend():
    rows = [r for r in _dispatch.capability_table() if r["op"] == "attention"]
    assert {"reference", "cpu", "triton", "cuda"} <= {r["backend"] for r in rows}


def test_reduce_cpu_declares_its_avx2_path():
    """The capability text used to drift from the code (reduce's CPU backend said 'AVX-512 / scalar'
    though it has an AVX2 path)."""
    rows = [r for r in _dispatch.capability_table() if r["op"] == "tome_plan" and r["backend"] == "cpu"]
    assert "AVX2" in rows[0]["notes"]


def test_one_extension_loader():
    from mmkernels import _extension
    from mmkernels.attention import backends as ab

    ok, why = _extension.CPU.availability("attention_fwd")
    assert ab.CPU.availability() == (ok, why)
    missing = _extension.CPU.availability("no_such_op_anywhere")
    assert not missing[0] and "no_such_op_anywhere" in missing[1] or "not built" in missing[1]
    with pytest.raises(RuntimeError, match="mmkernels._C is not available"):
        _extension.CPU.require("no_such_op_anywhere")


def test_kernels_bound_directly_behave_as_their_ops():
    """Extension.kernel: the pybind11 binding of a hot kernel (the same C++ function as the op),
    else the op; same results, and a failed check raises the op's RuntimeError message."""
    import torch

    from mmkernels import _extension

    if not _extension.CPU.availability("attention_fwd")[0]:
        pytest.skip("extension not built")
    ops = _extension.CPU.require("attention_fwd")
    for name in ("attention_fwd", "qmatmul_wo", "qmatmul_w8a8"):
        assert _extension.CPU.kernel(name) is not getattr(ops, name).default, name  # bound directly
    assert _extension.CPU.kernel("reduce_gather_rows") is ops.reduce_gather_rows.default  # not bound
    with pytest.raises(RuntimeError, match="mmkernels._C is not available"):
        _extension.CPU.kernel("no_such_op_anywhere")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    outs = [torch.full((2, 3, 5, 16), float("nan")) for _ in range(2)]
    for fn, out in zip((_extension.CPU.kernel("attention_fwd"), ops.attention_fwd.default), outs):
        fn(q, k, v, None, None, None, 5, 5, False, 0.25, 0, out, None, None)
    assert torch.equal(outs[0], outs[1]) and not outs[0].isnan().any()
    for fn in (_extension.CPU.kernel("attention_fwd"), ops.attention_fwd.default):
        with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16") as info:
            fn(q.double(), k.double(), v.double(), None, None, None, 5, 5, False, 0.25, 0, outs[0].double(), None, None)
        assert "Exception raised from" not in str(info.value)  # no C++ backtrace in the message
