"""A pre-norm Vision Transformer (DINOv2-style) whose attention runs on ``mmkernels.attention``.

Architecture (per block): ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``, with
LayerNorm eps 1e-6, an exact-erf GELU MLP, optional layer-scale, a CLS token, learned position
embeddings and a final LayerNorm.

Where this differs from HF transformers' ``Dinov2Model`` (and why):

* Attention is ``mmkernels.nn.Attention`` (``q_proj/k_proj/v_proj/o_proj``) instead of
  ``attention.attention.{query,key,value}`` + ``attention.output.dense``: our kernels run it and it
  can also return per-key scores and the keys, which token merging/pruning need.
* Each :class:`Block` is split into :meth:`Block.attention_step` and :meth:`Block.mlp_step` so a
  token-reduction method can act between the two; ``forward`` is just their composition.
* The position table keeps its own grid shape (``pos_grid``) instead of assuming a square table;
  interpolation to the input grid is otherwise the same as HF's ``interpolate_pos_encoding``
  (bicubic, ``align_corners=False``, no antialias, computed in float32, target grid
  ``(H // patch, W // patch)``, CLS position kept as is).
* No mask token, dropout or drop-path: this model is for inference.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels.nn import Attention

Size2 = Union[int, Tuple[int, int]]


def _pair(v: Size2) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def interpolate_pos_embed(pos_embed: Tensor, grid: Tuple[int, int], new_grid: Tuple[int, int]) -> Tensor:
    """Resize a ``(1, 1 + gh*gw, C)`` position table (CLS position first) to ``new_grid``.

    The patch part is viewed as a ``(gh, gw)`` image with C channels and resized with bicubic
    interpolation (``align_corners=False``, no antialias) in float32, then cast back; the CLS
    position is not interpolated. Same as HF DINOv2; an unchanged grid returns the table itself.
    """
    if tuple(new_grid) == tuple(grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=tuple(new_grid), mode="bicubic", align_corners=False).to(
        pos_embed.dtype
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class Embeddings(nn.Module):
    """Pixels ``(B, 3, H, W)`` -> tokens ``(B, 1 + N, C)``: Conv2d patches (stride = patch size,
    so a border smaller than a patch is dropped), a CLS token in front, then position embeddings
    interpolated to the ``(H // p, W // p)`` grid."""

    def __init__(
        self,
        img_size: Size2,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        pos_grid: Optional[Size2] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.patch_size = patch_size
        h, w = _pair(img_size)
        self.pos_grid = _pair(pos_grid) if pos_grid is not None else (h // patch_size, w // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, **factory)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
        n_pos = 1 + self.pos_grid[0] * self.pos_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim, **factory))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.dim() != 4:
            raise ValueError(f"pixels must be (B, C, H, W), got shape {tuple(pixels.shape)}")
        grid = self.grid_size(pixels.shape[-2], pixels.shape[-1])
        x = self.proj(pixels.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + interpolate_pos_embed(self.pos_embed, self.pos_grid, grid)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT/DINOv2)."""

    def __init__(self, dim: int, init_value: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf, not the tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block in two steps, so token reduction can act between them:

    * :meth:`attention_step`: ``x + ls1(attn(norm1(x)))``
    * :meth:`mlp_step`: ``x + ls2(mlp(norm2(x)))``
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        layer_scale: bool = True,
        layer_scale_init: float = 1.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.attn = Attention(dim, num_heads, bias=qkv_bias, backend=backend, **factory)
        self.ls1 = LayerScale(dim, layer_scale_init, **factory) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **factory)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **factory)
        self.ls2 = LayerScale(dim, layer_scale_init, **factory) if layer_scale else nn.Identity()

    def attention_step(
        self, x: Tensor, *, key_bias: Optional[Tensor] = None, scores: Optional[str] = None, return_keys: bool = False
    ):
        """Attention with its residual. Returns x; ``(x, scores)`` when ``scores`` is given;
        ``(x, scores_or_None, keys)`` with ``return_keys=True`` (keys ``(B, H, L, D)``), the same
        convention as :class:`mmkernels.nn.Attention`. ``key_bias`` is passed through (e.g.
        ``log(size)`` for proportional attention after token merging)."""
        res = self.attn(self.norm1(x), key_bias=key_bias, scores=scores, return_keys=return_keys)
        if return_keys:
            out, s, keys = res
            return x + self.ls1(out), s, keys
        if scores:
            out, s = res
            return x + self.ls1(out), s
        return x + self.ls1(res)

    def mlp_step(self, x: Tensor) -> Tensor:
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_step(self.attention_step(x))


class VisionTransformer(nn.Module):
    """Pre-norm ViT: ``embed`` -> ``blocks`` -> ``norm``.

    ``img_size`` is the resolution the position table was trained for (its grid is
    ``img_size // patch_size`` unless ``pos_grid`` is given); any other input size is handled by
    interpolating the table. ``backend`` is passed to every attention call (None: mmkernels' auto
    selection, which ``MMKERNELS_BACKEND`` can override).

    For custom loops (token merging, pruning)::

        x = model.embed(pixels)
        for blk in model.blocks:
            x = blk.mlp_step(blk.attention_step(x))
        tokens = model.norm(x)
    """

    def __init__(
        self,
        img_size: Size2 = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_scale: bool = True,
        *,
        layer_scale_init: float = 1.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        in_chans: int = 3,
        pos_grid: Optional[Size2] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.patch_size = embed_dim, num_heads, patch_size
        self.embed = Embeddings(img_size, patch_size, in_chans, embed_dim, pos_grid, **factory)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                layer_scale=layer_scale,
                layer_scale_init=layer_scale_init,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                backend=backend,
                **factory,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, **factory)

    def forward_features(self, pixels: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> all tokens after the final norm, ``(B, 1 + N, C)``, CLS first."""
        x = self.embed(pixels)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, pixels: Tensor) -> Tensor:
        """The CLS embedding after the final norm, ``(B, C)`` (HF's ``pooler_output``)."""
        return self.forward_features(pixels)[:, 0]

    def set_backend(self, backend: Optional[str]) -> "VisionTransformer":
        """Set the attention backend of every block (None: auto)."""
        for blk in self.blocks:
            blk.attn.backend = backend
        return self
