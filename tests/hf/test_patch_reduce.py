"""mmkernels.patch(model, reduce=...) on tiny random-config vision encoders (no downloads).

For each family (ViT, DINOv2, CLIP and SigLIP with their text towers) and method (ToMe, EViT,
VisionZip, PruMerge): the output length is what ``output_tokens`` states, identity settings
(r=0, keep=1.0, all tokens dominant) equal the unpatched model within the 2x-error rule (and the
attention-only patch bit for bit), unpatch restores outputs bit for bit, the scores came from our
attention (every call served, no fallback), the adapters equal the HF layers bit for bit, the
reduced tokens equal a direct run of the method through the adapters, bad specs fail clearly, and
ToMe & co. give the same tokens on HF DINOv2 and on our VisionTransformer with the same weights.
"""

import copy
import inspect
import warnings

import pytest
import torch

import transformers as tf

import mmkernels
from mmkernels.hf import hf_attention
from mmkernels.hf.adapters import SideChannelError, adapter_for
from mmkernels.hf.reduction import find_vision_encoders, output_tokens
from mmkernels.reduce.methods import (
    block_with_scores,
    evit_block_step,
    iqr_keep_counts,
    prumerge,
    tome_block_step,
    tome_schedule,
    visionzip,
)

import tiny_models

IMAGE, PATCH, DEPTH = 64, 8, 3  # 64 patches (+ CLS): room for every method
FLOOR = 2e-5
VISION = dict(
    hidden_size=32,
    num_hidden_layers=DEPTH,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=IMAGE,
    patch_size=PATCH,
)
TEXT = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=32,
)


def _vit():
    return tf.ViTModel(tf.ViTConfig(**VISION))


def _dinov2():
    cfg = {k: v for k, v in VISION.items() if k != "intermediate_size"}
    return tf.Dinov2Model(tf.Dinov2Config(**cfg, mlp_ratio=2, layerscale_value=0.5))


def _clip():
    return tf.CLIPModel(tf.CLIPConfig(text_config=dict(TEXT, eos_token_id=2), vision_config=VISION, projection_dim=16))


def _siglip():
    return tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=VISION))


def _text(batch):
    ids = torch.randint(3, 97, (batch, 7))
    ids[:, -1] = 2
    return {"input_ids": ids}


# family -> (builder, has a text tower, prefix tokens)
FAMILIES = {
    "vit": (_vit, False, 1),
    "dinov2": (_dinov2, False, 1),
    "clip": (_clip, True, 1),
    "siglip": (_siglip, True, 0),
}
N_PATCHES = (IMAGE // PATCH) ** 2

METHODS = {
    "tome": dict(method="tome", r=[8, 4, 6]),
    "evit": dict(method="evit", keep=0.5, layers=[0, -1]),
    "visionzip": dict(method="visionzip", dominant=20, contextual=6),
    "prumerge": dict(method="prumerge", layer=1),
}


def _identity(family):
    return {
        "tome": dict(method="tome", r=0),
        "evit": dict(method="evit", keep=1.0, layers=[0, 1]),
        "visionzip": dict(method="visionzip", dominant=N_PATCHES, contextual=0, layer=1),
    }


def _inputs(family, batch=2, seed=1):
    torch.manual_seed(seed)
    inputs = {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE)}
    if FAMILIES[family][1]:
        inputs.update(_text(batch))
    return inputs


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    if hasattr(out, "vision_model_output"):
        return {
            "vision": out.vision_model_output.last_hidden_state,
            "image_embeds": out.image_embeds,
            "text_embeds": out.text_embeds,
        }
    return {"vision": out.last_hidden_state, "pooled": out.pooler_output}


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


def _build(family):
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


def _served_all(report):
    runtime = report.runtime()
    return runtime and all(served >= 1 and not fell for served, fell in runtime.values())


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tome", "evit", "visionzip"])
def test_output_length_is_output_tokens_and_scores_come_from_our_attention(family, method):
    model = _build(family)
    spec = METHODS[method]
    inputs = _inputs(family)
    prefix = FAMILIES[family][2]
    report = mmkernels.patch(model, reduce=spec)
    try:
        out = _run(model, inputs)
        runtime = report.runtime()
    finally:
        mmkernels.unpatch(model)
    expected = output_tokens(spec, prefix + N_PATCHES, DEPTH, prefix_tokens=prefix)
    assert out["vision"].shape[:2] == (2, expected)
    assert expected < prefix + N_PATCHES
    rows = [r for r in report.rows if r.kind == "reduce"]
    assert len(rows) == 1 and rows[0].action == "mmkernels", str(report)
    assert f"{prefix + N_PATCHES} -> {expected} tokens" in rows[0].detail
    assert all(served >= 1 and not fell for served, fell in runtime.values()), runtime
    assert all(torch.isfinite(v).all() for v in out.values())


def test_prumerge_length_and_served(family):
    model = _build(family)
    spec = METHODS["prumerge"]
    prefix = FAMILIES[family][2]
    inputs = _inputs(family, batch=1)
    report = mmkernels.patch(model, reduce=spec)
    try:
        out = _run(model, inputs)
        assert _served_all(report), report.runtime()
    finally:
        mmkernels.unpatch(model)
    with pytest.raises(ValueError, match="data-dependent"):
        output_tokens(spec, prefix + N_PATCHES, DEPTH, prefix)
    assert prefix + 1 <= out["vision"].shape[1] < prefix + N_PATCHES


@pytest.mark.parametrize("method", ["tome", "evit", "visionzip"])
def test_identity_settings_match_unpatched_within_2x(family, method):
    model = _build(family)
    spec = _identity(family)[method]
    inputs = _inputs(family)
    prefix = FAMILIES[family][2]
    assert output_tokens(spec, prefix + N_PATCHES, DEPTH, prefix) == prefix + N_PATCHES
    exact = _run(
        copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    )
    plain = _run(model, inputs)
    # One attention backend for both patched runs: auto-selection may give plain attention to SDPA
    # (the `torch` backend, on AMX CPUs) and the scores calls to our kernel.
    with mmkernels.patched(model, backend="cpu"):
        attention_only = _run(model, inputs)
    with mmkernels.patched(model, reduce=spec, backend="cpu") as report:
        ours = _run(model, inputs)
        assert _served_all(report), report.runtime()
    for name in exact:
        e_ref, e_ours = _err(plain[name], exact[name]), _err(ours[name], exact[name])
        assert e_ours <= 2 * e_ref + FLOOR, (name, e_ours, e_ref)
        assert torch.equal(ours[name], attention_only[name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unpatch_restores_bit_identical(family, method):
    model = _build(family)
    inputs = _inputs(family, batch=1 if method == "prumerge" else 2)
    before = _run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mmkernels.patch(model, reduce=METHODS[method])
    reduced = _run(model, inputs)
    assert reduced["vision"].shape[1] < before["vision"].shape[1]
    mmkernels.unpatch(model)
    after = _run(model, inputs)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m in hf_attention.STATES for m in model.modules())


def _run_layer(layer, x):
    """``layer(x)`` without a mask (CLIP's layers take ``attention_mask`` positionally; DINOv2's
    take none up to transformers 5.17)."""
    if "attention_mask" in inspect.signature(type(layer).forward).parameters:
        return layer(x, None)
    return layer(x)


def test_adapters_equal_the_hf_layers_bit_for_bit(family):
    model = _build(family)
    encoders = find_vision_encoders(model)
    assert len(encoders) == 1 and encoders[0].family == family
    assert encoders[0].prefix_tokens == FAMILIES[family][2]
    torch.manual_seed(5)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        for layer, adapter in zip(encoders[0].layers, encoders[0].adapters):
            assert torch.equal(adapter(x), _run_layer(layer, x))  # unpatched: HF's attention
        # backend="cpu": the layer's plain attention and the adapter's scores call run one kernel
        # (auto-selection gives plain attention to SDPA on AMX CPUs).
        with mmkernels.patched(model, backend="cpu"):
            for layer, adapter in zip(encoders[0].layers, encoders[0].adapters):
                assert torch.equal(adapter(x), _run_layer(layer, x))
                y, scores, keys = adapter.attention_step(x, scores="mean", return_keys=True)
                assert torch.equal(adapter.mlp_step(y), _run_layer(layer, x))
                assert scores.shape == (2, 9) and keys.shape == (2, 2, 9, 16)
                assert torch.allclose(scores.sum(-1), torch.ones(2), atol=1e-5)
                state = hf_attention.STATES[adapter.attention]
                assert (
                    state.scores_mode is None
                    and state.last_keys is None
                    and state.key_bias is None
                    and not state.keys_wanted
                )
            # key_bias log(2) on a key == that key duplicated
            bias = torch.zeros(2, 9)
            bias[:, 3] = torch.log(torch.tensor(2.0))
            adapter = encoders[0].adapters[0]
            dup = torch.cat([x, x[:, 3:4]], dim=1)
            with_bias = adapter.attention_step(x, key_bias=bias)
            duplicated = adapter.attention_step(dup)[:, :9]
            assert torch.allclose(with_bias, duplicated, atol=1e-5)


def test_text_towers_are_not_vision_encoders():
    model = _build("clip")
    encoders = find_vision_encoders(model)
    assert [e.path for e in encoders] == ["vision_model.encoder.layers"]
    assert adapter_for(model.text_model.encoder.layers[0]) is None


def test_adapter_needs_our_attention_for_scores():
    model = _build("vit")
    adapter = find_vision_encoders(model)[0].adapters[0]
    x = torch.randn(1, 5, 32)
    with pytest.raises(SideChannelError, match="not patched by mmkernels.patch"):
        adapter.attention_step(x, scores="cls")
    with mmkernels.patched(model):
        model.train()  # attention dropout in training goes to SDPA
        model.config.attention_probs_dropout_prob = 0.1
        adapter.attention.attention_dropout = 0.1
        with pytest.raises(SideChannelError, match="served by SDPA.*dropout"):
            adapter.attention_step(x, scores="cls")


def _method_through_adapters(adapters, x, spec, prefix, rank):
    """The method applied by hand with the public step functions (no patch machinery)."""
    method = spec["method"]
    if method == "tome":
        size, schedule = None, tome_schedule(spec["r"], len(adapters), x.shape[1], 1)
        for adapter, r in zip(adapters, schedule):
            x, size = tome_block_step(adapter, x, size, r, 1)
        return x
    for i, adapter in enumerate(adapters):
        if method == "evit" and i in (0, len(adapters) - 1):
            x = evit_block_step(adapter, x, spec["keep"], 1, scores=rank)
        elif method in ("visionzip", "prumerge") and i == spec.get("layer", len(adapters) - 2):
            x, s, keys = block_with_scores(adapter, x, rank)
            if method == "visionzip":
                x = visionzip(x, keys, s, spec["dominant"], spec["contextual"], prefix)
            else:
                packed, cu = prumerge(x, keys, s, 32, prefix)
                assert int(cu[-1]) == prefix + int(iqr_keep_counts(s, prefix)[0])
                x = packed[None]
        else:
            x = adapter(x)
    return x


@pytest.mark.parametrize("method", sorted(METHODS))
def test_reduced_tokens_equal_the_method_run_by_hand(family, method):
    model = _build(family)
    spec = METHODS[method]
    inputs = _inputs(family, batch=1 if method == "prumerge" else 2)
    encoder = find_vision_encoders(model)[0]
    with mmkernels.patched(model):
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True)
        hidden = getattr(hidden, "vision_model_output", hidden).hidden_states
        with torch.no_grad():
            expected = _method_through_adapters(
                encoder.adapters, hidden[0], spec, encoder.prefix_tokens, encoder.adapters[0].rank_scores
            )
    with mmkernels.patched(model, reduce=spec):
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    out = getattr(out, "vision_model_output", out)
    assert len(out.hidden_states) == DEPTH + 1
    assert torch.equal(out.hidden_states[0], hidden[0])
    assert torch.equal(out.hidden_states[-1], expected)


def test_output_attentions_runs_unreduced_and_warns():
    model = _build("dinov2")
    inputs = _inputs("dinov2")
    with mmkernels.patched(model, reduce=METHODS["tome"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                out = model(**inputs, output_attentions=True)
    assert out.last_hidden_state.shape[1] == 1 + N_PATCHES
    assert any("output_attentions" in str(w.message) for w in caught)


def test_a_token_mask_is_refused():
    model = _build("vit")
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    mask = torch.ones(1, 1 + N_PATCHES, dtype=torch.long)
    mask[:, -3:] = 0
    with mmkernels.patched(model, reduce=METHODS["tome"]), torch.no_grad():
        with pytest.raises(ValueError, match="attention mask"):
            model(pixel_values=pixels, attention_mask=mask)


def test_prumerge_batch_with_different_counts_is_refused():
    model = _build("vit")
    torch.manual_seed(7)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    pixels[1] = 0  # a flat image: another number of outliers
    with mmkernels.patched(model, reduce=METHODS["prumerge"]), torch.no_grad():
        counts = [model(pixel_values=pixels[i : i + 1]).last_hidden_state.shape[1] for i in range(2)]
        assert counts[0] != counts[1], counts
        with pytest.raises(ValueError, match="one at a time"):
            model(pixel_values=pixels)
        assert model(pixel_values=pixels[:1].expand(2, -1, -1, -1)).last_hidden_state.shape[1] == counts[0]


# ----------------------------------------------------------------------------------------------
# Specs and errors


def test_output_tokens():
    assert output_tokens({"method": "tome", "r": 8}, 197, 12) == 197 - sum(tome_schedule(8, 12, 197, 1))
    assert output_tokens({"method": "tome", "r": 8}, 197, 12) == 101
    assert output_tokens({"method": "tome", "r": 100}, 17, 2) == 17 - 8 - 4
    assert output_tokens({"method": "evit", "keep": 0.7}, 197, 12) == 72
    assert output_tokens({"method": "evit", "keep": 1.0}, 197, 12) == 197
    assert output_tokens({"method": "visionzip", "dominant": 54, "contextual": 10}, 577, 24) == 65
    assert output_tokens({"method": "visionzip", "dominant": 54, "contextual": 10}, 576, 24, prefix_tokens=0) == 64
    with pytest.raises(ValueError, match="cannot give"):
        output_tokens({"method": "visionzip", "dominant": 10, "contextual": 10}, 17, 2)
    with pytest.raises(ValueError, match="fastv"):
        output_tokens({"method": "fastv"}, 197, 12)
    with pytest.raises(ValueError, match="entries"):
        output_tokens({"method": "tome", "r": [1, 2]}, 197, 12)


@pytest.mark.parametrize(
    "spec, error",
    [
        ({"method": "tome", "r": 8, "ratio": 2}, "unknown key"),
        ({"method": "tome"}, "needs 'r'"),
        ({"method": "tome", "r": -1}, "int >= 0"),
        ({"method": "tome", "r": [1, 2]}, "3 layers"),
        ({"method": "evit", "keep": 1.5}, r"keep rate in \(0, 1\]"),
        ({"method": "evit", "keep": 0.5}, r"\[-3, 3\)"),  # default layers (3, 6, 9)
        ({"method": "visionzip", "dominant": 60, "contextual": 10}, "cannot give"),
        ({"method": "prumerge", "plus": True}, "not implemented yet"),
        ({"method": "fastv"}, "language model"),
        ({"method": "nope"}, "must be one of"),
    ],
)
def test_bad_specs_fail_clearly_and_leave_the_model_unpatched(spec, error):
    model = _build("vit")
    with pytest.raises(ValueError, match=error):
        mmkernels.patch(model, reduce=spec)
    assert not mmkernels.hf.is_patched(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation != "mmkernels"


@pytest.mark.parametrize(
    "name, error", [("bert", "no supported vision encoder"), ("qwen2_vl_vision", "no supported vision encoder")]
)
def test_models_without_a_supported_vision_encoder(name, error):
    torch.manual_seed(0)
    model = getattr(tiny_models, name)().build().eval()
    with pytest.raises(ValueError, match=error):
        mmkernels.patch(model, reduce={"method": "tome", "r": 2})
    assert not mmkernels.hf.is_patched(model)


def test_backbones_are_refused():
    cfg = tf.Dinov2Config(**{k: v for k, v in VISION.items() if k != "intermediate_size"}, out_features=["stage2"])
    model = tf.Dinov2Backbone(cfg).eval()
    with pytest.raises(ValueError, match="feature maps on the patch grid"):
        mmkernels.patch(model, reduce={"method": "tome", "r": 2})
    assert not mmkernels.hf.is_patched(model)


def test_reduce_needs_attention():
    with pytest.raises(ValueError, match="attention=True"):
        mmkernels.patch(_build("vit"), attention=False, reduce={"method": "tome", "r": 2})


# ----------------------------------------------------------------------------------------------
# One implementation: HF DINOv2 through the adapters == our VisionTransformer


@pytest.mark.parametrize("method", ["tome", "evit", "visionzip", "prumerge"])
def test_hf_dinov2_and_our_vit_give_the_same_tokens(method):
    models = pytest.importorskip("mmkernels.models", reason="mmkernels.models not installed")
    from mmkernels.reduce.methods import EViT, PruMerge, ToMe, VisionZip

    hf = _build("dinov2")
    ours = models.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=DEPTH, num_heads=2, mlp_ratio=2.0, layer_scale=True
    ).eval()
    ours.load_state_dict(models.hf_dinov2_to_vit(hf.state_dict()), strict=True)
    torch.manual_seed(3)
    pixels = torch.randn(1 if method == "prumerge" else 2, 3, IMAGE, IMAGE)
    last = DEPTH - 1  # our VisionZip / PruMerge stop at their layer
    spec = {
        "tome": dict(method="tome", r=[8, 4, 6]),
        "evit": dict(method="evit", keep=0.5, layers=[0, 2]),
        "visionzip": dict(method="visionzip", dominant=20, contextual=6, layer=last),
        "prumerge": dict(method="prumerge", layer=last),
    }[method]
    with torch.no_grad():
        plain_hf = hf(pixel_values=pixels).last_hidden_state
        assert torch.allclose(ours.forward_features(pixels), plain_hf, atol=1e-5)
        wrapped = {
            "tome": lambda: ToMe(ours, [8, 4, 6]).forward(pixels)[0],
            "evit": lambda: EViT(ours, 0.5, prune_at=(0, 2)).forward(pixels),
            "visionzip": lambda: VisionZip(ours, 20, 6, layer=last).forward(pixels),
            "prumerge": lambda: PruMerge(ours, layer=last).forward(pixels)[0][None],
        }
        expected = wrapped[method]()
        with mmkernels.patched(hf, reduce=spec):
            out = hf(pixel_values=pixels, output_hidden_states=True)
    got = out.last_hidden_state if method in ("tome", "evit") else out.hidden_states[-1]
    assert got.shape == expected.shape
    assert _err(got, expected) <= 1e-5
