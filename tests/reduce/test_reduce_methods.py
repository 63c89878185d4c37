"""Token-reduction methods on a small random ViT (real weights: tests/reduce/test_reduce_methods_dinov2.py)."""

import pytest
import torch

import mmkernels
from mmkernels.reduce.methods import EViT, ToMe, evit_fuse, tome_schedule

models = pytest.importorskip("mmkernels.models", reason="mmkernels.models not installed")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = models.VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4).eval()
    return model


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


def test_proportional_attention_equals_duplicated_keys():
    """A token of size 2 with key_bias log 2 attends exactly like two identical copies."""
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    kv = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    dup = torch.cat([kv[:, :, :1], kv], dim=2)  # token 0 twice
    size = torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64)
    merged = mmkernels.attention(q, kv, kv, key_bias=size.log())
    torch.testing.assert_close(merged, mmkernels.attention(q, dup, dup))


def test_tome_r0_is_the_plain_model(vit, pixels):
    with torch.no_grad():
        tokens, size = ToMe(vit, r=0)(pixels)
        torch.testing.assert_close(tokens, vit.forward_features(pixels), atol=1e-5, rtol=1e-5)
    assert torch.all(size == 1)


def test_tome_schedule_and_sizes(vit, pixels):
    n = 1 + 64
    assert tome_schedule(8, 4, n) == [8, 8, 8, 8]
    assert tome_schedule(40, 4, n) == [32, 16, 8, 4]  # clipped to what can still merge
    with pytest.raises(ValueError, match="r schedule has 3 entries"):
        tome_schedule([1, 2, 3], 4, n)
    with torch.no_grad():
        tokens, size = ToMe(vit, r=[4, 8, 0, 2])(pixels)
    assert tokens.shape == (3, n - 14, 64)
    torch.testing.assert_close(size.sum(1), torch.full((3,), float(n)))
    assert torch.all(size[:, 0] == 1)  # CLS is protected


def test_tome_fast_backend_matches_reference(vit, pixels, monkeypatch):
    with torch.no_grad():
        fast = ToMe(vit, r=6)(pixels)
        monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
        ref = ToMe(vit, r=6)(pixels)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[1], ref[1])


def test_evit_fuse_weights_dropped_tokens_by_attention():
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.04, 0.01]] * 2, dtype=torch.float64)
    out = evit_fuse(x, scores, keep=2)
    torch.testing.assert_close(out[:, :3], x[:, [0, 1, 2]])
    w = scores[0, 3:] / scores[0, 3:].sum()
    torch.testing.assert_close(out[:, 3], (w[None, :, None] * x[:, 3:]).sum(1))


def test_evit_keep_all_is_plain_and_prunes_shapes(vit, pixels):
    with torch.no_grad():
        torch.testing.assert_close(
            EViT(vit, 1.0, prune_at=(1,))(pixels), vit.forward_features(pixels), atol=1e-5, rtol=1e-5
        )
        out = EViT(vit, 0.5, prune_at=(1, 2))(pixels)
    # 64 patches -> keep 32 + fused -> 33 patches -> keep 17 + fused
    assert out.shape == (3, 1 + 17 + 1, 64)
    with pytest.raises(ValueError, match="keep_rate"):
        EViT(vit, 0.0)
    with pytest.raises(ValueError, match="prune_at"):
        EViT(vit, 0.5, prune_at=(7,))


def test_visionzip_and_prumerge_modules(vit, pixels):
    from mmkernels.reduce.methods import PruMerge, VisionZip, prumerge, visionzip

    with torch.no_grad():
        out = VisionZip(vit, dominant=10, contextual=4, layer=-2)(pixels)
        assert out.shape == (3, 1 + 10 + 4, 64)
        x = vit.embed(pixels)
        x = vit.blocks[0](x)
        x = vit.blocks[1](x)
        h, scores, keys = vit.blocks[2].attention_step(x, scores="cls", return_keys=True)
        h = vit.blocks[2].mlp_step(h)
        torch.testing.assert_close(out, visionzip(h, keys.mean(1), scores, 10, 4))
        packed, cu = PruMerge(vit, k=8)(pixels)
        want, want_cu = prumerge(h, keys.mean(1), scores, 8)
        torch.testing.assert_close(packed, want)
        assert torch.equal(cu, want_cu)


def test_fastv_module_matches_functional_pruning():
    from mmkernels.nn import Attention
    from mmkernels.reduce.methods import FastV, fastv_prune

    torch.manual_seed(0)
    blocks = [models.vit.Block(32, 4) for _ in range(3)]
    for b in blocks:
        b.attn.causal = True
    fastv = FastV(blocks, k=1, image_span=(2, 12), keep_ratio=0.3).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out, keep = fastv(x)
        h = blocks[0](x)
        h, last = blocks[1].attention_step(h, scores="last")
        h, _, keep2 = fastv_prune(h, last, (2, 12), 0.3)
        h = blocks[2](blocks[1].mlp_step(h))
    assert torch.equal(keep, keep2) and out.shape == (2, 16 - 7, 32)
    torch.testing.assert_close(out, h)
    assert isinstance(blocks[0].attn, Attention)
