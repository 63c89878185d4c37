"""The plain ViT on random weights: shapes, position-table interpolation, the two-step block."""

import pytest
import torch
import torch.nn.functional as F

from mmkernels.models import VisionTransformer, interpolate_pos_embed


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kwargs).eval()
    with torch.no_grad():  # non-trivial layer-scale / norm parameters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_forward_shapes():
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(pixels)
        cls = model(pixels)
    assert tokens.shape == (2, 1 + 16, 64)
    assert torch.equal(cls, tokens[:, 0])
    assert torch.isfinite(tokens).all()


def test_no_layer_scale():
    model = tiny_vit(layer_scale=False)
    assert not any("ls1" in k or "ls2" in k for k in model.state_dict())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_pos_embed_interpolation_non_square_grid():
    model = tiny_vit()
    pixels = torch.randn(1, 3, 24, 56)  # 3 x 7 grid from a 4 x 4 table
    with torch.no_grad():
        tokens = model.forward_features(pixels)
    assert tokens.shape == (1, 1 + 3 * 7, 64)

    table = model.embed.pos_embed
    resized = interpolate_pos_embed(table, (4, 4), (3, 7))
    assert resized.shape == (1, 1 + 21, 64)
    assert torch.equal(resized[:, :1], table[:, :1])  # CLS position untouched
    # Independent check: each channel is a (4, 4) image resized bicubically, row-major tokens.
    grid = table[0, 1:].reshape(4, 4, 64).permute(2, 0, 1)[None]
    expect = F.interpolate(grid, size=(3, 7), mode="bicubic", align_corners=False)
    assert torch.allclose(resized[0, 1:], expect[0].permute(1, 2, 0).reshape(21, 64))
    # The trained grid is returned unchanged; a border smaller than a patch is dropped.
    assert interpolate_pos_embed(table, (4, 4), (4, 4)) is table
    assert model.embed.grid_size(39, 33) == (4, 4)


def test_steps_compose_to_forward():
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.embed(pixels)
        for blk in model.blocks:
            y = blk.attention_step(x)
            y2, scores, keys = blk.attention_step(x, scores="cls", return_keys=True)
            assert torch.allclose(y, y2, atol=1e-6)
            assert scores.shape[0] == 2 and scores.shape[-1] == x.shape[1]
            assert keys.shape == (2, 4, x.shape[1], 16)
            assert torch.equal(blk(x), blk.mlp_step(y))
            x = blk.mlp_step(y)
        assert torch.allclose(model.norm(x), model.forward_features(pixels), atol=1e-5)


def test_key_bias_minus_inf_hides_a_token():
    """A -inf key bias on the last token makes every other token's output independent of it."""
    model = tiny_vit()
    x = model.embed(torch.randn(1, 3, 32, 32)).detach()
    blk = model.blocks[0]
    bias = torch.zeros(1, x.shape[1])
    bias[0, -1] = float("-inf")
    changed = x.clone()
    changed[0, -1] += 5.0
    with torch.no_grad():
        a = blk.attention_step(x, key_bias=bias)
        b = blk.attention_step(changed, key_bias=bias)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)


def test_bad_input_rank():
    with pytest.raises(ValueError, match="pixels"):
        tiny_vit()(torch.randn(3, 32, 32))
