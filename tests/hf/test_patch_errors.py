"""mmkernels.patch refuses bad settings and models it cannot help, with clear errors, and leaves
the model untouched when it refuses."""

import pytest
import torch
from torch import nn

import mmkernels
import tiny_models


@pytest.fixture
def bert():
    torch.manual_seed(0)
    return tiny_models.bert().build().eval()


@pytest.mark.parametrize(
    "reduce, message",
    [
        ({"method": "magic"}, "reduce['method'] must be one of"),
        ({"method": "tome"}, "needs 'r'"),
        ({"method": "tome", "r": 8, "ratio": 0.5}, "unknown key(s) ['ratio']"),
        ("tome", "reduce must be a dict"),
    ],
)
def test_bad_reduce_spec(bert, reduce, message):
    with pytest.raises((ValueError, TypeError), match=None) as info:
        mmkernels.patch(bert, reduce=reduce)
    assert message in str(info.value)
    assert not mmkernels.hf.is_patched(bert)


@pytest.mark.parametrize(
    "quantize, message",
    [
        ({"bits": 8, "groupsize": 128}, "unknown key(s) ['groupsize']"),
        ([8], "quantize must be a dict"),
    ],
)
def test_bad_quantize_spec(bert, quantize, message):
    with pytest.raises((ValueError, TypeError)) as info:
        mmkernels.patch(bert, quantize=quantize)
    assert message in str(info.value)


def test_bad_backend_and_flags(bert):
    with pytest.raises(ValueError, match="backend must be one of"):
        mmkernels.patch(bert, backend="flash")
    with pytest.raises(TypeError, match="attention must be a bool"):
        mmkernels.patch(bert, attention="yes")
    with pytest.raises(ValueError, match="reduce needs attention=True"):
        mmkernels.patch(bert, attention=False, reduce={"method": "tome", "r": 2})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mmkernels.patch("bert")


def test_nothing_to_patch_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="found nothing to patch"):
        mmkernels.patch(model)
    assert not mmkernels.hf.is_patched(model)


def test_fastv_without_image_tokens_is_an_error(bert):
    with pytest.raises(ValueError, match="fastv"):
        mmkernels.patch(bert, reduce={"method": "fastv", "layer": 1, "keep": 0.5})
    assert not mmkernels.hf.is_patched(bert)
    assert bert.config._attn_implementation != "mmkernels"


def test_patching_twice_with_other_settings_is_an_error(bert):
    report = mmkernels.patch(bert)
    try:
        assert mmkernels.patch(bert) is report
        with pytest.raises(ValueError, match="already patched"):
            mmkernels.patch(bert, backend="reference")
    finally:
        mmkernels.unpatch(bert)
    with pytest.raises(ValueError, match="not patched"):
        mmkernels.unpatch(bert)


def test_report_lists_modules_left_alone():
    torch.manual_seed(0)
    model = tiny_models.siglip().build().eval()
    with mmkernels.patched(model) as report:
        left = {r.path: r.detail for r in report.left("attention")}
        assert "vision_model.head.attention" in left, str(report)
        assert "attention interface" in left["vision_model.head.attention"]
        assert "vision_model.head.attention" in str(report)


def test_fallbacks_are_counted_and_reported():
    torch.manual_seed(0)
    model = tiny_models.bert().build().eval()
    inputs = tiny_models.bert().make_inputs()
    with mmkernels.patched(model) as report:
        with torch.no_grad():
            model(**inputs, output_attentions=True)
        runtime = report.runtime()
        text = str(report)
    reasons = {r for _, fell in runtime.values() for r in fell}
    assert any("output_attentions" in r for r in reasons), runtime
    assert "served by SDPA instead" in text
