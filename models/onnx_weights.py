"""Read an ONNX model's weights (initializers) into a torch state dict, executing nothing.

PyTorch's ONNX exporter keeps parameter names for most initializers (``backbone.layernorm.weight``)
but stores every Linear weight as an anonymous, transposed ``onnx::MatMul_<n>`` initializer of
shape ``(in, out)``; constant folding can also turn other parameters into anonymous tensors (the
DINOv2 export splits its position table into ``onnx::Concat_*`` and ``onnx::Reshape_*``).
:func:`onnx_state_dict` names them from the node that consumes them: the exporter names nodes
after the module scope, e.g. ``/backbone/encoder/layer.0/attention/attention/query/MatMul``.

* ``onnx::MatMul_*`` used as a MatMul's second input -> ``<scope>.weight``, transposed to torch's
  ``(out, in)``, e.g. ``backbone.encoder.layer.0.attention.attention.query.weight``.
* any other anonymous initializer -> ``<scope>.<its ONNX name>``, e.g.
  ``backbone.embeddings.onnx::Concat_1957``; a model-specific mapping decides what it is.
* named initializers keep their names.

Needs the ``onnx`` package (imported lazily, so importing this module does not).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch

ANON_PREFIX = "onnx::"


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading ONNX weights needs the 'onnx' package: pip install onnx") from e
    return onnx, numpy_helper


def load_onnx_model(path: Union[str, os.PathLike]):
    """``onnx.load`` plus a structural check, turning a truncated or corrupt file into a
    ``ValueError`` that names the file (protobuf's own errors do not)."""
    onnx, _ = _import_onnx()
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        model = onnx.load(path)
        # Catches files cut at a message boundary: protobuf then parses a valid prefix, and
        # the checker sees nodes whose inputs (initializers stored after the nodes) are missing.
        onnx.checker.check_model(model)
    except Exception as e:
        raise ValueError(
            f"{path} ({size} bytes) is not a readable ONNX model; the file may be "
            f"truncated or corrupt (reinstall the package that ships it): "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e
    if not model.graph.initializer:
        raise ValueError(f"{path} ({size} bytes) holds no initializers (no weights)")
    return model


def _scope(node_name: str) -> Optional[str]:
    """``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``backbone.encoder.layer.0.mlp.fc1``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else None


def onnx_state_dict(
    model_or_path, prefix: Optional[str] = None, *, base_dir: Optional[Union[str, os.PathLike]] = None
) -> Dict[str, torch.Tensor]:
    """All initializers of an ONNX model (a path or an ``onnx.ModelProto``) as torch tensors,
    named as described in the module docstring.

    ``prefix`` (e.g. ``"backbone."``) keeps only names that start with it and strips it.
    ``base_dir``: the folder of a ``ModelProto`` whose initializers keep their data in external
    files (``onnx.load(path, load_external_data=False)``, or a model saved with
    ``save_as_external_data``); those files are read from it, never from the current directory.
    For a path it defaults to the file's folder (``onnx.load`` reads external data from there).
    Raises ``ValueError`` for an unreadable file, an initializer whose data does not match its
    shape, an initializer with external data when the model's folder is not known (a
    ``ModelProto`` without ``base_dir``) or whose external file lies outside that folder, or a
    MatMul weight shared by two differently-named nodes (tied weights).
    """
    onnx, numpy_helper = _import_onnx()
    if hasattr(model_or_path, "graph"):
        model = model_or_path
    else:
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(os.fspath(model_or_path)))
        model = load_onnx_model(model_or_path)
    graph = model.graph
    base = None if base_dir is None else os.fspath(base_dir)

    consumers: Dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    state: Dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if external:
            _check_external_location(init, base)
        try:
            array = numpy_helper.to_array(init, base_dir=base) if external else numpy_helper.to_array(init)
        except Exception as e:
            raise ValueError(
                f"initializer {init.name!r} (dims {list(init.dims)}) cannot be read; "
                f"the file may be truncated or corrupt: {e}"
            ) from e
        tensor = torch.from_numpy(array.copy())
        name = init.name
        if name.startswith(ANON_PREFIX):
            name, tensor = _name_anonymous(init.name, tensor, consumers.get(init.name, []))
        if name in state:
            raise ValueError(f"two initializers map to the name {name!r}")
        state[name] = tensor

    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"no initializer name starts with prefix {prefix!r}")
    return state


def _check_external_location(init, base: Optional[str]) -> None:
    """An initializer whose bytes live in an external file: that file must be named relative to
    the model's folder ``base`` and stay inside it (numpy_helper would otherwise resolve it
    against the current directory)."""
    location = next((e.value for e in init.external_data if e.key == "location"), None)
    if base is None:
        raise ValueError(
            f"initializer {init.name!r} keeps its data in the external file "
            f"{location!r}, and this ModelProto does not say which folder it was "
            f"loaded from: pass base_dir=<the .onnx file's folder>, or pass the "
            f"file's path instead of the ModelProto (external data is never read "
            f"relative to the current directory)"
        )
    if not location or os.path.isabs(location):
        raise ValueError(
            f"initializer {init.name!r}: external data location {location!r} must "
            f"be a file name relative to the model's folder {base}"
        )
    real_base = os.path.realpath(base)
    real = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([real, real_base]) != real_base:
        raise ValueError(
            f"initializer {init.name!r}: external data location {location!r} "
            f"resolves to {real}, outside the model's folder {real_base}"
        )


def _name_anonymous(raw: str, tensor: torch.Tensor, uses: list):
    matmuls = [n for n, i in uses if n.op_type == "MatMul" and i == 1]
    if matmuls and len(matmuls) == len(uses) and tensor.dim() == 2:
        scopes = {_scope(n.name) for n in matmuls}
        if None in scopes:
            return raw, tensor
        if len(scopes) > 1:
            raise ValueError(
                f"{raw} feeds MatMul nodes of several modules {sorted(scopes)} (tied weights); name it by hand"
            )
        return f"{scopes.pop()}.weight", tensor.t().contiguous()
    scope = _scope(uses[0][0].name) if uses else None
    return (f"{scope}.{raw}" if scope else raw), tensor
