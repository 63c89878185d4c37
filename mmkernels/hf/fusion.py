"""Which activation a module applies straight to the output of one of its Linear layers: what
``mmkernels.patch(model, linear=True)`` fuses into that layer's epilogue (the ``activation`` of
:func:`mmkernels.linear`), replacing the activation module with ``nn.Identity``.

A fusion is taken only where the parent module's forward (its class's source, read once per class)
applies ``self.<act>`` to ``self.<fc>``'s output and to nothing else, in one of two shapes:

* nested:      ``... self.act(self.fc(expr)) ...``              (Llama's MLP, Whisper's layers)
* sequential:  ``h = self.fc(expr)`` then at once ``h = self.act(h)``
  (DINOv2, CLIP, SigLIP, ViT MLPs, BERT's intermediate layer)

with ``self.fc`` and ``self.act`` each named exactly once in that forward, no forward of the
instance's own, and an activation module of a kind the kernel computes (:func:`activation_kind`).
Anything else stays unfused: a forward that reuses the activation or the pre-activation, a
wrapped or decorated forward whose source does not show the call, an unknown activation class.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Dict, Optional, Tuple

from torch import nn

# transformers.activations classes by name (not imported: transformers is optional here), each
# checked against its formula: GELUActivation is F.gelu or its erf form; NewGELU, FastGELU and
# GELUTanh are the tanh approximation; QuickGELU is x * sigmoid(1.702 x).
_HF_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
}


def activation_kind(module: nn.Module) -> Optional[str]:
    """The ``mmkernels.linear`` activation ``module`` computes, or None (unknown class, a subclass,
    or a module with hooks that a replacement would drop)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    cls = type(module)
    if cls is nn.ReLU:
        return "relu"
    if cls is nn.SiLU:
        return "silu"
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if cls.__module__ == "transformers.activations":
        return _HF_ACTIVATIONS.get(cls.__name__)
    return None


_PATTERNS: Dict[type, Dict[str, str]] = {}


def _self_attribute(node: ast.AST, self_name: str) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
        return node.attr
    return None


def _called_attribute(node: ast.AST, self_name: str) -> Optional[str]:
    """``name`` when ``node`` is ``self.name(...)``."""
    return _self_attribute(node.func, self_name) if isinstance(node, ast.Call) else None


def _single_arg(call: ast.Call) -> Optional[ast.AST]:
    return call.args[0] if len(call.args) == 1 and not call.keywords else None


def _assigned_name(stmt: ast.AST) -> Optional[str]:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _forward_pattern(cls: type) -> Dict[str, str]:
    """``{fc attribute: activation attribute}`` for the fusable pairs of ``cls.forward``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return {}
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not fn.args.args:
        return {}
    me = fn.args.args[0].arg
    uses: Dict[str, int] = {}
    for node in ast.walk(fn):
        name = _self_attribute(node, me)
        if name is not None:
            uses[name] = uses.get(name, 0) + 1
    pairs = []
    for node in ast.walk(fn):
        act = _called_attribute(node, me)
        arg = _single_arg(node) if act is not None else None
        fc = _called_attribute(arg, me) if arg is not None else None
        if fc is not None:  # nested: self.act(self.fc(...))
            pairs.append((fc, act))
        body = getattr(node, "body", None)
        if isinstance(body, list):  # sequential: h = self.fc(...); h = self.act(h)
            for first, second in zip(body, body[1:]):
                h = _assigned_name(first)
                if h is None or _assigned_name(second) != h:
                    continue
                fc, act = _called_attribute(first.value, me), _called_attribute(second.value, me)
                arg = _single_arg(second.value) if act is not None else None
                if fc is not None and isinstance(arg, ast.Name) and arg.id == h:
                    pairs.append((fc, act))
    return {fc: act for fc, act in pairs if fc != act and uses.get(fc) == 1 and uses.get(act) == 1}


def fusable_activation(parent: nn.Module, fc_name: str) -> Optional[Tuple[str, str]]:
    """``(activation attribute, kind)`` when ``parent``'s forward applies an activation module of
    a known kind straight to ``parent.<fc_name>``'s output and nowhere else; None otherwise."""
    if "forward" in parent.__dict__:
        return None  # an instance-bound forward: the class's source is not what runs
    cls = type(parent)
    if cls not in _PATTERNS:
        _PATTERNS[cls] = _forward_pattern(cls)
    act_name = _PATTERNS[cls].get(fc_name)
    act = parent._modules.get(act_name) if act_name is not None else None
    kind = activation_kind(act) if act is not None else None
    return (act_name, kind) if kind is not None else None
