"""VisionZip, PruMerge and FastV against straightforward loop implementations."""

import numpy as np
import pytest
import torch

import mmkernels
from mmkernels.nn import Attention
from mmkernels.reduce.methods import (
    compact_kv_cache,
    fastv_keep_indices,
    fastv_prune,
    iqr_keep_counts,
    prumerge,
    visionzip,
)


def test_visionzip_matches_loops():
    torch.manual_seed(0)
    b, n, c = 2, 30, 5
    x, keys, scores = torch.randn(b, n, c), torch.randn(b, n, 4), torch.rand(b, n)
    out = visionzip(x, keys, scores, dominant=6, contextual=4)
    assert out.shape == (b, 1 + 6 + 4, c)
    for i in range(b):
        order = sorted(range(1, n), key=lambda t: (-float(scores[i, t]), t))
        dom = sorted([0] + order[:6])
        torch.testing.assert_close(out[i, :7], x[i, dom])
        rest = [t for t in range(n) if t not in dom]
        targets = [rest[(j * len(rest)) // 4] for j in range(4)]
        groups = {t: [t] for t in targets}
        for t in rest:
            if t in targets:
                continue
            sims = [float(keys[i, t] @ keys[i, g]) for g in targets]
            groups[targets[int(np.argmax(sims))]].append(t)
        for j, t in enumerate(targets):
            torch.testing.assert_close(out[i, 7 + j], x[i, groups[t]].mean(0), atol=1e-6, rtol=1e-5)


def test_visionzip_bad_counts():
    x = torch.randn(1, 10, 3)
    with pytest.raises(ValueError, match="cannot give"):
        visionzip(x, x, torch.rand(1, 10), dominant=6, contextual=4)


def test_prumerge_iqr_counts_and_merge():
    torch.manual_seed(0)
    b, n, c = 3, 50, 6
    x, keys = torch.randn(b, n, c), torch.randn(b, n, 8)
    scores = torch.rand(b, n) * 0.1
    scores[0, [5, 9, 33]] = 2.0  # three clear outliers
    scores[1, 7] = 1.0  # one
    counts = iqr_keep_counts(scores)
    for i in range(b):
        p = scores[i, 1:].numpy()
        q1, q3 = np.quantile(p, 0.25), np.quantile(p, 0.75)
        assert int(counts[i]) == max(1, int((p > q3 + 1.5 * (q3 - q1)).sum()))
    assert counts[0] == 3 and counts[1] == 1
    packed, cu = prumerge(x, keys, scores, k=4)
    assert cu.tolist() == [0] + torch.cumsum(counts + 1, 0).tolist()
    # Image 0: CLS, then tokens 5, 9, 33, each merged with its 4 nearest pruned tokens.
    torch.testing.assert_close(packed[0], x[0, 0])
    unit = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    kept = [5, 9, 33]
    for row, t in zip(packed[1:4], kept):
        cands = [j for j in range(1, n) if j not in kept]
        nn_ = sorted(cands, key=lambda j: -float(unit[t] @ unit[j]))[:4]
        w = scores[0, [t] + nn_]
        want = (w[:, None] * x[0, [t] + nn_]).sum(0) / w.sum()
        torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)


def test_prumerge_output_feeds_varlen_attention():
    x, keys, scores = torch.randn(2, 40, 16), torch.randn(2, 40, 16), torch.rand(2, 40)
    packed, cu = prumerge(x, keys, scores)
    q = packed.reshape(-1, 2, 8)
    out = mmkernels.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert out.shape == q.shape


def test_fastv_keep_indices():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.3, 0.8, 0.2, 0.0]])
    keep = fastv_keep_indices(scores, (1, 6), keep_ratio=0.4)
    assert keep.tolist() == [[0, 2, 4, 6]]
    with pytest.raises(ValueError, match="image_span"):
        fastv_keep_indices(scores, (3, 9), 0.5)


class TinyDecoder(torch.nn.Module):
    def __init__(self, dim=32, heads=4, depth=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(Attention(dim, heads, causal=True) for _ in range(depth))

    def layer(self, i, x, key_bias=None, scores=None):
        res = self.layers[i](x, key_bias=key_bias, scores=scores)
        if scores:
            return x + res[0], res[1]
        return x + res


def test_fastv_prefill_equals_masking_dropped_tokens():
    """Dropping tokens after layer K equals keeping them but masking them as keys afterwards
    (for the surviving positions), which is what FastV's eager implementation computes."""
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    x = torch.randn(2, 20, 32)
    k_layer, span = 1, (3, 15)
    with torch.no_grad():
        h = x
        for i in range(k_layer):
            h = model.layer(i, h)
        h, last = model.layer(k_layer, h, scores="last")
        pruned, pos, keep = fastv_prune(h, last, span, keep_ratio=0.5)
        assert pruned.shape == (2, 20 - 6, 32) and torch.equal(pos, keep)
        full = h
        bias = torch.full((2, 20), float("-inf"))
        bias.scatter_(1, keep, 0.0)
        for i in range(k_layer + 1, len(model.layers)):
            pruned = model.layer(i, pruned)
            full = model.layer(i, full, key_bias=bias)
    torch.testing.assert_close(pruned, full.gather(1, keep[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)


def test_compact_kv_cache():
    k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    keep = torch.tensor([[0, 2, 9], [1, 5, 6]])
    ck, cv = compact_kv_cache((k, v), keep)
    torch.testing.assert_close(ck[1, :, 1], k[1, :, 5])
    torch.testing.assert_close(cv[0, :, 2], v[0, :, 9])
