"""quantize_model on a small toy model: replacement, name patterns, vision towers, the report,
GPTQ / SmoothQuant / outlier split plumbing, padding masks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels.nn import OutlierSplitLinear, QuantLinear
from mmkernels.compress import quantize_model
from mmkernels.compress.calibration import collect

DIM = 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x, scale):
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) * scale, -1) @ self.v(h)
        x = x + att
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Toy(nn.Module):
    """Blocks in a ModuleList (block-by-block calibration), a head outside them, and a
    vision tower."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(DIM, 16)
        self.vision_model = nn.Sequential(nn.Linear(DIM, DIM))

    def forward(self, x, attention_mask=None):
        for b in self.blocks:
            x = b(x, DIM**-0.5)
        return self.head(x) + self.vision_model(x)[..., :16]


def make():
    torch.manual_seed(0)
    return Toy().eval()


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, DIM, generator=torch.Generator().manual_seed(9))
    x = torch.randn(n, 12, 8, generator=g) @ mix + 0.1 * torch.randn(n, 12, DIM, generator=g)
    x[..., 3] *= 20  # an outlier channel
    return x


def linears(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def test_rtn_replaces_every_linear_except_the_vision_tower():
    model = make()
    report = quantize_model(model, bits=8, progress=False)
    assert linears(model) == ["vision_model.0"]
    assert isinstance(model.head, QuantLinear) and isinstance(model.blocks[1].fc2, QuantLinear)
    text = str(report)
    assert "weight SQNR" in text and "blocks.0.q" in text
    assert "vision tower: 1 Linear layers left in float" in report.summary()
    assert len(report.quantized()) == 11 and report.layers[-1].vision


def test_vision_true_quantizes_it_and_reports_it_separately():
    model = make()
    report = quantize_model(model, bits=8, vision=True, progress=False)
    assert linears(model) == []
    assert "vision tower: 1 Linear layers" in report.summary()
    assert [r.name for r in report.quantized(vision=True)] == ["vision_model.0"]


def test_include_exclude_patterns():
    model = make()
    quantize_model(model, include="blocks.*", exclude=["*.fc2", "*.q"], progress=False)
    assert sorted(linears(model)) == [
        "blocks.0.fc2",
        "blocks.0.q",
        "blocks.1.fc2",
        "blocks.1.q",
        "head",
        "vision_model.0",
    ]


def test_argument_errors():
    with pytest.raises(ValueError, match="calib_data"):
        quantize_model(make(), method="gptq")
    with pytest.raises(ValueError, match="act_bits=8"):
        quantize_model(make(), bits=4, act_bits=8)
    with pytest.raises(ValueError, match="smooth_alpha"):
        quantize_model(make(), act_bits=8, smooth_alpha=0.5)
    with pytest.raises(ValueError, match="method"):
        quantize_model(make(), method="awq")
    lone = nn.Linear(DIM, DIM)  # cannot be replaced in place: refused, not left
    with pytest.raises(ValueError, match="single nn.Linear.*QuantLinear.from_linear"):
        quantize_model(lone)
    assert type(lone) is nn.Linear


def _err(model, ref_model, x):
    with torch.no_grad():
        return float(((model(x) - ref_model(x)) ** 2).mean())


def test_gptq_block_by_block_beats_rtn_on_held_out_data():
    ref = make()
    calib = [data(8, seed) for seed in range(4)]
    test = data(16, 99)
    rtn, gptq = copy.deepcopy(ref), copy.deepcopy(ref)
    quantize_model(rtn, bits=4, group_size=32, progress=False)
    report = quantize_model(gptq, bits=4, group_size=32, method="gptq", calib_data=calib, desc_act=True, progress=False)
    assert all(r.output_sqnr is not None for r in report.quantized())
    assert "output SQNR" in report.summary()
    assert _err(gptq, ref, test) < 0.7 * _err(rtn, ref, test)
    assert all(isinstance(m.input_perm, torch.Tensor) for m in gptq.modules() if isinstance(m, QuantLinear))


def test_w8a8_smoothquant_search_and_outlier_split():
    ref = make()
    calib = [data(8, seed) for seed in range(4)]
    test = data(16, 99)
    plain, smooth, split = copy.deepcopy(ref), copy.deepcopy(ref), copy.deepcopy(ref)
    quantize_model(plain, act_bits=8, progress=False)
    report = quantize_model(smooth, act_bits=8, smooth_alpha="search", calib_data=calib, method="gptq", progress=False)
    quantize_model(split, act_bits=8, smooth_alpha=0.5, outlier_channels=2, calib_data=calib, progress=False)
    layers = [m for m in smooth.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 11 and all(m.act_bits == 8 for m in layers)
    assert any(r.alpha is not None for r in report.quantized())
    assert _err(smooth, ref, test) < _err(plain, ref, test)
    fc1 = split.blocks[0].fc1
    assert isinstance(fc1, OutlierSplitLinear) and 3 in fc1.outlier_index.tolist()
    assert fc1.main.act_bits == 8 and fc1.outliers.act_bits == 8
    assert _err(split, ref, test) < _err(plain, ref, test)
    # dequantized_weight puts both parts back in place
    torch.testing.assert_close(fc1.dequantized_weight(), ref.blocks[0].fc1.weight, atol=2e-2, rtol=0)


def test_float_target_and_one_pass_modes_run():
    calib = [data(4, seed) for seed in range(2)]
    for kw in ({"float_target": True}, {"sequential": False, "clip_search": True}):
        model = make()
        report = quantize_model(model, bits=4, group_size=64, method="gptq", calib_data=calib, progress=False, **kw)
        assert len(report.quantized()) == 11, kw
        with torch.no_grad():
            assert torch.isfinite(model(data(2, 5))).all()


def test_layer_that_never_runs_falls_back_to_rtn():
    class WithUnused(Toy):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(DIM, DIM)

    model = WithUnused().eval()
    report = quantize_model(model, method="gptq", calib_data=[data(2, 0)], progress=False)
    row = next(r for r in report.layers if r.name == "unused")
    assert row.quantized and row.method.startswith("rtn") and row.output_sqnr is None


def test_attention_mask_drops_padding_rows_from_statistics():
    lin = nn.Linear(4, 4)
    x = torch.ones(2, 3, 4)
    x[1, 2] = 100.0  # a padding position with a huge value
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = collect(lambda item: lin(item), [x], {"lin": lin}, hessian=True, absmax=True, max_rows=100, masks=[mask])
    st = got.stats["lin"]
    assert st.n_rows == 5 and float(st.absmax.max()) == 1.0
    torch.testing.assert_close(st.hessian.H, torch.full((4, 4), 2.0, dtype=torch.float64))


def test_exported_flat():
    assert mmkernels.quantize_model is quantize_model
    assert mmkernels.compress.quantize_model is quantize_model


def test_fp8_rtn_and_report_table():
    model = make()
    report = quantize_model(model, fp8=True, act_bits=8, progress=False)
    assert model.head.quantized.fp8 and model.head.act_bits == 8
    lines = str(report).splitlines()
    assert lines[0].split()[:2] == ["layer", "shape"] and set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(report.layers) + 1
    assert "fp8 per-channel sym A8" in lines[2]
    with pytest.raises(ValueError, match="fp8"):
        quantize_model(make(), fp8=True, method="gptq", calib_data=[data(1, 0)])
