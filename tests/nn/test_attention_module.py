"""mmkernels.nn.Attention against nn.MultiheadAttention and a hand-written GQA module."""

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.nn import Attention


@pytest.mark.parametrize("backend", ["reference", None])
def test_matches_torch_mha_with_padding(backend):
    mha = nn.MultiheadAttention(96, 4, batch_first=True).eval()
    ours = Attention.from_torch_mha(mha, backend=backend)
    x = torch.randn(3, 13, 96)
    pad = torch.zeros(3, 13, dtype=torch.bool)
    pad[1, 9:] = True
    want, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    got = ours(x, key_padding_mask=pad)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_cross_attention_with_kdim_vdim():
    mha = nn.MultiheadAttention(64, 2, kdim=40, vdim=24, batch_first=True).eval()
    ours = Attention.from_torch_mha(mha)
    x, ctx_k = torch.randn(2, 5, 64), torch.randn(2, 9, 40)
    # nn.MultiheadAttention takes separate key and value inputs; ours takes one context, so use
    # a value input that is the same token set projected differently (kdim != vdim).
    ctx_v = torch.randn(2, 9, 24)
    want, _ = mha(x, ctx_k, ctx_v, need_weights=False)
    q = ours.q_proj(x).unflatten(-1, (2, 32)).transpose(1, 2)
    k = ours.k_proj(ctx_k).unflatten(-1, (2, 32)).transpose(1, 2)
    v = ours.v_proj(ctx_v).unflatten(-1, (2, 32)).transpose(1, 2)
    got = ours.o_proj(mmkernels.attention(q, k, v).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_gqa_scores_and_hf_state_dict_names():
    torch.manual_seed(1)
    ours = Attention(64, 8, num_kv_heads=2, bias=False, scores="cls").eval()
    state = {f"{n}.weight": 0.2 * torch.randn_like(getattr(ours, n).weight) for n in ("q_proj", "k_proj", "v_proj")}
    state["out_proj.weight"] = 0.2 * torch.randn_like(ours.o_proj.weight)  # CLIP/SigLIP name
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 11, 64)
    out, scores = ours(x)
    q = (x @ state["q_proj.weight"].T).unflatten(-1, (8, 8)).transpose(1, 2)
    k = (x @ state["k_proj.weight"].T).unflatten(-1, (2, 8)).transpose(1, 2).repeat_interleave(4, 1)
    v = (x @ state["v_proj.weight"].T).unflatten(-1, (2, 8)).transpose(1, 2).repeat_interleave(4, 1)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    want = (p @ v).transpose(1, 2).flatten(-2) @ state["out_proj.weight"].T
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(scores, p[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)


def test_varlen_self_attention_matches_padded():
    ours = Attention(32, 2).eval()
    lens = [4, 9]
    xs = [torch.randn(n, 32) for n in lens]
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    packed = ours(torch.cat(xs), cu_seqlens_q=cu, max_seqlen_q=9)
    for x, start in zip(xs, (0, 4)):
        torch.testing.assert_close(packed[start : start + len(x)], ours(x[None])[0], atol=2e-5, rtol=1e-4)


def test_return_keys_gives_projected_keys():
    ours = Attention(32, 4, num_kv_heads=2).eval()
    x = torch.randn(2, 5, 32)
    out, scores, keys = ours(x, return_keys=True)
    assert scores is None and out.shape == (2, 5, 32)
    torch.testing.assert_close(keys, ours.k_proj(x).unflatten(-1, (2, 8)).transpose(1, 2))
    out2, scores2, _ = ours(x, scores="mean", return_keys=True)
    torch.testing.assert_close(out2, out)
    assert scores2.shape == (2, 5)
