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
``"mmkernels"``                   ``checkpoint/mmkernels_format.py``: the whole state dict, as is,
                                  plus ``mmkernels.json`` (per-layer configuration, sha256 of every
                                  tensor, format version). Lossless for every QuantLinear
                                  (int8 / int4 / fp8, groups, act-order perm, W8A8, smoothing)
                                  and OutlierSplitLinear.
``"gptq"`` / ``"gptq_v2"``        ``checkpoint/gptq_checkpoint.py``: qweight / qzeros / scales /
                                  g_idx + ``quantize_config.json``; int4 / int8 weight-only,
                                  one configuration for all layers, float16 scales by default.
``"compressed-tensors"``          ``checkpoint/compressed_tensors.py``: pack-quantized (int4 / int8
                                  weight-only), int-quantized (W8A8), float-quantized (fp8) +
                                  ``config.json``; per-layer configurations allowed.
================================  ==============================================================

Loading never executes code: safetensors and JSON only, no pickle, and no file reached through a
symlink leading out of the checkpoint directory (checkpoint/_io.py). ``load_quantized`` detects the
format from the files (``mmkernels.json``; ``config.json`` ``quant_method``;
``quantize_config.json``) and refuses damaged or inconsistent checkpoints with a ValueError that
names the file and tensor.

``load_quantized(path, model)`` replaces each ``nn.Linear`` (or QuantLinear) of ``model`` named in
the checkpoint by a QuantLinear (format ``"mmkernels"``: or an OutlierSplitLinear) built from the
file (moved to that module's device), then loads
every other tensor with strict key checking: a tensor of the model absent from the file, or one in
the file the model lacks, is an error (never silently random weights). Float tensors are copied
into the model's own parameters (their dtype is the model's). Everything is checked before the
model is changed: a refused checkpoint leaves the model exactly as it was.
``load_quantized(path)`` returns a :class:`QuantizedCheckpoint` (the QuantLinear layers by name,
the other tensors by state-dict name, the format and its metadata) for use without the model
class.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ..nn.quant_linear import QuantLinear
from ..nn.split_linear import OutlierSplitLinear
from .checkpoint import compressed_tensors, gptq_checkpoint, mmkernels_format
from .checkpoint._io import read_json
from .checkpoint.common import prefix

FORMATS = ("mmkernels", "gptq", "gptq_v2", "compressed-tensors")
_CHECKPOINT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "quantize_config.json",
    mmkernels_format.META_FILE,
)


@dataclass
class QuantizedCheckpoint:
    """What ``load_quantized(path)`` returns without a model."""

    format: str  # "mmkernels", "gptq" or "compressed-tensors"
    layers: Dict[str, nn.Module]  # module name -> QuantLinear or
    # OutlierSplitLinear (CPU)
    tensors: Dict[str, Tensor]  # every other tensor, by state-dict name
    metadata: dict = field(default_factory=dict)  # the format's JSON metadata / quant config

    def state_dict(self) -> Dict[str, Tensor]:
        """The model's full state dict (quantized layers' buffers included)."""
        out = dict(self.tensors)
        for name, layer in self.layers.items():
            out.update({prefix(name) + k: v for k, v in layer.state_dict().items()})
        return out


def save_quantized(
    model: nn.Module,
    path: str,
    format: str = "mmkernels",
    *,
    scale_dtype: Optional[torch.dtype] = None,
    config: Optional[dict] = None,
    overwrite: bool = False,
    float_dtype: Optional[torch.dtype] = None,
    tokenizer: Any = None,
) -> None:
    """Write ``model`` (QuantLinear layers and float tensors) to the directory ``path``.

    ``format``: ``"mmkernels"`` (lossless), ``"gptq"`` (v1: zero points stored minus one),
    ``"gptq_v2"``, or ``"compressed-tensors"``. ``scale_dtype`` (gptq / compressed-tensors only):
    dtype of the stored scales; default float16 for gptq, the model's float dtype for
    compressed-tensors. ``config`` (gptq / compressed-tensors): a model config dict (e.g. a
    transformers ``config.to_dict()``) written to ``config.json`` with ``quantization_config``
    added; default: the model's own ``model.config.to_dict()`` when it has one (a transformers
    model), so that ``AutoModel.from_pretrained(path)`` loads the directory as it is.
    ``float_dtype`` (gptq / compressed-tensors): dtype of the float tensors left unquantized
    (embeddings, norms, biases), e.g. ``torch.bfloat16`` to halve an fp32 checkpoint; recorded as
    the config's ``dtype``. ``tokenizer``: an object with ``save_pretrained(dir)`` (a transformers
    tokenizer or processor) or a directory whose tokenizer / processor files are copied beside the
    checkpoint.

    The save is atomic with respect to errors: the checkpoint is first written completely into a
    new hidden directory beside ``path`` (``.<name>.tmp-<random>``), then moved into place. A
    refused save (a format that cannot express the model, e.g. ``"gptq"`` /
    ``"compressed-tensors"`` with OutlierSplitLinear layers) or a failed one leaves no directory,
    no temporary directory and no partial file behind.

    Existing ``path``: a file is an error. A directory that already holds checkpoint files
    (``model.safetensors``, ``model.safetensors.index.json``, ``config.json``,
    ``quantize_config.json``, ``mmkernels.json``) is an error unless ``overwrite=True``; then,
    once the new checkpoint is complete, those old files are removed and the new ones moved in
    (each by an atomic rename), and every other file of the directory (a tokenizer, a README) is
    kept. A directory without checkpoint files (empty, or other files only) is written into the
    same way. Raises TypeError / ValueError naming the argument or the path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "mmkernels" and (scale_dtype is not None or config is not None or float_dtype is not None):
        raise TypeError(
            "format='mmkernels' stores every tensor as is: scale_dtype, config and "
            "float_dtype apply to 'gptq' / 'compressed-tensors' only"
        )
    if float_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"float_dtype must be float32, float16, bfloat16 or None, got {float_dtype!r}")
    if format != "mmkernels":
        config = _model_config(model, config, float_dtype)
    path = os.path.normpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory (checkpoints are directories)")
    existing = [f for f in _CHECKPOINT_FILES if os.path.lexists(os.path.join(path, f))]
    if existing and not overwrite:
        raise ValueError(f"{path}: already holds a checkpoint ({existing}); pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    created = _make_parents(parent)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(tmp)
        if format == "mmkernels":
            mmkernels_format.save(model, tmp)
        elif format in ("gptq", "gptq_v2"):
            gptq_checkpoint.save(
                model,
                tmp,
                checkpoint_format=format,
                scale_dtype=scale_dtype or torch.float16,
                config=config,
                float_dtype=float_dtype,
            )
        else:
            compressed_tensors.save(model, tmp, scale_dtype=scale_dtype, config=config, float_dtype=float_dtype)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        if not os.path.isdir(path):
            os.rename(tmp, path)  # atomic: the directory appears complete or not at all
            return
        # An existing directory: swap the checkpoint files, keep the others.
        for f in existing:
            os.remove(os.path.join(path, f))
        for f in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, f), os.path.join(path, f))
        os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):  # parent folders this call made, innermost first
            try:
                os.rmdir(d)
            except OSError:
                break
        raise


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _model_config(model: nn.Module, config: Optional[dict], float_dtype) -> Optional[dict]:
    """The config dict written to config.json: the one given, else a transformers model's own."""
    if config is None and callable(getattr(getattr(model, "config", None), "to_dict", None)):
        config = model.config.to_dict()
    if config is not None and float_dtype is not None:
        config = {**config, "dtype": str(float_dtype).replace("torch.", "")}
    return config


def _save_tokenizer(tokenizer, directory: str) -> None:
    """Tokenizer / processor files beside the checkpoint (``save_pretrained`` or a folder)."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
        return
    source = os.fspath(tokenizer)
    if not os.path.isdir(source):
        raise ValueError(f"tokenizer must have save_pretrained() or be a directory, got {source!r}")
    copied = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    if not copied:
        raise ValueError(f"tokenizer: {source} holds none of {list(_TOKENIZER_FILES)}")
    for f in copied:
        shutil.copyfile(os.path.join(source, f), os.path.join(directory, f))


def _make_parents(folder: str) -> list:
    """``os.makedirs(folder)``; returns the folders it created, outermost first (for cleanup)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    missing.reverse()
    for d in missing:
        os.makedirs(d, exist_ok=True)
    return missing


def load_quantized(path: str, model: Optional[nn.Module] = None) -> Union[nn.Module, "QuantizedCheckpoint"]:
    """Read a checkpoint directory written by :func:`save_quantized` (or by the GPTQ /
    compressed-tensors tools). Returns ``model`` with its layers replaced and its tensors loaded,
    or a :class:`QuantizedCheckpoint` when ``model`` is None (see the module docstring).

    Atomic: every layer name, module type, shape and tensor key is checked before ``model`` is
    changed, so a ValueError leaves ``model`` exactly as it was."""
    path = os.fspath(path)
    fmt = detect_format(path)
    loader = {
        "mmkernels": mmkernels_format.load,
        "gptq": gptq_checkpoint.load,
        "compressed-tensors": compressed_tensors.load,
    }[fmt]
    layers, tensors, metadata = loader(path)
    if model is None:
        return QuantizedCheckpoint(fmt, layers, tensors, metadata)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    _install(model, layers, tensors, path)
    return model


def detect_format(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (save_quantized writes checkpoint directories)")
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
    raise ValueError(
        f"{path}: not a quantized checkpoint: expected {mmkernels_format.META_FILE} "
        f"(format 'mmkernels'), {gptq_checkpoint.QUANT_CONFIG_FILE} or a config.json "
        f"whose quantization_config.quant_method is 'gptq' or 'compressed-tensors' "
        f"(quant_method seen: {method!r}; files: {found})"
    )


def _install(model: nn.Module, layers: Dict[str, nn.Module], tensors: Dict[str, Tensor], path: str) -> None:
    """Replace ``model``'s layers by ``layers`` and load ``tensors``, atomically: everything that
    can be wrong (names, module types, shapes, missing or unexpected tensors) is checked before
    the model is touched, so an error leaves the model exactly as it was."""
    placed: Dict[str, nn.Module] = {}
    for name, layer in layers.items():
        if name == "":
            raise ValueError(f"{path}: the checkpoint holds a single layer at the root; load it with model=None")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: the checkpoint quantizes layer {name!r}, which the model does not have"
            ) from None
        if not isinstance(old, (nn.Linear, QuantLinear, OutlierSplitLinear)):
            raise ValueError(
                f"{path}: layer {name!r} is quantized in the checkpoint but is a "
                f"{type(old).__name__} in the model (expected nn.Linear)"
            )
        if (old.in_features, old.out_features) != (layer.in_features, layer.out_features):
            raise ValueError(
                f"{path}: layer {name!r} is {layer.in_features} -> "
                f"{layer.out_features} in the checkpoint but {old.in_features} -> "
                f"{old.out_features} in the model"
            )
        device = next(iter(list(old.parameters()) + list(old.buffers())), torch.empty(0)).device
        placed[name] = layer.to(device)
    full = dict(tensors)
    for name, layer in placed.items():
        full.update({prefix(name) + k: v for k, v in layer.state_dict().items()})
    # What load_state_dict(strict=True) would refuse, checked against the model as it will be:
    # its current tensors outside the replaced layers, plus the new layers' own tensors.
    current = model.state_dict(keep_vars=True)
    replaced = tuple(prefix(name) for name in placed)
    expected = {k: v for k, v in current.items() if not k.startswith(replaced)}
    for name, layer in placed.items():
        expected.update({prefix(name) + k: v for k, v in layer.state_dict(keep_vars=True).items()})
    missing = [k for k in expected if k not in full]  # in the model's order
    unexpected = [k for k in full if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: the checkpoint does not match the model: missing from the "
            f"file {missing[:8]}, in the file but not in the model "
            f"{unexpected[:8]}"
        )
    wrong = [
        f"{k}: {list(full[k].shape)} in the file, {list(expected[k].shape)} in the model"
        for k in sorted(full)
        if full[k].shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"{path}: the checkpoint's tensors do not fit the model: {'; '.join(wrong[:8])}")
    # Apply. Nothing above changed the model; should the load still fail (a custom
    # _load_from_state_dict hook, say), the original modules are put back.
    originals = {name: model.get_submodule(name) for name in placed}
    try:
        for name, layer in placed.items():
            model.set_submodule(name, layer)
        model.load_state_dict(full, strict=True)
    except Exception as e:
        for name, old in originals.items():
            model.set_submodule(name, old)
        raise ValueError(f"{path}: the checkpoint's tensors do not fit the model: {e}") from None
