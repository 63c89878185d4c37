"""Backend selection: priority, overrides (argument and environment), and the 'why not' report."""
import pytest

from mmkernels import _dispatch


class Call:
    def __init__(self, dtype_name="float32", device="cpu"):
        self.dtype_name, self.device = dtype_name, device

    def __str__(self):
        return f"toy({self.dtype_name} on {self.device})"


@pytest.fixture
def toy_op():
    op = "toy_op_for_tests"
    _dispatch.register(op, _dispatch.Backend(
        "cuda", run=lambda: "cuda", unsupported=lambda c: [] if c.device == "cuda" else ["cuda only"],
        auto_devices=("cuda",)))
    _dispatch.register(op, _dispatch.Backend(
        "cpu", run=lambda: "cpu",
        unsupported=lambda c: [f"{c.dtype_name} unsupported"]
        if c.dtype_name in ("float64", "float16") else [],
        auto_devices=("cpu",)))
    _dispatch.register(op, _dispatch.Backend(
        "triton", run=lambda: "triton", unsupported=lambda c: [],
        availability=lambda: (False, "triton not installed")))
    _dispatch.register(op, _dispatch.Backend("reference", run=lambda: "ref",
                                             unsupported=lambda c: []))
    yield op
    _dispatch._REGISTRY.pop(op)
    _dispatch._SELECTED.clear()


def test_priority_picks_first_capable(toy_op):
    assert _dispatch.select(toy_op, Call(), "cpu").name == "cpu"
    assert _dispatch.select(toy_op, Call(device="cuda"), "cuda").name == "cuda"


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
    assert "triton not installed" in text and "- cuda: cuda only" in text


def test_no_capable_backend_lists_each(toy_op):
    _dispatch._REGISTRY[toy_op] = [b for b in _dispatch._REGISTRY[toy_op] if b.name != "reference"]
    _dispatch._SELECTED.clear()
    with pytest.raises(_dispatch.NoBackendError, match=r"No mmkernels backend can run toy"):
        _dispatch.select(toy_op, Call("float64"), "cpu")


def test_capability_table_has_every_attention_backend():
    rows = [r for r in _dispatch.capability_table() if r["op"] == "attention"]
    assert {r["backend"] for r in rows} == {"reference", "cpu", "triton", "cuda"}
