"""Which activation a module applies straight to the output of one of its Linear layers: what
``mmkernels.patch(model, linear=True)`` fuses into that layer's epilogue (the ``activation`` of
:func:`mmkernels.linear`), replacing the activation module with ``nn.Identity``.

A fusion is taken only where the parent module's forward (its class's source, read once per class)
applies ``self.<act>`` to ``self.<fc>``'s output and to nothing else, in one of two shapes:

* nested:      ``... self.act(self.fc(expr)) ...``              (Llama's MLP, Whisper's layers)
* sequential:  ``h = self.fc(expr)`` then at once ``h = self.act(h)``
  (DINOv2, CLIP, SigLIP, ViT MLPs, BERT's intermediate layer)

with ``self.fc`` and ``self.act`` each read exactly once in that forward and in no other method of
the class or its bases (``__init__`` aside), a forward that calls no ``super()`` and no method of
its own (only submodules), no forward of the instance's own, no method of any module class in the
model calling ``<something>.fc(...)`` or ``<something>.act(...)`` on another object, and an
activation module of a kind the kernel computes (:func:`activation_kind`). Anything else stays
unfused: a forward that reuses the activation or the pre-activation, a helper method, a wrapped or
decorated forward whose source does not show the call, an unknown activation class.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

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


class _ClassFacts(NamedTuple):
    pairs: Dict[str, str]  # {fc attribute: activation attribute} fusable in forward
    forward_calls: FrozenSet[str]  # self.<name>(...) called in forward
    calls_super: bool  # forward calls super()
    reads: Dict[str, int]  # self.<name> reads over every method but __init__ (MRO below nn.Module)
    foreign_calls: FrozenSet[str]  # <not self>.<name>(...) called in any method


_FACTS: Dict[Tuple[type, object], Optional[_ClassFacts]] = {}


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


def _parse(fn) -> Optional[ast.FunctionDef]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.args.args:
        return None
    return node


def _methods(cls: type):
    """``(name, function)`` of every method of ``cls`` defined below nn.Module (the one its
    instances run: a method overridden in a subclass is not its base's)."""
    seen = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            fn = getattr(value, "__func__", value)
            if inspect.isfunction(fn) and name not in seen:
                seen.add(name)
                yield name, fn


def _pairs(fn: ast.FunctionDef, me: str) -> List[Tuple[str, str]]:
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
    return pairs


def _class_facts(cls: type) -> Optional[_ClassFacts]:
    """What fusion needs to know of ``cls``'s methods (read once per class and forward); None when
    its forward's source cannot be read."""
    key = (cls, cls.forward)
    if key in _FACTS:
        return _FACTS[key]
    forward = _parse(cls.forward)
    facts = None
    if forward is not None:
        me = forward.args.args[0].arg
        reads: Dict[str, int] = {}
        foreign: set = set()
        for name, fn in _methods(cls):
            tree = forward if fn is cls.forward else _parse(fn)
            if tree is None:
                continue
            self_name = tree.args.args[0].arg
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    if _self_attribute(node.func, self_name) is None:
                        foreign.add(node.func.attr)
                attr = _self_attribute(node, self_name)
                if attr is not None and isinstance(node.ctx, ast.Load) and name != "__init__":
                    reads[attr] = reads.get(attr, 0) + 1
        calls = frozenset(a for n in ast.walk(forward) if (a := _called_attribute(n, me)) is not None)
        calls_super = any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "super" for n in ast.walk(forward)
        )
        facts = _ClassFacts(dict(_pairs(forward, me)), calls, calls_super, reads, frozenset(foreign))
    _FACTS[key] = facts
    return facts


def foreign_calls(model: nn.Module) -> FrozenSet[str]:
    """Names called as ``<not self>.<name>(...)`` in any method of any module class of ``model``
    (once per patch: :func:`fusable_activation` refuses a layer or activation called by such a name)."""
    names: set = set()
    for cls in {type(m) for m in model.modules()}:
        facts = _class_facts(cls)
        if facts is not None:
            names |= facts.foreign_calls
    return frozenset(names)


def fusable_activation(
    parent: nn.Module, fc_name: str, foreign: FrozenSet[str] = frozenset()
) -> Optional[Tuple[str, str]]:
    """``(activation attribute, kind)`` when ``parent``'s forward applies an activation module of
    a known kind straight to ``parent.<fc_name>``'s output and nowhere else (module docstring;
    ``foreign``: :func:`foreign_calls` of the whole model, whose module classes must not call
    either attribute of another object); None otherwise."""
    if "forward" in parent.__dict__:
        return None  # an instance-bound forward: the class's source is not what runs
    facts = _class_facts(type(parent))
    if facts is None or facts.calls_super:
        return None
    act_name = facts.pairs.get(fc_name)
    if act_name is None or act_name == fc_name:
        return None
    if facts.reads.get(fc_name) != 1 or facts.reads.get(act_name) != 1:
        return None
    if any(name not in parent._modules for name in facts.forward_calls):
        return None  # a method of its own (or a non-module callable) could use either attribute
    if {fc_name, act_name} & foreign:
        return None
    act = parent._modules.get(act_name)
    kind = activation_kind(act) if act is not None else None
    return (act_name, kind) if kind is not None else None
