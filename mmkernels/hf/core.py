"""Patching a model instance, its undo record and its report.

Nothing here touches a class or a module global: the attention implementation is selected on the
model's own config objects (``config._attn_implementation_internal``), the attention modules are
recorded in :data:`hf_attention.STATES`, quantized layers replace the instance's submodules, and
the undo record keeps every original value so that :func:`unpatch` restores the model exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .._describe import dtype_name
from . import hf_attention
from .specs import PatchSettings, parse_settings


@dataclass
class Row:
    """One module in the report."""

    path: str
    kind: str  # "attention" | "linear"
    action: str  # "mmkernels" | "quantized" | "left"
    detail: str = ""


@dataclass
class PatchReport:
    """What :func:`mmkernels.patch` did: one row per attention module and per Linear it looked at.
    ``str(report)`` is the table; :meth:`runtime` adds, per attention module, how many calls our
    kernels served and why any call went to SDPA instead."""

    model_type: str
    settings: PatchSettings
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    quantization: Any = None
    fastv: Any = None  # mmkernels.hf.fastv._Run when reduce is fastv

    def patched(self, kind: Optional[str] = None) -> List[Row]:
        """The rows of modules served by mmkernels (of one ``kind`` when given)."""
        return [r for r in self.rows if r.action != "left" and kind in (None, r.kind)]

    def left(self, kind: Optional[str] = None) -> List[Row]:
        """The rows of modules left alone, each with its reason (of one ``kind`` when given)."""
        return [r for r in self.rows if r.action == "left" and kind in (None, r.kind)]

    def runtime(self) -> Dict[str, Tuple[int, Dict[str, int]]]:
        """``{module path: (calls served by mmkernels, {reason: calls served by SDPA})}``."""
        out = {}
        for path, module in self._attention_modules.items():
            state = hf_attention.STATES.get(module)
            if state is not None:
                out[path] = (state.served, dict(state.fallbacks))
        return out

    def fastv_runtime(self) -> Optional[Tuple[int, Dict[str, int]]]:
        """``(prefills pruned by fastv, {reason: prefills left unpruned})``; None without fastv."""
        if self.fastv is None:
            return None
        return self.fastv.pruned, dict(self.fastv.unpruned)

    def __post_init__(self):
        self._attention_modules: Dict[str, nn.Module] = {}

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.rows] + [6])
        lines = [
            f"mmkernels.patch({self.model_type}): {self.settings}",
            f"{'module':<{width}}  {'kind':<9}  {'action':<9}  detail",
        ]
        for r in self.rows:
            lines.append(f"{r.path:<{width}}  {r.kind:<9}  {r.action:<9}  {r.detail}")
        counts = {k: (len(self.patched(k)), len(self.left(k))) for k in ("attention", "linear")}
        lines.append(
            "summary: "
            + "; ".join(f"{k}: {p} patched, {n_left} left" for k, (p, n_left) in counts.items() if p or n_left)
        )
        fused = sum(" fused (" in r.detail for r in self.rows)
        if fused:
            lines.append(f"activations fused into their layer: {fused} (fuse_activations=False keeps them apart)")
        fallbacks: Dict[str, int] = {}
        for _, (_, reasons) in self.runtime().items():
            for reason, n in reasons.items():
                fallbacks[reason] = fallbacks.get(reason, 0) + n
        if fallbacks:
            lines.append(
                "calls served by SDPA instead: "
                + "; ".join(f"{reason} ({n})" for reason, n in sorted(fallbacks.items()))
            )
        if self.fastv is not None and self.fastv.unpruned:
            lines.append(
                "prefills fastv left unpruned: "
                + "; ".join(f"{reason} ({n})" for reason, n in sorted(self.fastv.unpruned.items()))
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _Undo:
    """Everything :func:`unpatch` needs to put back."""

    report: PatchReport
    configs: List[Tuple[Any, Any]] = field(default_factory=list)  # (config, old internal impl)
    modules: List[Tuple[str, nn.Module]] = field(default_factory=list)  # (path, original module)
    bound: List[Tuple[nn.Module, str]] = field(default_factory=list)  # instance-bound methods
    attention: List[nn.Module] = field(default_factory=list)  # recorded in STATES


_RECORDS: "weakref.WeakKeyDictionary[nn.Module, _Undo]" = weakref.WeakKeyDictionary()
_ROUTES_CACHE: Dict[type, bool] = {}


def routes_through_interface(module: nn.Module) -> bool:
    """Whether the module's forward calls transformers' attention interface (read from its source,
    once per class): the structural test for "an attention module we can serve"."""
    cls = type(module)
    if cls not in _ROUTES_CACHE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _ROUTES_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _ROUTES_CACHE[cls]


def _looks_like_attention(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    return cls.endswith("Attention") or cls.endswith("SelfAttention") or cls.endswith("Attn")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by :func:`patch`."""
    return model in _RECORDS


def patch(
    model: nn.Module,
    attention: bool = True,
    reduce: Optional[dict] = None,
    quantize: Optional[dict] = None,
    calib_data: Optional[Iterable] = None,
    backend: Optional[str] = None,
    linear: bool = False,
    fuse_activations: bool = True,
) -> PatchReport:
    """Accelerate a Hugging Face transformers model **instance** with mmkernels.

    * ``attention``: every attention module that calls transformers' attention interface runs
      :func:`mmkernels.attention` (padding as a per-key ``key_bias``, causal as ``causal=True``,
      GQA, cross-attention and KV-cache decoding); calls our kernels cannot express (full 4-D
      masks, ``output_attentions``, dropout in training, soft-capping, ...) go to SDPA, counted in
      :meth:`PatchReport.runtime`.
    * ``quantize``: keyword arguments of :func:`mmkernels.quantize_model` (for example
      ``{"bits": 8, "act_bits": 8}``); ``calib_data`` is passed on. ``lm_head`` is excluded unless
      ``quantize`` names it in ``include``; vision towers only with ``"vision": True``.
    * ``reduce``: token reduction for vision towers (see :mod:`mmkernels.hf.specs`).
    * ``backend``: force an mmkernels attention backend (None: automatic selection).
    * ``linear``: every float32 CPU ``nn.Linear`` that ``quantize`` did not take (``lm_head``
      included) becomes :class:`mmkernels.nn.Linear`, sharing its Parameters: the same float32
      product through :func:`mmkernels.linear`, where auto-selection takes our GEMM for the layer's
      size on this CPU (measured class rule, else calibration); other layers are left, with why.
      Where the parent module applies its activation (GELU, tanh-GELU, QuickGELU, SiLU, ReLU)
      straight to such a layer's output (an MLP's ``fc1``, Llama's ``gate_proj``), the activation
      runs in the GEMM's epilogue and the activation module becomes ``nn.Identity``
      (:mod:`mmkernels.hf.fusion` says when; the report's row says so).
    * ``fuse_activations``: that fusion, for ``linear=True``'s layers and for ``quantize``'s
      ``QuantLinear`` layers alike (``False``: every activation module stays and runs torch's
      function, as unpatched).

    Returns a :class:`PatchReport`. Patching twice with the same settings returns the first
    report; with different settings raises ``ValueError`` (call :func:`unpatch` first). Raises
    ``ValueError`` when nothing in the model could be patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    settings = parse_settings(attention, reduce, quantize, backend, linear, fuse_activations)
    if model in _RECORDS:
        record = _RECORDS[model]
        if record.report.settings == settings:
            return record.report
        raise ValueError(
            f"model is already patched with {record.report.settings}; call "
            f"mmkernels.unpatch(model) before patching with {settings}"
        )
    report = PatchReport(_model_type(model), settings)
    record = _Undo(report)
    try:
        if settings.attention:
            _patch_attention(model, settings, record)
        if settings.reduce is not None:
            from .reduction import apply_reduction

            apply_reduction(model, settings.reduce, record)
        if settings.quantize is not None:
            _patch_linears(model, dict(settings.quantize), calib_data, backend, record)
            if settings.fuse_activations:
                _fuse_quantized(model, record)
        if settings.linear:
            _patch_dense_linears(model, record, settings.fuse_activations)
        if not report.patched():
            raise ValueError(
                f"mmkernels.patch found nothing to patch in {type(model).__name__} "
                f"(model_type {report.model_type!r}): "
                + (
                    "; ".join(f"{r.path}: {r.detail}" for r in report.left())
                    or "no attention module calls transformers' attention interface and no Linear was selected"
                )
            )
    except BaseException:
        _undo(model, record)
        raise
    _RECORDS[model] = record
    return report


def unpatch(model: nn.Module) -> None:
    """Restore a patched model exactly (state dict, module objects, configs, forwards).
    Raises ``ValueError`` for a model that is not patched."""
    record = _RECORDS.pop(model, None)
    if record is None:
        raise ValueError(f"{type(model).__name__} is not patched by mmkernels")
    _undo(model, record)


@contextlib.contextmanager
def patched(model: nn.Module, **kwargs: Any) -> Iterator[PatchReport]:
    """``with mmkernels.patched(model, ...) as report:`` patch for the block, then unpatch."""
    report = patch(model, **kwargs)
    try:
        yield report
    finally:
        unpatch(model)


def _undo(model: nn.Module, record: _Undo) -> None:
    from .. import _packed_cache
    from ..nn.linear import Linear

    for path, original in reversed(record.modules):
        replaced = model.get_submodule(path)
        model.set_submodule(path, original)
        if isinstance(replaced, Linear) and replaced is not original:  # linear=True's layer
            _packed_cache.forget(original.weight)  # the restored layer runs torch's GEMM
    for module, name in reversed(record.bound):
        module.__dict__.pop(name, None)
    for module in record.attention:
        hf_attention.STATES.pop(module, None)
    for config, old in reversed(record.configs):
        config._attn_implementation_internal = old


def bind_method(module: nn.Module, name: str, fn: Callable, record: _Undo) -> None:
    """Give one module instance its own method ``name`` (undone by :func:`unpatch`)."""
    if name in module.__dict__:
        raise ValueError(f"{type(module).__name__}.{name} is already overridden on this instance")
    setattr(module, name, fn.__get__(module, type(module)))
    record.bound.append((module, name))


def bind_forward(module: nn.Module, forward: Callable, record: _Undo) -> None:
    """Give one module instance its own forward (undone by :func:`unpatch`)."""
    bind_method(module, "forward", forward, record)


def _patch_attention(model: nn.Module, settings: PatchSettings, record: _Undo) -> None:
    hf_attention.register()
    report = record.report
    configs: Dict[int, Any] = {}
    routed_prefixes: List[str] = []
    for name, module in model.named_modules():
        if routes_through_interface(module) and hasattr(module, "config"):
            routed_prefixes.append(name)
            state = hf_attention.ModuleState(backend=settings.backend)
            hf_attention.STATES[module] = state
            record.attention.append(module)
            report._attention_modules[name] = module
            configs.setdefault(id(module.config), module.config)
            report.rows.append(Row(name, "attention", "mmkernels", "transformers attention interface"))
    for name, module in model.named_modules():
        if name in routed_prefixes or not _looks_like_attention(name, module):
            continue
        inside = any(p.startswith(name + ".") or name.startswith(p + ".") for p in routed_prefixes)
        if not inside:
            report.rows.append(Row(name, "attention", "left", "does not call transformers' attention interface"))
    if not configs:
        return
    # The models' own configs select the implementation (mask creation reads the model's config,
    # attention reads the module's: usually the same object).
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            config is not None
            and hasattr(config, "_attn_implementation_internal")
            and hasattr(module, "_can_set_attn_implementation")
        ):
            configs.setdefault(id(config), config)
    for config in configs.values():
        record.configs.append((config, config._attn_implementation_internal))
        config._attn_implementation_internal = hf_attention.NAME
    from .families import apply_family

    apply_family(model, settings, record)


def _patch_linears(model: nn.Module, options: dict, calib_data, backend, record: _Undo) -> None:
    from ..compress import quantize_model

    before = dict(model.named_modules())
    options = dict(options)
    if not options.get("include"):
        exclude = options.get("exclude") or []
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        options["exclude"] = exclude + ["lm_head", "*.lm_head"]
    options.setdefault("progress", False)
    if backend is not None:
        options.setdefault("backend", backend)
    try:
        qreport = quantize_model(model, calib_data=calib_data, **options)
    finally:
        after = dict(model.named_modules())
        record.modules.extend(
            (name, module)
            for name, module in before.items()
            if isinstance(module, nn.Linear) and after.get(name) is not module
        )
    record.report.quantization = qreport
    status = {r.name: r for r in qreport.layers}
    for name, module in before.items():
        if not isinstance(module, nn.Linear):
            continue
        if after.get(name) is not module:
            row = status.get(name)
            record.report.rows.append(Row(name, "linear", "quantized", row.config if row is not None else ""))
        else:
            row = status.get(name)
            why = row.status if row is not None else "excluded by include/exclude"
            record.report.rows.append(Row(name, "linear", "left", why))


def _dense_refusal(module: nn.Linear) -> str:
    """Why ``patch(linear=True)`` leaves an ``nn.Linear`` alone ("" when it takes it)."""
    if type(module) is not nn.Linear:
        return f"a subclass of nn.Linear ({type(module).__name__}) keeps its own forward"
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    if any(hooks) or hasattr(module, "_hf_hook"):
        return "has hooks (e.g. accelerate's device_map offloading) that a new module would drop"
    w = module.weight
    if w.dtype != torch.float32:
        return f"{dtype_name(w.dtype)} weight: torch's GEMM serves it (our CPU kernel is float32)"
    if w.device.type != "cpu":
        return f"weight on {w.device.type}: torch's GEMM serves it (our kernel is for CPUs)"
    return ""


# Rows of x assumed when patch(linear=True) asks which backend serves a layer (a size class with
# the GEMM regime; each call is still dispatched by its own size).
DENSE_PROBE_ROWS = 256


def _take_activation(model: nn.Module, name: str, record: _Undo, foreign: FrozenSet[str]) -> Optional[Tuple[str, str]]:
    """When the parent of the layer at ``name`` applies an activation straight to its output
    (hf/fusion.py; ``foreign``: its ``foreign_calls(model)``): that activation module becomes
    ``nn.Identity`` (undone by unpatch) and the result is ``(kind, report detail)``; None where
    nothing can be fused."""
    from .fusion import fusable_activation

    parent_path, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_path)
    found = fusable_activation(parent, attr, foreign)
    if found is None:
        return None
    act_attr, kind = found
    act_path = f"{parent_path}.{act_attr}" if parent_path else act_attr
    record.modules.append((act_path, parent._modules[act_attr]))
    model.set_submodule(act_path, nn.Identity())
    return kind, f"{kind} fused ({act_path} -> Identity)"


def _fuse_activation(
    model: nn.Module, name: str, module: nn.Linear, record: _Undo, fused: dict, foreign: FrozenSet[str]
):
    """The fused replacement of the Linear at ``name`` (a new mmkernels.nn.Linear with the
    parent's activation) and its report detail, or None where nothing is fused."""
    from ..nn.linear import Linear

    parent_path, _, attr = name.rpartition(".")
    key = (id(model.get_submodule(parent_path)), attr)
    if key not in fused:  # a parent reachable by two paths is fused once
        taken = _take_activation(model, name, record, foreign)
        if taken is None:
            return None
        kind, detail = taken
        fused[key] = (Linear.from_linear(module, activation=kind), detail)
    return fused[key]


def _fuse_quantized(model: nn.Module, record: _Undo) -> None:
    """``quantize``'s QuantLinear layers take their parent's activation (hf/fusion.py) where the
    layer is registered once, under one name of one parent (a layer registered twice would apply
    the activation at its other call site too)."""
    from ..nn.quant_linear import QuantLinear
    from .fusion import foreign_calls

    foreign = foreign_calls(model)
    registrations: Dict[int, set] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                registrations.setdefault(id(child), set()).add((id(parent), attr))
    done: Dict[int, str] = {}
    for row in record.report.rows:
        if row.kind != "linear" or row.action != "quantized":
            continue
        layer = model.get_submodule(row.path)
        if type(layer) is not QuantLinear or len(registrations.get(id(layer), ())) != 1:
            continue
        if id(layer) not in done:  # one parent reachable by two paths: fused once
            taken = _take_activation(model, row.path, record, foreign)
            if taken is None:
                continue
            layer.activation, done[id(layer)] = taken
        row.detail = f"{row.detail} + {done[id(layer)]}" if row.detail else done[id(layer)]


def _patch_dense_linears(model: nn.Module, record: _Undo, fuse: bool = True) -> None:
    """``linear=True``: plain float32 CPU nn.Linear modules become mmkernels.nn.Linear, where
    auto-selection takes our kernel at their size on this CPU (elsewhere torch's GEMM would serve
    every call anyway, and the new module would only add its overhead); an activation that the
    parent applies straight to the layer's output is fused into it (hf/fusion.py)."""
    from ..linear.api import auto_backend
    from ..nn.linear import Linear
    from .fusion import foreign_calls

    rows = {r.path: r for r in record.report.rows if r.kind == "linear"}
    choices, replacements, fused = {}, {}, {}
    foreign = foreign_calls(model) if fuse else frozenset()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear) or isinstance(module, Linear):
            continue
        row = rows.get(name)
        if row is not None and row.action != "left":
            continue  # quantized
        why = _dense_refusal(module)
        if not why:
            shape = (module.in_features, module.out_features)
            if shape not in choices:
                choices[shape] = auto_backend(*shape, m=DENSE_PROBE_ROWS)
            backend, verdict = choices[shape]
            if backend != "cpu":
                why = f"{backend} serves float32 GEMMs of this size here: {verdict}"
        if why:
            if row is None:
                record.report.rows.append(Row(name, "linear", "left", why))
            else:
                row.detail = f"{row.detail}; linear=True: {why}" if row.detail else why
            continue
        fusion = _fuse_activation(model, name, module, record, fused, foreign) if fuse else None
        if fusion is not None:
            replacement, fused_detail = fusion
        else:
            if id(module) not in replacements:  # one layer reachable by two paths: one replacement
                replacements[id(module)] = Linear.from_linear(module)
            replacement, fused_detail = replacements[id(module)], ""
        model.set_submodule(name, replacement)
        record.modules.append((name, module))
        detail = "float32 GEMM (mmkernels.linear)" + (f" + {fused_detail}" if fused_detail else "")
        detail += f"; not quantized: {row.detail}" if row is not None else ""
        if row is None:
            record.report.rows.append(Row(name, "linear", "mmkernels", detail))
        else:
            row.action, row.detail = "mmkernels", detail
