"""Token reduction in a LLaVA model's vision tower through mmkernels.patch: the prompt's
image-token count follows the reduction, so forward() and generate() work (batch > 1)."""

import pytest
import torch

import mmkernels
import tiny_models

VISIONZIP = {"method": "visionzip", "dominant": 6, "contextual": 2, "layer": 0}
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.fixture
def llava():
    torch.manual_seed(0)
    case = tiny_models.llava()
    model = case.build().eval()
    torch.manual_seed(1)
    return model, case.make_inputs()


@torch.no_grad()
def test_identity_reduction_generates_the_same_tokens(llava):
    model, inputs = llava
    expected = model.generate(**inputs, **GEN)
    with mmkernels.patched(model, reduce={"method": "tome", "r": 0}):
        assert torch.equal(model.generate(**inputs, **GEN), expected)


@torch.no_grad()
def test_visionzip_compacts_the_prompt_and_generates(llava):
    model, inputs = llava
    expected = model.generate(**inputs, **GEN)
    report = mmkernels.patch(model, reduce=VISIONZIP)
    try:
        row = [r for r in report.rows if r.kind == "prompt"][0]
        assert "16 -> 8" in row.detail, str(report)  # "default" drops CLS: 1+6+2-1 = 8
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape), with_kwargs=True
        )
        got = model.generate(**inputs, **GEN)
        hook.remove()
        prompt = inputs["input_ids"].shape[1]
        assert seen[0][1] == max(int(m.sum()) for m in inputs["attention_mask"]) - (16 - 8)
        assert got.shape == (2, prompt + 5)
        assert torch.equal(got[:, :prompt], inputs["input_ids"])  # the caller's prompt back
        for i in range(2):  # a row alone == in the batch
            alone = model.generate(**tiny_models.llava_row_alone(inputs, i), **GEN)
            assert torch.equal(alone[0, -5:], got[i, -5:])
        logits = model(**inputs).logits
        assert logits.shape[1] == seen[0][1]
        runtime = report.runtime()
        assert all(s >= 1 and not f for s, f in runtime.values()), runtime
    finally:
        mmkernels.unpatch(model)
    assert torch.equal(model.generate(**inputs, **GEN), expected)
    assert "generate" not in model.__dict__ and "forward" not in model.model.__dict__


@torch.no_grad()
def test_compacted_prompt_passes_as_is(llava):
    model, inputs = llava
    with mmkernels.patched(model, reduce=VISIONZIP):
        full = model(**inputs).logits
        compactor_input = dict(inputs)
        ids = inputs["input_ids"]
        keep = [
            torch.cat([torch.nonzero(r != 96).squeeze(1), torch.nonzero(r == 96).squeeze(1)[:8]]).sort().values
            for r in ids
        ]
        width = max(len(k) for k in keep)
        compact = torch.zeros(2, width, dtype=ids.dtype)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, k in enumerate(keep):
            compact[i, width - len(k) :] = ids[i, k]
            mask[i, width - len(k) :] = inputs["attention_mask"][i, k]
        compactor_input.update(input_ids=compact, attention_mask=mask)
        again = model(**compactor_input).logits
    assert again.shape == full.shape
    assert torch.allclose(again, full, atol=1e-5)


def test_data_dependent_counts_are_refused(llava):
    model, _ = llava
    with pytest.raises(ValueError, match="data-dependent"):
        mmkernels.patch(model, reduce={"method": "prumerge", "layer": 0})
    assert not mmkernels.hf.is_patched(model)
    assert "generate" not in model.__dict__
