"""save_quantized / load_quantized: round trips for every format, refused corruptions, and an
independent check of the GPTQ and compressed-tensors packing (plain integer arithmetic here)."""

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mmkernels
from mmkernels.nn import OutlierSplitLinear, QuantLinear
from mmkernels.compress import QuantizedCheckpoint
from mmkernels.quant import quantize_weight, smoothquant_factors
from mmkernels.quant.packing import unpack_weight
from mmkernels.compress.checkpoint import mmkernels_format
from mmkernels.compress.checkpoint.common import unsigned_view


class Small(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear; the LayerNorm stays in float."""

    def __init__(self, k=64, h=128, n=32, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(k, h, bias=bias)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, n, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def quantize(lin, *, perm=False, smooth=False, **kw):
    torch.manual_seed(lin.in_features)
    with torch.no_grad():  # a non-trivial LayerNorm and bias
        lin.weight.mul_(1 + torch.rand_like(lin.weight))
    if smooth:
        act = torch.rand(lin.in_features) * 4 + 0.1
        return QuantLinear.from_linear(lin, smooth=smoothquant_factors(act, lin.weight), **kw)
    if perm:
        p = torch.randperm(lin.in_features)
        qw = quantize_weight(lin.weight.detach()[:, p], kw["bits"], kw.get("group_size"), kw.get("symmetric", True))
        return QuantLinear.from_quantized(qw, lin.bias, input_perm=p)
    return QuantLinear.from_linear(lin, **kw)


def make_model(bias=True, **kw):
    torch.manual_seed(0)
    m = Small(bias=bias)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.1, 0.1)
    m.fc1 = quantize(m.fc1, **kw)
    m.fc2 = quantize(m.fc2, **kw)
    return m


X = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))

INT_CASES = {
    "int8-sym-channel": dict(bits=8),
    "int8-asym-channel": dict(bits=8, symmetric=False),
    "int8-sym-g64": dict(bits=8, group_size=64),
    "int4-sym-g32": dict(bits=4, group_size=32),
    "int4-asym-g64": dict(bits=4, group_size=64, symmetric=False),
    "int4-sym-channel": dict(bits=4),
    "int4-sym-g32-actorder": dict(bits=4, group_size=32, perm=True),
    "int4-asym-g32-actorder": dict(bits=4, group_size=32, symmetric=False, perm=True),
}
ALL_CASES = dict(
    INT_CASES,
    **{
        "w8a8": dict(bits=8, act_bits=8),
        "w8a8-asym": dict(bits=8, act_bits=8, symmetric=False),
        "w8a8-smooth": dict(bits=8, act_bits=8, smooth=True),
        "fp8": dict(bits=8, fp8=True),
        "fp8-w8a8": dict(bits=8, fp8=True, act_bits=8),
    },
)


def assert_same_layer(a: QuantLinear, b: QuantLinear, *, scales_exact=True):
    """Same integers, zero points and group of every original column; same scales (or their
    float16 rounding); same bias, smoothing, activation mode."""
    qa, qb = a.quantized, b.quantized
    assert (qa.bits, qa.group_size, qa.symmetric, qa.fp8) == (qb.bits, qb.group_size, qb.symmetric, qb.fp8)
    assert a.act_bits == b.act_bits
    if qa.fp8:
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight())
    else:
        va, vb = unsigned_view(a), unsigned_view(b)
        assert torch.equal(va.u, vb.u) and torch.equal(va.g_idx, vb.g_idx)
        assert (va.zeros is None) == (vb.zeros is None)
        if va.zeros is not None:
            assert torch.equal(va.zeros, vb.zeros)
    want = qa.scales if scales_exact else qa.scales.half().float()
    assert torch.equal(qb.scales, want)
    for name in ("bias", "smooth"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None)
        if ta is not None:
            assert torch.equal(tb.float(), ta.float() if scales_exact else ta.half().float())


def roundtrip(model, tmp_path, fmt, **kw):
    path = tmp_path / fmt
    mmkernels.save_quantized(model, path, format=fmt, **kw)
    return mmkernels.load_quantized(path, Small(bias=model.fc1.bias is not None))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(ALL_CASES))
def test_mmkernels_format_is_lossless(tmp_path, case, bias):
    model = make_model(bias=bias, **ALL_CASES[case])
    loaded = roundtrip(model, tmp_path, "mmkernels")
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert sd[key].dtype == sd2[key].dtype and torch.equal(sd[key], sd2[key]), key
    for name in ("fc1", "fc2"):
        assert_same_layer(getattr(model, name), getattr(loaded, name))
    assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_compressed_tensors_roundtrip(tmp_path, case):
    model = make_model(**ALL_CASES[case])
    if ALL_CASES[case].get("smooth"):
        with pytest.raises(ValueError, match="smooth"):
            mmkernels.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
        return
    loaded = roundtrip(model, tmp_path, "compressed-tensors")  # float32 model: float32 scales
    for name in ("fc1", "fc2"):
        assert_same_layer(getattr(model, name), getattr(loaded, name))
    assert torch.equal(loaded.norm.weight, model.norm.weight)
    # act-order may reorder columns inside a group: same layer, another float summation order
    torch.testing.assert_close(loaded(X), model(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(INT_CASES))
def test_gptq_roundtrip_float16_scales(tmp_path, case):
    """Default float16 scales / bias: integers exact, scales = their float16 rounding, outputs
    within the effect of that rounding (relative 2^-11 per scale and bias)."""
    model = make_model(**INT_CASES[case])
    loaded = roundtrip(model, tmp_path, "gptq")
    for name in ("fc1", "fc2"):
        assert_same_layer(getattr(model, name), getattr(loaded, name), scales_exact=False)
    y, y2 = model(X), loaded(X)
    assert (y2 - y).norm() / y.norm() < 2e-3


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("case", list(INT_CASES))
def test_gptq_roundtrip_exact(tmp_path, case, fmt):
    model = make_model(**INT_CASES[case])
    loaded = roundtrip(model, tmp_path, fmt, scale_dtype=torch.float32)
    for name in ("fc1", "fc2"):
        assert_same_layer(getattr(model, name), getattr(loaded, name))
    torch.testing.assert_close(loaded(X), model(X), rtol=1e-6, atol=1e-6)


def test_gptq_float16_representable_scales_roundtrip_exactly(tmp_path):
    model = make_model(bits=4, group_size=32, symmetric=False)
    for layer in (model.fc1, model.fc2):
        layer.quantized.scales.copy_(layer.quantized.scales.half().float())
        layer.bias.data = layer.bias.data.half().float()
    loaded = roundtrip(model, tmp_path, "gptq")
    for name in ("fc1", "fc2"):
        assert_same_layer(getattr(model, name), getattr(loaded, name))
    assert torch.equal(loaded(X), model(X))


def test_load_without_model_returns_layers_and_tensors(tmp_path):
    model = make_model(bits=4, group_size=32, perm=True)
    for fmt in ("mmkernels", "gptq", "compressed-tensors"):
        mmkernels.save_quantized(
            model, tmp_path / fmt, format=fmt, **({"scale_dtype": torch.float32} if fmt == "gptq" else {})
        )
        ckpt = mmkernels.load_quantized(tmp_path / fmt)
        assert isinstance(ckpt, QuantizedCheckpoint) and ckpt.format == fmt
        assert sorted(ckpt.layers) == ["fc1", "fc2"]
        assert sorted(ckpt.tensors) == ["norm.bias", "norm.weight"]
        fresh = Small()
        fresh.fc1, fresh.fc2 = ckpt.layers["fc1"], ckpt.layers["fc2"]
        fresh.load_state_dict(ckpt.state_dict(), strict=True)
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-6, atol=1e-6)


def test_mixed_configurations(tmp_path):
    model = make_model(bits=8)
    model.fc2 = quantize(Small().fc2, bits=4, group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="one bits / group_size / sym"):
        mmkernels.save_quantized(model, tmp_path / "g", format="gptq")
    loaded = roundtrip(model, tmp_path, "compressed-tensors")
    cfg = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    assert sorted(t for g in groups.values() for t in g["targets"]) == ["fc1", "fc2"]
    for name in ("fc1", "fc2"):
        assert_same_layer(getattr(model, name), getattr(loaded, name))


def test_unquantized_linear_is_kept_and_ignored(tmp_path):
    model = make_model(bits=4, group_size=32)
    model.fc2 = Small().fc2  # float
    loaded = roundtrip(model, tmp_path, "compressed-tensors")
    cfg = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"] == ["fc2"]
    assert type(loaded.fc2) is nn.Linear and torch.equal(loaded.fc2.weight, model.fc2.weight)
    assert torch.equal(loaded(X), model(X))


def test_gptq_v1_refuses_zero_point_zero_v2_keeps_it(tmp_path):
    model = make_model(bits=4, group_size=32, symmetric=False)
    with torch.no_grad():  # an all-positive group: zero point 0
        w = torch.rand(128, 64) + 0.1
        model.fc1 = QuantLinear.from_quantized(quantize_weight(w, 4, 32, symmetric=False), model.fc1.bias)
    assert int(model.fc1.quantized.zeros.min()) == 0
    with pytest.raises(ValueError, match="gptq_v2"):
        mmkernels.save_quantized(model, tmp_path / "v1", format="gptq")
    loaded = roundtrip(model, tmp_path, "gptq_v2", scale_dtype=torch.float32)
    assert_same_layer(model.fc1, loaded.fc1)
    qc = json.loads((tmp_path / "gptq_v2" / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2"


def make_split_model(outlier_index=(3, 17, 40)):
    """Small with fc1 an OutlierSplitLinear (W8A8 main + W8A8 outlier part), fc2 W8A8."""
    torch.manual_seed(0)
    m = Small()
    idx = torch.tensor(outlier_index)
    keep = torch.ones(m.fc1.in_features, dtype=torch.bool)
    keep[idx] = False
    w = m.fc1.weight.detach()
    main = QuantLinear.from_quantized(quantize_weight(w[:, keep], 8), m.fc1.bias.detach(), act_bits=8)
    outliers = QuantLinear.from_quantized(quantize_weight(w[:, idx], 8), act_bits=8)
    m.fc1 = OutlierSplitLinear(main, outliers, idx)
    m.fc2 = QuantLinear.from_linear(m.fc2, bits=8, act_bits=8)
    return m


def test_outlier_split_layers_roundtrip_in_mmkernels_format(tmp_path):
    model = make_split_model()
    path = tmp_path / "split"
    mmkernels.save_quantized(model, path)
    meta = json.loads((path / "mmkernels.json").read_text())
    assert meta["format_version"] == 2
    assert meta["split_layers"] == {"fc1": {"in_features": 64, "out_features": 128, "outlier_channels": 3}}
    loaded = mmkernels.load_quantized(path, Small())  # a float model in
    assert isinstance(loaded.fc1, OutlierSplitLinear)
    assert loaded.fc1.outlier_index.tolist() == [3, 17, 40]
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert sd[key].dtype == sd2[key].dtype and torch.equal(sd[key], sd2[key]), key
    assert torch.equal(loaded(X), model(X))
    ckpt = mmkernels.load_quantized(path)  # no model
    assert set(ckpt.layers) == {"fc1", "fc2"} and isinstance(ckpt.layers["fc1"], OutlierSplitLinear)
    assert "fc1.main_index" not in ckpt.tensors and ckpt.state_dict().keys() == sd.keys()
    # A model without split layers still writes format_version 1 (readable by older versions).
    mmkernels.save_quantized(make_model(bits=8), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "mmkernels.json").read_text())["format_version"] == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["split_layers"]["fc1"].update(outlier_channels=2), "with 2 outlier channels"),
        (lambda m: m["split_layers"]["fc1"].update(extra=1), "must record exactly"),
        (lambda m: m.update(format_version=1), "'split_layers' needs format_version >= 2"),
        (lambda m: m["layers"].pop("fc1.outliers"), "'fc1.outliers' is not recorded"),
    ],
)
def test_split_layer_metadata_inconsistent_is_refused(tmp_path, edit, message):
    path = tmp_path / "split"
    mmkernels.save_quantized(make_split_model(), path)
    _edit_meta(path, edit)
    with pytest.raises(ValueError, match=message):
        mmkernels.load_quantized(path, Small())


def test_split_layer_indices_must_partition_the_channels(tmp_path):
    path = tmp_path / "split"
    mmkernels.save_quantized(make_split_model(), path)
    f = path / "model.safetensors"
    tensors = load_file(f)
    tensors["fc1.main_index"] = tensors["fc1.main_index"].flip(0).contiguous()
    save_file(tensors, f)
    _edit_meta(
        path,
        lambda m: m["tensors"]["fc1.main_index"].update(
            sha256=mmkernels_format._io.tensor_sha256(tensors["fc1.main_index"])
        ),
    )
    with pytest.raises(ValueError, match="main_index is not the complement"):
        mmkernels.load_quantized(path, Small())


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_ecosystem_formats_refuse_outlier_split_layers(tmp_path, fmt):
    with pytest.raises(
        ValueError,
        match=f"format='{fmt}' cannot express OutlierSplitLinear "
        r"layers \(\['fc1'\]",
    ):
        mmkernels.save_quantized(make_split_model(), tmp_path / "x", format=fmt)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_ecosystem_formats_refuse_what_they_cannot_hold(tmp_path, fmt):
    cases = [dict(bits=8, act_bits=8, smooth=True)] + (
        [dict(bits=8, act_bits=8), dict(bits=8, fp8=True)] if fmt == "gptq" else []
    )
    for kw in cases:
        with pytest.raises(ValueError, match="cannot hold layer 'fc1'"):
            mmkernels.save_quantized(make_model(**kw), tmp_path / "x", format=fmt)


def test_loading_executes_nothing(tmp_path, monkeypatch):
    model = make_model(bits=4, group_size=32)
    for fmt in ("mmkernels", "gptq", "compressed-tensors"):
        mmkernels.save_quantized(model, tmp_path / fmt, format=fmt)

    def forbidden(*a, **k):
        raise AssertionError("unpickling during load_quantized")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    for fmt in ("mmkernels", "gptq", "compressed-tensors"):
        mmkernels.load_quantized(tmp_path / fmt, Small())


def test_save_refuses_to_overwrite(tmp_path):
    model = make_model(bits=8)
    mmkernels.save_quantized(model, tmp_path / "a")
    with pytest.raises(ValueError, match="overwrite=True"):
        mmkernels.save_quantized(model, tmp_path / "a", format="gptq")
    mmkernels.save_quantized(model, tmp_path / "a", format="gptq", overwrite=True)
    assert not (tmp_path / "a" / "mmkernels.json").exists()
    assert isinstance(mmkernels.load_quantized(tmp_path / "a", Small()).fc1, QuantLinear)


# ---------------------------------------------------------------------------------------------
# Independent checks of the ecosystem packings (integer arithmetic written out here)
# ---------------------------------------------------------------------------------------------


def _word(t, i, j):
    return int(t[i, j]) & 0xFFFFFFFF  # the int32's 32-bit pattern


def _original_q(layer):
    """Stored integers (signed if symmetric) in original column order, as Python ints."""
    qw = layer.quantized
    q = unpack_weight(qw.qweight, qw.bits, qw.symmetric)
    if layer.input_perm is not None:
        q = q[:, torch.argsort(layer.input_perm)]
    return q.tolist()


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=4, group_size=32),
        dict(bits=8),
        dict(bits=4, group_size=32, symmetric=False, perm=True),
        dict(bits=8, group_size=64, symmetric=False),
    ],
    ids=["int4-sym", "int8-sym", "int4-asym-actorder", "int8-asym"],
)
def test_gptq_packing_independently(tmp_path, kw):
    model = make_model(**kw)
    mmkernels.save_quantized(model, tmp_path, format="gptq")
    sd = load_file(tmp_path / "model.safetensors")
    layer, bits = model.fc1, kw["bits"]
    n, k = layer.out_features, layer.in_features
    per, mask, half = 32 // bits, (1 << bits) - 1, 1 << (bits - 1)
    qweight, qzeros = sd["fc1.qweight"], sd["fc1.qzeros"]
    assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (k // per, n)
    assert sd["fc1.scales"].dtype == torch.float16 and sd["fc1.g_idx"].dtype == torch.int32
    q = _original_q(layer)
    for kk in range(k):
        for nn_ in range(n):
            stored = (_word(qweight, kk // per, nn_) >> (bits * (kk % per))) & mask
            expect = q[nn_][kk] + half if layer.quantized.symmetric else q[nn_][kk]
            assert stored == expect, (kk, nn_)
    g_idx = sd["fc1.g_idx"].tolist()
    zeros = None if layer.quantized.symmetric else layer.quantized.zeros.tolist()
    gs = layer.quantized.group_size or k
    for g in range(qzeros.shape[0]):
        for nn_ in range(n):
            stored = (_word(qzeros, g, nn_ // per) >> (bits * (nn_ % per))) & mask
            z = half if zeros is None else zeros[nn_][g]
            assert stored == z - 1, "v1 GPTQ stores zero - 1"
    if layer.input_perm is not None:  # g_idx[perm[j]] = j // group_size
        perm = layer.input_perm.tolist()
        assert all(g_idx[perm[j]] == j // gs for j in range(k))
    else:
        assert g_idx == [kk // gs for kk in range(k)]
    if layer.quantized.symmetric and bits == 4:
        assert set(qzeros.view(torch.int32).flatten().tolist()) == {0x77777777}
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qc["bits"] == bits and qc["sym"] == layer.quantized.symmetric
    assert qc["group_size"] == (layer.quantized.group_size or -1)
    assert qc["desc_act"] == bool(kw.get("perm")) and qc["checkpoint_format"] == "gptq"
    assert qc["quant_method"] == "gptq"


@pytest.mark.parametrize(
    "kw",
    [dict(bits=4, group_size=32), dict(bits=4, symmetric=False), dict(bits=8, group_size=64, symmetric=False)],
    ids=["int4-sym", "int4-asym-channel", "int8-asym"],
)
def test_compressed_tensors_packing_independently(tmp_path, kw):
    model = make_model(**kw)
    mmkernels.save_quantized(model, tmp_path, format="compressed-tensors")
    sd = load_file(tmp_path / "model.safetensors")
    layer, bits = model.fc1, kw["bits"]
    n, k = layer.out_features, layer.in_features
    per, mask, half = 32 // bits, (1 << bits) - 1, 1 << (bits - 1)
    packed = sd["fc1.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (n, k // per)
    assert sd["fc1.weight_shape"].tolist() == [n, k]
    q = _original_q(layer)
    for nn_ in range(n):
        for kk in range(k):
            stored = (_word(packed, nn_, kk // per) >> (bits * (kk % per))) & mask
            # compressed-tensors: signed x_q offset by 2^(bits-1); mmkernels asym is unsigned
            signed = q[nn_][kk] if layer.quantized.symmetric else q[nn_][kk] - half
            assert stored - half == signed
    if not layer.quantized.symmetric:
        zp = sd["fc1.weight_zero_point"]
        zeros = layer.quantized.zeros.tolist()
        assert tuple(zp.shape) == (n // per, len(zeros[0]))
        for nn_ in range(n):
            for g in range(zp.shape[1]):
                stored = (_word(zp, nn_ // per, g) >> (bits * (nn_ % per))) & mask
                assert stored - half == zeros[nn_][g] - half
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["type"]) == (bits, layer.quantized.symmetric, "int")
    assert w["strategy"] == ("group" if layer.quantized.group_size else "channel")


# ---------------------------------------------------------------------------------------------
# Refused checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = make_model(bits=4, group_size=32, symmetric=False, perm=True)
    path = tmp_path / "ckpt"
    mmkernels.save_quantized(model, path)
    return path


def _edit_meta(path, fn):
    meta_path = path / "mmkernels.json"
    meta = json.loads(meta_path.read_text())
    fn(meta)
    meta_path.write_text(json.dumps(meta))


def _tensor_offset(file, key):
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0]


def test_truncated_file_is_refused(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors file"):
        mmkernels.load_quantized(saved, Small())
    f.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        mmkernels.load_quantized(saved)


def test_flipped_byte_is_refused(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[_tensor_offset(f, "fc2.quantized.qweight") + 3] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="'fc2.quantized.qweight' fails its sha256 check"):
        mmkernels.load_quantized(saved, Small())


def test_newer_or_unknown_format_is_refused(saved):
    newer = mmkernels_format.FORMAT_VERSION + 1
    _edit_meta(saved, lambda m: m.update(format_version=newer))
    with pytest.raises(ValueError, match=f"format_version {newer} was written by a newer mmkernels"):
        mmkernels.load_quantized(saved)
    _edit_meta(saved, lambda m: m.update(format_version=1, format="other"))
    with pytest.raises(ValueError, match="'format' is 'other'"):
        mmkernels.load_quantized(saved)
    (saved / "mmkernels.json").write_text("{not json")
    with pytest.raises(ValueError, match="mmkernels.json: not valid JSON"):
        mmkernels.load_quantized(saved)


def test_missing_and_unexpected_tensors_are_refused(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if k != "norm.bias"}, f)
    with pytest.raises(ValueError, match=r"missing from the file: \['norm.bias'\]"):
        mmkernels.load_quantized(saved)
    save_file(dict(tensors, extra=torch.zeros(3)), f)
    with pytest.raises(ValueError, match=r"not recorded in mmkernels.json: \['extra'\]"):
        mmkernels.load_quantized(saved)


def test_metadata_inconsistent_with_tensors_is_refused(saved):
    def wrong_shape(m):
        m["tensors"]["fc1.quantized.scales"]["shape"] = [128, 1]

    _edit_meta(saved, wrong_shape)
    with pytest.raises(
        ValueError,
        match=r"'fc1.quantized.scales' is float32\[128, 2\], but "
        r"mmkernels.json records float32\[128, 1\]",
    ):
        mmkernels.load_quantized(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(bits=8), r"'fc1.quantized.qweight' is uint8\[128, 32\], expected uint8\[128, 64\]"),
        (
            dict(group_size=64),
            r"'fc1.quantized.scales' is float32\[128, 2\], expected "
            r"float32\[128, 1\]",
        ),
        (
            dict(symmetric=True),
            r"fc1.quantized.meta holds \[4, 32, 128, 64, 0, 0\], but the "
            r"recorded configuration gives \[4, 32, 128, 64, 1, 0\]",
        ),
        (
            dict(input_perm=False),
            r"'fc1.input_perm' is present but the layer records "
            r"input_perm=false",
        ),
        (dict(bias=False), r"'fc1.bias' is present but the layer records bias=false"),
        (dict(smooth=True), r"'fc1.smooth' is missing"),
        (dict(act_bits=8), "act_bits must be None or 8, and act_bits=8 needs an 8-bit"),
    ],
)
def test_layer_config_inconsistent_with_tensors_is_refused(saved, edit, message):
    _edit_meta(saved, lambda m: m["layers"]["fc1"].update(edit))
    with pytest.raises(ValueError, match=message):
        mmkernels.load_quantized(saved)


def test_meta_buffer_disagreeing_is_refused(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    tensors["fc1.quantized.meta"][1] = 64
    save_file(tensors, f)

    def rehash(m):
        from mmkernels.compress.checkpoint._io import tensor_sha256

        m["tensors"]["fc1.quantized.meta"]["sha256"] = tensor_sha256(tensors["fc1.quantized.meta"])

    _edit_meta(saved, rehash)
    with pytest.raises(ValueError, match=r"quantized.meta holds \[4, 64, 128, 64, 0, 0\]"):
        mmkernels.load_quantized(saved)


def test_model_mismatch_is_refused(saved):
    with pytest.raises(
        ValueError,
        match=r"layer 'fc1' is 64 -> 128 in the checkpoint but "
        r"48 -> 128 in the model",
    ):
        mmkernels.load_quantized(saved, Small(k=48))

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.proj = nn.Linear(64, 128), nn.LayerNorm(128), nn.Linear(128, 32)

    with pytest.raises(ValueError, match="quantizes layer 'fc2', which the model does not have"):
        mmkernels.load_quantized(saved, Renamed())

    class Extra(Small):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 2)

    with pytest.raises(ValueError, match=r"missing from the file \['head.weight', 'head.bias'\]"):
        mmkernels.load_quantized(saved, Extra())


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        mmkernels.load_quantized(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        mmkernels.load_quantized(tmp_path / "nope")


def test_gptq_corruptions_are_refused(tmp_path):
    model = make_model(bits=4, group_size=32)
    mmkernels.save_quantized(model, tmp_path, format="gptq")
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    save_file(dict(tensors, **{"fc1.qzeros": tensors["fc1.qzeros"] + 1}), f)
    with pytest.raises(ValueError, match=r"layer 'fc1'\): sym=true but qzeros decode"):
        mmkernels.load_quantized(tmp_path)
    save_file(dict(tensors, **{"fc1.scales": tensors["fc1.scales"][:1]}), f)
    with pytest.raises(
        ValueError,
        match=r"'fc1.scales' is float16\[1, 128\], expected "
        r"float16/bfloat16/float32\[2, 128\]",
    ):
        mmkernels.load_quantized(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "fc2.qzeros"}, f)
    with pytest.raises(ValueError, match="'fc2.qzeros' is missing"):
        mmkernels.load_quantized(tmp_path)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        mmkernels.load_quantized(tmp_path)


def test_compressed_tensors_corruptions_are_refused(tmp_path):
    model = make_model(bits=4, group_size=32, symmetric=False)
    mmkernels.save_quantized(model, tmp_path, format="compressed-tensors")
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "tensor",
        "dynamic": False,
    }
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only dynamic per-token symmetric 8-bit activations"):
        mmkernels.load_quantized(tmp_path)
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    cfg["quantization_config"]["ignore"] = ["fc1"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'fc1' holds quantized tensors but is listed in"):
        mmkernels.load_quantized(tmp_path)
    cfg["quantization_config"]["ignore"] = []
    cfg_path.write_text(json.dumps(cfg))
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if k != "fc1.weight_zero_point"}, f)
    with pytest.raises(ValueError, match="'fc1.weight_zero_point' is missing"):
        mmkernels.load_quantized(tmp_path)


def test_safetensors_files_are_plain(tmp_path):
    """Every file written is safetensors or JSON (nothing to unpickle)."""
    model = make_model(bits=8, act_bits=8)
    for fmt in ("mmkernels", "compressed-tensors"):
        mmkernels.save_quantized(model, tmp_path / fmt, format=fmt)
        for name in os.listdir(tmp_path / fmt):
            file = tmp_path / fmt / name
            if name.endswith(".json"):
                json.loads(file.read_text())
            else:
                assert name.endswith(".safetensors")
                with safe_open(file, "pt") as f:
                    assert len(list(f.keys())) > 0
