"""FastV inside a LLaVA model's language model through ``mmkernels.patch(reduce={"method":
"fastv", ...})``: against a by-hand oracle (eager last-query probabilities, HF's own layers on the
kept tokens), in ``generate()`` with batch > 1 and left padding, and its errors."""

import inspect
import math

import pytest
import torch
import transformers

import mmkernels
from mmkernels.hf import is_patched
import tiny_models

# The cache argument's name: ``cache`` from transformers 5.18 (``past_key_values`` before).
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(transformers.LlavaForConditionalGeneration.forward).parameters
    else "past_key_values"
)
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
IMAGE_TOKEN = 96
N_IMAGE = 16


def _build(text_layers):
    torch.manual_seed(0)
    case = tiny_models.llava(text_layers=text_layers)
    model = case.build().eval()
    torch.manual_seed(1)
    return model, case


@pytest.fixture
def llava3():
    return _build(3)


def _embeds(model, inputs):
    """The language model's ``inputs_embeds`` (image features merged), from the unpatched model."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    return captured["embeds"]


def _last_query_probs(layer, x, cos, sin):
    """Head-averaged causal attention probabilities of the last query of ``layer`` (eager, by
    hand), ``(B, L)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    b, n, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    logits = (q[:, :, -1:] @ k.transpose(-1, -2)) * attn.scaling  # last query sees all keys
    return logits.softmax(-1)[:, :, 0].mean(1)


def _causal(n):
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def fastv_oracle(model, embeds, image_mask, prompt_len, cut, keep_ratio):
    """Last-position logits of FastV on one unpadded row: layers ``< cut`` on every token, layer
    ``cut - 1``'s last **prompt** query ranks the image tokens, layers ``>= cut`` on the non-image
    tokens, the best image tokens and every token after the prompt (decoded ones)."""
    lm = model.model.language_model
    h = embeds
    n = h.shape[1]
    cos, sin = lm.rotary_emb(h, torch.arange(n)[None])
    for i in range(cut):
        layer = lm.layers[i]
        if i == cut - 1:
            x = layer.input_layernorm(h[:, :prompt_len])
            scores = _last_query_probs(layer, x, cos[:, :prompt_len], sin[:, :prompt_len])
        h = layer(h, attention_mask=_causal(n), position_embeddings=(cos, sin))
    image = torch.nonzero(image_mask[0]).squeeze(1)
    k = math.ceil(keep_ratio * len(image))
    best = image[scores[0, image].topk(k).indices]
    others = torch.tensor([p for p in range(n) if p >= prompt_len or not image_mask[0, p]])
    keep = torch.cat([others, best]).sort().values
    h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
    for layer in lm.layers[cut:]:
        h = layer(h, attention_mask=_causal(len(keep)), position_embeddings=(cos, sin))
    return model.lm_head(lm.norm(h[:, -1]))


@pytest.mark.parametrize("cut, keep_ratio", [(1, 0.25), (2, 0.4)])
@torch.no_grad()
def test_prefill_and_one_decode_step_match_the_oracle(llava3, cut, keep_ratio):
    model, case = llava3
    inputs = tiny_models.llava_row_alone(case.make_inputs(batch=1, lengths=(5,)), 0)
    image_mask = inputs["input_ids"] == IMAGE_TOKEN
    prompt_len = inputs["input_ids"].shape[1]
    embeds = _embeds(model, inputs)
    want = fastv_oracle(model, embeds, image_mask, prompt_len, cut, keep_ratio)
    kept = prompt_len - N_IMAGE + math.ceil(keep_ratio * N_IMAGE)
    with mmkernels.patched(model, reduce={"method": "fastv", "layer": cut, "keep": keep_ratio}) as report:
        out = model(**inputs, use_cache=True)
        assert out.logits.shape[1] == kept
        cache = out.past_key_values
        assert cache.layers[cut - 1].keys.shape[2] == prompt_len  # full before the cut
        assert cache.layers[cut].keys.shape[2] == kept  # pruned after it
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(
            input_ids=nxt,
            attention_mask=torch.ones(1, prompt_len + 1, dtype=torch.long),
            use_cache=True,
            **{CACHE_KWARG: cache},
        )
        assert cache.layers[cut].keys.shape[2] == kept + 1
        assert report.fastv_runtime() == (1, {})
        runtime = report.runtime()
        assert all(served >= 1 and not fell for served, fell in runtime.values()), runtime
    torch.testing.assert_close(out.logits[:, -1], want, atol=2e-5, rtol=1e-4)
    embeds2 = torch.cat([embeds, model.get_input_embeddings()(nxt)], dim=1)
    want2 = fastv_oracle(
        model, embeds2, torch.cat([image_mask, torch.zeros_like(nxt, dtype=torch.bool)], 1), prompt_len, cut, keep_ratio
    )
    torch.testing.assert_close(step.logits[:, -1], want2, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_keep_all_generates_the_same_tokens(llava3):
    model, case = llava3
    inputs = case.make_inputs()
    expected = model.generate(**inputs, **GEN)
    with mmkernels.patched(model, reduce={"method": "fastv", "layer": 1, "keep": 1.0}):
        assert torch.equal(model.generate(**inputs, **GEN), expected)


@torch.no_grad()
def test_generate_batch_with_padding_equals_rows_alone(llava3):
    model, case = llava3
    inputs = case.make_inputs(batch=2, lengths=(5, 2))
    prompt = inputs["input_ids"].shape[1]
    with mmkernels.patched(model, reduce={"method": "fastv", "layer": 2, "keep": 0.25}) as report:
        got = model.generate(**inputs, **GEN)
        assert got.shape == (2, prompt + 5)
        assert torch.equal(got[:, :prompt], inputs["input_ids"])
        for i in range(2):
            alone = model.generate(**tiny_models.llava_row_alone(inputs, i), **GEN)
            assert torch.equal(alone[0, -5:], got[i, -5:])
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, pad_token_id=0)
        assert sampled.shape == (2, prompt + 3)
        assert report.fastv_runtime()[0] == 4 and not report.fastv_runtime()[1]
        row = [r for r in report.rows if r.kind == "reduce"][0]
        assert "fastv" in row.detail and "layers 2..2 of 3" in row.detail, str(report)


@torch.no_grad()
def test_language_model_called_directly_with_an_image_mask(llava3):
    model, case = llava3
    inputs = tiny_models.llava_row_alone(case.make_inputs(batch=1, lengths=(4,)), 0)
    embeds = _embeds(model, inputs)
    image_mask = inputs["input_ids"] == IMAGE_TOKEN
    with mmkernels.patched(model, reduce={"method": "fastv", "layer": 1, "keep": 0.5}):
        lm = model.model.language_model
        via_model = model.model(**inputs).last_hidden_state
        direct = lm(inputs_embeds=embeds, image_token_mask=image_mask).last_hidden_state
        torch.testing.assert_close(direct, via_model)
        assert direct.shape[1] == embeds.shape[1] - N_IMAGE // 2
        assert lm(inputs_embeds=embeds).last_hidden_state.shape[1] == embeds.shape[1]  # no mark


@torch.no_grad()
def test_unpatch_restores_bit_identical_outputs(llava3):
    model, case = llava3
    inputs = case.make_inputs()
    before = model(**inputs).logits
    mmkernels.patch(model, reduce={"method": "fastv", "layer": 1, "keep": 0.25})
    mmkernels.unpatch(model)
    assert torch.equal(model(**inputs).logits, before)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    "spec, error",
    [
        ({"method": "fastv", "layer": 0, "keep": 0.5}, r"in \[1, 3\)"),
        ({"method": "fastv", "layer": 3, "keep": 0.5}, r"in \[1, 3\)"),
        ({"method": "fastv", "layer": 1, "keep": 0.0}, r"in \(0, 1\]"),
        ({"method": "fastv", "layer": 1, "keep": 0.5, "ratio": 2}, "unknown key"),
    ],
)
def test_bad_spec(llava3, spec, error):
    model, _ = llava3
    with pytest.raises(ValueError, match=error):
        mmkernels.patch(model, reduce=spec)
    assert not is_patched(model)


@torch.no_grad()
def test_labels_and_unequal_image_counts_are_refused(llava3):
    model, case = llava3
    inputs = case.make_inputs()
    with mmkernels.patched(model, reduce={"method": "fastv", "layer": 1, "keep": 0.5}):
        with pytest.raises(ValueError, match="labels"):
            model(**inputs, labels=inputs["input_ids"])
        lm = model.model.language_model
        embeds = torch.randn(2, 20, 64)
        mask = torch.zeros(2, 20, dtype=torch.bool)
        mask[0, 2:10] = True
        mask[1, 2:6] = True
        with pytest.raises(ValueError, match="same number of image tokens"):
            lm(inputs_embeds=embeds, image_token_mask=mask)
        with pytest.raises(ValueError, match="image_token_mask"):
            lm(inputs_embeds=embeds, image_token_mask=mask[:, :5])


def test_fastv_needs_a_llava_language_model():
    model = tiny_models.llama().build().eval()
    with pytest.raises(ValueError, match="no image tokens"):
        mmkernels.patch(model, reduce={"method": "fastv", "layer": 1, "keep": 0.5})
