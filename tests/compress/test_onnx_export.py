"""export_onnx: run the exported graph with onnxruntime (CPUExecutionProvider), compare with the
PyTorch QuantLinear output, and check the graph stays quantized.

Tolerances: weight-only layers dequantize exactly like ``qmatmul`` (float32 ``(u - z) * s``), so
only the float32 summation order differs (MLAS vs ATen): ~1e-6 relative. W8A8 reproduces
``qmatmul``'s per-token quantization op for op; the first layer matches to float32 rounding, but a
second layer sees inputs that already differ by ~1e-7, which can move ``x / s`` across a rounding
tie and change one ``x_q`` by 1: an output moves by at most ``s_x * max|W|``; we allow 1e-3 (its
size here) and require the median error to stay at float32 level.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels.nn import QuantLinear
from mmkernels.quant import quantize_weight, smoothquant_factors
from mmkernels.compress.onnx_export import onnx_stand_in

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Small(nn.Module):
    def __init__(self, k=128, h=256, n=64):
        super().__init__()
        self.fc1 = nn.Linear(k, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, n)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def quantize(lin, perm=False, smooth=False, **kw):
    if smooth:
        act = torch.rand(lin.in_features) * 4 + 0.1
        kw["smooth"] = smoothquant_factors(act, lin.weight)
    if perm:
        p = torch.randperm(lin.in_features)
        qw = quantize_weight(lin.weight.detach()[:, p], kw["bits"], kw.get("group_size"), kw.get("symmetric", True))
        return QuantLinear.from_quantized(qw, lin.bias, input_perm=p, backend="reference")
    return QuantLinear.from_linear(lin, backend="reference", **kw)


def make_model(k=128, **kw):
    torch.manual_seed(0)
    m = Small(k=k)
    m.fc1, m.fc2 = quantize(m.fc1, **kw), quantize(m.fc2, **kw)
    return m.eval()


CASES = {
    "int4-sym-g32": dict(bits=4, group_size=32),
    "int4-asym-g32": dict(bits=4, group_size=32, symmetric=False),
    "int4-sym-g128": dict(bits=4, group_size=128),
    "int4-asym-g128": dict(bits=4, group_size=128, symmetric=False),
    "int4-sym-channel": dict(bits=4),
    "int4-asym-g64-actorder": dict(bits=4, group_size=64, symmetric=False, perm=True),
    "int8-sym": dict(bits=8),
    "int8-asym": dict(bits=8, symmetric=False),
    "int8-asym-g32": dict(bits=8, group_size=32, symmetric=False),
    "w8a8": dict(bits=8, act_bits=8),
    "w8a8-asym": dict(bits=8, act_bits=8, symmetric=False),
    "w8a8-smooth": dict(bits=8, act_bits=8, smooth=True),
    "fp8": dict(bits=8, fp8=True),
    "fp8-g32": dict(bits=8, fp8=True, group_size=32),
    "fp8-w8a8": dict(bits=8, fp8=True, act_bits=8),
}


def run_onnx(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def check_quantized_graph(proto, model, kw):
    ops = [n.op_type for n in proto.graph.node]
    if kw.get("fp8"):
        assert ops.count("Cast") >= 2
    elif kw.get("act_bits"):
        assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    else:
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 and all(n.domain == "com.microsoft" for n in nbits)
        assert "MatMul" not in ops and "Gemm" not in ops
        attrs = {a.name: a.i for a in nbits[0].attribute}
        assert (attrs["K"], attrs["N"], attrs["bits"]) == (128, 256, kw["bits"])
        assert attrs["block_size"] == kw.get("group_size", 128)
    # no float copy of a full weight: float initializers / constants stay far below N * K
    smallest = min(m.in_features * m.out_features for m in (model.fc1, model.fc2))
    big = [
        (i.name, i.data_type, list(i.dims))
        for i in proto.graph.initializer
        if i.data_type in (1, 10, 11, 16) and _numel(i.dims) >= smallest // 4
    ]
    assert not big, big
    for node in proto.graph.node:
        for a in node.attribute:
            if a.type == a.TENSOR:
                assert _numel(a.t.dims) < smallest // 4


def _numel(dims):
    out = 1
    for d in dims:
        out *= d
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_export_runs_in_onnxruntime_and_matches(case, tmp_path):
    kw = CASES[case]
    model = make_model(**kw)
    x = torch.randn(2, 7, 128)
    path = tmp_path / "model.onnx"
    proto = mmkernels.export_onnx(
        model, (x,), str(path), dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},)
    )
    assert path.stat().st_size > 0
    check_quantized_graph(proto, model, kw)
    assert isinstance(model.fc1, QuantLinear) and model.training is False  # restored
    for shape in ((2, 7, 128), (3, 11, 128)):  # dynamic batch / sequence
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x)
        got = run_onnx(proto, x)
        err = (got - want).abs()
        if kw.get("act_bits"):
            assert err.max() < 1e-3 and err.median() < 1e-5, (err.max(), err.median())
        else:
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_outlier_split_layer_exports_as_two_integer_matmuls():
    from mmkernels.nn import OutlierSplitLinear

    torch.manual_seed(0)
    model = Small().eval()
    idx = torch.tensor([5, 64, 100])
    keep = torch.ones(128, dtype=torch.bool)
    keep[idx] = False
    w = model.fc1.weight.detach()
    main = QuantLinear.from_quantized(quantize_weight(w[:, keep], 8), model.fc1.bias.detach(), act_bits=8)
    model.fc1 = OutlierSplitLinear(main, QuantLinear.from_quantized(quantize_weight(w[:, idx], 8), act_bits=8), idx)
    model.fc2 = QuantLinear.from_linear(model.fc2, bits=8, act_bits=8)
    x = torch.randn(2, 7, 128)
    x[..., idx] *= 30  # the outlier channels
    proto = mmkernels.export_onnx(model, (x,))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulInteger") == 3 and "MatMul" not in ops
    with torch.no_grad():
        want = model(x)
    err = (run_onnx(proto, x) - want).abs()
    assert err.max() < 1e-3 and err.median() < 1e-5, (err.max(), err.median())


@pytest.mark.parametrize(
    "kw", [dict(bits=8, act_bits=8), dict(bits=8, act_bits=8, smooth=True), dict(bits=8, act_bits=8, symmetric=False)]
)
def test_w8a8_first_layer_matches_to_float32_rounding(kw):
    """Same inputs, same quantization steps: equal up to float32 rounding of the epilogue."""
    torch.manual_seed(0)
    model = nn.Sequential(quantize(nn.Linear(96, 48), **kw))
    x = torch.randn(5, 96) * 3
    proto = mmkernels.export_onnx(model, (x,))
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(run_onnx(proto, x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [48, 40, 96])
def test_per_channel_block_choice_and_padding(k):
    """Per-channel int4: block = largest power of two dividing K, else 16 with a padded block."""
    for sym in (True, False):
        torch.manual_seed(k)
        model = nn.Sequential(quantize(nn.Linear(k, 24), bits=4, symmetric=sym))
        x = torch.randn(3, k)
        proto = mmkernels.export_onnx(model, (x,))
        node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
        block = {a.name: a.i for a in node.attribute}["block_size"]
        assert block == {48: 16, 40: 16, 96: 32}[k]
        with torch.no_grad():
            torch.testing.assert_close(run_onnx(proto, x), model(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "case", ["int4-asym-g32", "int4-sym-channel", "int8-asym", "w8a8-asym", "fp8-g32", "int4-asym-g64-actorder"]
)
def test_stand_in_decodes_the_onnx_layout(case):
    """The stand-ins' eager forward decodes the ONNX-layout buffers (B, packed zero points, ...):
    an onnxruntime-free check of the packing."""
    model = make_model(**CASES[case])
    x = torch.randn(4, 128)
    with torch.no_grad():
        want = model.fc1(x)
        got = onnx_stand_in(model.fc1)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["int4-sym-g32", "w8a8"])
def test_a_fused_activation_is_exported(case):
    """A QuantLinear that mmkernels.patch gave its MLP's activation exports it after the product."""
    model = make_model(**CASES[case])
    model.fc1.activation = "gelu"
    x = torch.randn(2, 7, 128)
    proto = mmkernels.export_onnx(model, (x,))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(onnx_stand_in(model.fc1)(x), model.fc1(x), rtol=1e-5, atol=1e-5)
    got = run_onnx(proto, x)
    if CASES[case].get("act_bits"):
        assert (got - want).abs().max() < 1e-3
    else:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_export_errors():
    model = make_model(bits=8, fp8=True)
    with pytest.raises(ValueError, match="need opset >= 19"):
        mmkernels.export_onnx(model, (torch.randn(2, 128),), opset=18)
    lone = quantize(nn.Linear(32, 8), bits=8)
    with pytest.raises(ValueError, match="wrap a lone QuantLinear"):
        mmkernels.export_onnx(lone, (torch.randn(2, 32),))
    with pytest.raises(ValueError, match="accuracy_level"):
        mmkernels.export_onnx(model, (torch.randn(2, 128),), accuracy_level=7)
