"""mmkernels.patch on tiny random-config models of every supported family (no downloads).

For each family: patched vs unpatched in float32 against the float64 unpatched model (the 2x-error
rule), padding honoured (a padded batch equals each row run alone), unpatch restores outputs and
state dict bit for bit, two instances side by side (one patched) both right, greedy generate()
tokens identical for the decoders, and every attention module served by our kernels.
"""

import copy

import pytest
import torch

import mmkernels
import tiny_models

CASES = {f.__name__: f for f in tiny_models.CASES}
FLOOR = 2e-5


def _run(model, inputs, case):
    with torch.no_grad():
        return case.outputs(model(**inputs))


def _valid(case, inputs, name, tensor):
    """Drop padded token positions of per-token outputs (their values are unspecified)."""
    mask = inputs.get("attention_mask")
    if mask is None or tensor.dim() < 3 or tensor.shape[:2] != mask.shape:
        return tensor
    return tensor[mask.bool()]


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    c = CASES[request.param]()
    model = c.build().eval()
    return c, model


def test_patched_matches_float64_within_2x_of_sdpa(case):
    c, model = case
    torch.manual_seed(1)
    inputs = c.make_inputs()
    oracle = copy.deepcopy(model).double()
    exact = _run(oracle, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, c)
    sdpa = _run(model, inputs, c)
    report = mmkernels.patch(model)
    try:
        ours = _run(model, inputs, c)
        runtime = report.runtime()
    finally:
        mmkernels.unpatch(model)
    assert len(report.patched("attention")) == c.patched_attention, str(report)
    assert all(served >= 1 and not fell for served, fell in runtime.values()), runtime
    for name in exact:
        e_ref = _err(_valid(c, inputs, name, sdpa[name]), _valid(c, inputs, name, exact[name]))
        e_ours = _err(_valid(c, inputs, name, ours[name]), _valid(c, inputs, name, exact[name]))
        assert e_ours <= 2 * e_ref + FLOOR, (name, e_ours, e_ref)


def test_padding_is_honoured(case):
    c, model = case
    if not c.padded:
        pytest.skip(f"{c.name}: inputs carry no padding")
    torch.manual_seed(2)
    inputs = c.make_inputs()
    mmkernels.patch(model)
    try:
        batch = _run(model, inputs, c)
        for row in range(inputs["input_ids"].shape[0]):
            keep = inputs["attention_mask"][row].bool()
            alone = {
                k: (v[row : row + 1, keep] if k in ("input_ids", "attention_mask") else v[row : row + 1])
                for k, v in inputs.items()
            }
            single = _run(model, alone, c)
            for name, value in single.items():
                b = batch[name][row : row + 1]
                if b.dim() >= 3 and b.shape[1] == keep.shape[0]:
                    b = b[:, keep]
                assert _err(b, value) <= 1e-4, (name, row)
    finally:
        mmkernels.unpatch(model)


def test_unpatch_is_exact_and_instances_are_independent(case):
    c, model = case
    torch.manual_seed(3)
    inputs = c.make_inputs()
    other = copy.deepcopy(model)
    before = _run(model, inputs, c)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    mmkernels.patch(model)
    assert mmkernels.patch(model) is mmkernels.patch(model)  # idempotent
    unpatched_other = _run(other, inputs, c)
    _run(model, inputs, c)
    for name in before:
        assert torch.equal(unpatched_other[name], before[name])
    mmkernels.unpatch(model)
    after = _run(model, inputs, c)
    assert model.config._attn_implementation == impl
    for name in before:
        assert torch.equal(after[name], before[name])
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_greedy_generate_tokens_identical(case):
    c, model = case
    if not c.decoder:
        pytest.skip(f"{c.name} is not a decoder")
    torch.manual_seed(4)
    inputs = c.make_inputs()
    inputs.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs)
        with mmkernels.patched(model) as report:
            got = model.generate(**inputs, **kwargs)
            runtime = report.runtime()
    assert torch.equal(got, expected)
    assert all(served >= 1 and not fell for served, fell in runtime.values()), runtime
