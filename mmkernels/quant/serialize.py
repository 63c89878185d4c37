"""Save and load quantized models: ``save_quantized`` / ``load_quantized``.

```
mmkernels.save_quantized(model, "out/")                              # lossless, self-checking
mmkernels.save_quantized(model, "out-gptq/", format="gptq")          # AutoGPTQ / GPTQModel / vLLM
mmkernels.save_quantized(model, "out-ct/", format="compressed-tensors")   # llm-compressor / vLLM
model = mmkernels.load_quantized("out/", model)      # float model in, quantized model out
ckpt = mmkernels.load_quantized("out/")              # no model: QuantizedCheckpoint
```

Every format is a **directory** (like a Hugging Face checkpoint), tensors in ``model.safetensors``:

================================  ==============================================================
``format``                        layout (each module's docstring has the details and sources)
================================  ==============================================================
``"mmkernels"``                   ``formats/mmkernels_format.py``: the whole state dict, as is,
                                  plus ``mmkernels.json`` (per-layer configuration, sha256 of every
                                  tensor, format version). Lossless for every QuantLinear
                                  (int8 / int4 / fp8, groups, act-order perm, W8A8, smoothing)
                                  and OutlierSplitLinear.
``"gptq"`` / ``"gptq_v2"``        ``formats/gptq_checkpoint.py``: qweight / qzeros / scales /
                                  g_idx + ``quantize_config.json``; int4 / int8 weight-only,
                                  one configuration for all layers, float16 scales by default.
``"compressed-tensors"``          ``formats/compressed_tensors.py``: pack-quantized (int4 / int8
                                  weight-only), int-quantized (W8A8), float-quantized (fp8) +
                                  ``config.json``; per-layer configurations allowed.
================================  ==============================================================

Loading never executes code: safetensors and JSON only, no pickle. ``load_quantized`` detects the
format from the files (``mmkernels.json``; ``config.json`` ``quant_method``;
``quantize_config.json``) and refuses damaged or inconsistent checkpoints with a ValueError that
names the file and tensor.

``load_quantized(path, model)`` replaces each ``nn.Linear`` (or QuantLinear) of ``model`` named in
the checkpoint by a QuantLinear (format ``"mmkernels"``: or an OutlierSplitLinear) built from the
file (moved to that module's device), then loads
every other tensor with strict key checking: a tensor of the model absent from the file, or one in
the file the model lacks, is an error (never silently random weights). Float tensors are copied
into the model's own parameters (their dtype is the model's). ``load_quantized(path)`` returns a
:class:`QuantizedCheckpoint` (the QuantLinear layers by name, the other tensors by state-dict
name, the format and its metadata) for use without the model class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..nn.quant_linear import QuantLinear
from ..nn.split_linear import OutlierSplitLinear
from .formats import compressed_tensors, gptq_checkpoint, mmkernels_format
from .formats._io import read_json
from .formats.common import prefix

FORMATS = ("mmkernels", "gptq", "gptq_v2", "compressed-tensors")
_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json",
                     "quantize_config.json", mmkernels_format.META_FILE)


@dataclass
class QuantizedCheckpoint:
    """What ``load_quantized(path)`` returns without a model."""
    format: str                                   # "mmkernels", "gptq" or "compressed-tensors"
    layers: Dict[str, nn.Module]                  # module name -> QuantLinear or
                                                  # OutlierSplitLinear (CPU)
    tensors: Dict[str, Tensor]                    # every other tensor, by state-dict name
    metadata: dict = field(default_factory=dict)  # the format's JSON metadata / quant config

    def state_dict(self) -> Dict[str, Tensor]:
        """The model's full state dict (quantized layers' buffers included)."""
        out = dict(self.tensors)
        for name, layer in self.layers.items():
            out.update({prefix(name) + k: v for k, v in layer.state_dict().items()})
        return out


def save_quantized(model: nn.Module, path: str, format: str = "mmkernels", *,
                   scale_dtype: Optional[torch.dtype] = None, config: Optional[dict] = None,
                   overwrite: bool = False) -> None:
    """Write ``model`` (QuantLinear layers and float tensors) to the directory ``path``.

    ``format``: ``"mmkernels"`` (lossless), ``"gptq"`` (v1: zero points stored minus one),
    ``"gptq_v2"``, or ``"compressed-tensors"``. ``scale_dtype`` (gptq / compressed-tensors only):
    dtype of the stored scales; default float16 for gptq, the model's float dtype for
    compressed-tensors. ``config`` (gptq / compressed-tensors): a model config dict (e.g. a
    transformers ``config.to_dict()``) written to ``config.json`` with ``quantization_config``
    added. ``overwrite``: replace the checkpoint files of an existing directory (otherwise an
    existing checkpoint there is an error).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "mmkernels" and (scale_dtype is not None or config is not None):
        raise TypeError("format='mmkernels' stores every tensor as is: scale_dtype and config "
                        "apply to 'gptq' / 'compressed-tensors' only")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory (checkpoints are directories)")
    existing = [f for f in _CHECKPOINT_FILES if os.path.exists(os.path.join(path, f))]
    if existing and not overwrite:
        raise ValueError(f"{path}: already holds a checkpoint ({existing}); pass overwrite=True "
                         f"to replace it")
    os.makedirs(path, exist_ok=True)
    for f in existing:
        os.remove(os.path.join(path, f))
    if format == "mmkernels":
        mmkernels_format.save(model, path)
    elif format in ("gptq", "gptq_v2"):
        gptq_checkpoint.save(model, path, checkpoint_format=format,
                             scale_dtype=scale_dtype or torch.float16, config=config)
    else:
        compressed_tensors.save(model, path, scale_dtype=scale_dtype, config=config)


def load_quantized(path: str, model: Optional[nn.Module] = None):
    """Read a checkpoint directory written by :func:`save_quantized` (or by the GPTQ /
    compressed-tensors tools). Returns ``model`` with its layers replaced and its tensors loaded,
    or a :class:`QuantizedCheckpoint` when ``model`` is None (see the module docstring)."""
    path = os.fspath(path)
    fmt = detect_format(path)
    loader = {"mmkernels": mmkernels_format.load, "gptq": gptq_checkpoint.load,
              "compressed-tensors": compressed_tensors.load}[fmt]
    layers, tensors, metadata = loader(path)
    if model is None:
        return QuantizedCheckpoint(fmt, layers, tensors, metadata)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    _install(model, layers, tensors, path)
    return model


def detect_format(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (save_quantized writes checkpoint "
                         f"directories)")
    if os.path.isfile(os.path.join(path, mmkernels_format.META_FILE)):
        return "mmkernels"
    config = os.path.join(path, "config.json")
    method = None
    if os.path.isfile(config):
        qc = read_json(config).get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "gptq" or os.path.isfile(os.path.join(path, gptq_checkpoint.QUANT_CONFIG_FILE)):
        return "gptq"
    found = sorted(os.listdir(path))[:12]
    raise ValueError(f"{path}: not a quantized checkpoint: expected {mmkernels_format.META_FILE} "
                     f"(format 'mmkernels'), {gptq_checkpoint.QUANT_CONFIG_FILE} or a config.json "
                     f"whose quantization_config.quant_method is 'gptq' or 'compressed-tensors' "
                     f"(quant_method seen: {method!r}; files: {found})")


def _install(model: nn.Module, layers: Dict[str, nn.Module], tensors: Dict[str, Tensor],
             path: str) -> None:
    for name, layer in layers.items():
        if name == "":
            raise ValueError(f"{path}: the checkpoint holds a single layer at the root; load it "
                             f"with model=None")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the checkpoint quantizes layer {name!r}, which the model "
                             f"does not have") from None
        if not isinstance(old, (nn.Linear, QuantLinear, OutlierSplitLinear)):
            raise ValueError(f"{path}: layer {name!r} is quantized in the checkpoint but is a "
                             f"{type(old).__name__} in the model (expected nn.Linear)")
        if (old.in_features, old.out_features) != (layer.in_features, layer.out_features):
            raise ValueError(f"{path}: layer {name!r} is {layer.in_features} -> "
                             f"{layer.out_features} in the checkpoint but {old.in_features} -> "
                             f"{old.out_features} in the model")
        device = next(iter(list(old.parameters()) + list(old.buffers())), torch.empty(0)).device
        model.set_submodule(name, layer.to(device))
    full = dict(tensors)
    for name, layer in layers.items():
        full.update({prefix(name) + k: v for k, v in layer.state_dict().items()})
    try:
        result = model.load_state_dict(full, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: the checkpoint's tensors do not fit the model: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: the checkpoint does not match the model: missing from the "
                         f"file {result.missing_keys[:8]}, in the file but not in the model "
                         f"{result.unexpected_keys[:8]}")
