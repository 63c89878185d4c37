"""Calibration plumbing for :func:`mmkernels.quantize_model`: running calibration data through a
model (or one of its blocks) with hooks that record, per ``nn.Linear``, what its quantizer needs.

* :class:`LayerStats`: the GPTQ Hessian ``2 / n sum x x^T``, the per-input-channel max ``|x|``
  (SmoothQuant's calibration), and up to ``max_rows`` input rows (to measure a candidate's output
  error and the report's output SQNR).
* :func:`collect`: one pass of calibration items through a callable with those hooks.
* :func:`capture_block_inputs` / :func:`run_block`: the inputs of the first block of a
  ``nn.ModuleList`` stack, and the block-by-block propagation GPTQ's layer-sequential procedure
  needs (each block sees the outputs of the already-quantized blocks before it).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .gptq import Hessian


class LayerStats:
    """What the hooks of one Linear record (each part only when asked for)."""

    def __init__(self, in_features: int, hessian: bool, absmax: bool, max_rows: int, cross: bool = False):
        self.in_features = in_features
        self.want_cross = cross
        self.cross: Optional[Tensor] = None  # 2/n sum x_ref x^T (see add)
        self.cross_ok = cross
        self.want_hessian, self.want_absmax = hessian, absmax
        self.hessian: Optional[Hessian] = None
        self.absmax: Optional[Tensor] = None
        self.max_rows = max_rows
        self.rows: List[Tensor] = []
        self.n_rows = 0
        self._stride = 1  # keep every stride-th row (see add)

    def add(self, x: Tensor, ref: Optional[Tensor] = None) -> None:
        """Record input rows ``x (..., K)``; ``ref``: the float original's input to the same layer
        for the same rows (accumulates ``cross = 2/n sum_t ref_t x_t^T``, the term GPTQ's
        float-target variant needs; any call without a matching ``ref`` disables it)."""
        x2 = x.detach().reshape(-1, self.in_features).float()
        if self.want_cross and self.cross_ok:
            r2 = None if ref is None else ref.detach().reshape(-1, self.in_features).float()
            if r2 is None or r2.shape != x2.shape:
                self.cross_ok, self.cross = False, None
            else:
                n, m = self.n_rows, x2.shape[0]
                c = (2.0 / (n + m)) * (r2.T @ x2).to(torch.float64)
                self.cross = c if self.cross is None else self.cross * (n / (n + m)) + c
        if self.want_hessian:
            if self.hessian is None:
                self.hessian = Hessian(self.in_features, device=x2.device)
            self.hessian.add(x2)
        if self.want_absmax:
            amax = x2.abs().amax(dim=0)
            self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        # Rows kept: those whose running index is a multiple of the stride; when more than max_rows
        # are kept, every other one is dropped and the stride doubles, so the sample spans all the calibration data.
        first = (-self.n_rows) % self._stride
        self.rows.append(x2[first :: self._stride].clone())
        self.n_rows += x2.shape[0]
        while sum(r.shape[0] for r in self.rows) > self.max_rows:
            kept = torch.cat(self.rows)
            self.rows = [kept[0::2]]  # rows whose index is a multiple of 2*stride
            self._stride *= 2

    @property
    def samples(self) -> Optional[Tensor]:
        """The recorded input rows ``(M, K)`` (float32), or ``None`` if the layer never ran."""
        return torch.cat(self.rows) if self.rows else None


def token_mask(item: Any) -> Optional[Tensor]:
    """The ``attention_mask`` of a dict item (``(B, L)``), else None."""
    if isinstance(item, dict) and isinstance(item.get("attention_mask"), Tensor) and item["attention_mask"].dim() == 2:
        return item["attention_mask"]
    return None


def call_model(model: Callable, item: Any):
    """``model(item)`` for a tensor, ``model(**item)`` for a dict, ``model(*item)`` for a
    tuple/list."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


@torch.no_grad()
def collect(
    run: Callable[[Any], Any],
    items: Sequence,
    layers: Dict[str, nn.Linear],
    *,
    hessian: bool,
    absmax: bool,
    max_rows: int,
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    reference: Optional[Tuple[Callable, Sequence, Dict[str, nn.Linear]]] = None,
) -> "Collected":
    """Run ``run(item)`` for every item with forward pre-hooks on ``layers`` recording their
    :class:`LayerStats`; hooks are removed even on error. See :class:`Collected`.

    ``masks[i]`` (optional, ``(B, L)``, e.g. an attention mask): while item ``i`` runs, a layer
    input of shape ``(B, L, K)`` contributes only its rows where the mask is non-zero (padding
    positions are not calibration data).

    ``reference = (ref_run, ref_items, ref_layers)``: before each item, ``ref_run(ref_items[i])``
    runs the float original (same layer names) and its layers' inputs are paired row by row with
    the quantized model's, accumulating the cross term of :class:`LayerStats`."""
    stats = {
        name: LayerStats(lin.in_features, hessian, absmax, max_rows, cross=reference is not None)
        for name, lin in layers.items()
    }
    pending: Dict[str, List[Tensor]] = {}
    shares: Dict[str, bool] = {}
    order: List[str] = []
    last: List[Any] = [None]  # the previous call's input, held so that `is` is reliable

    mask: List[Optional[Tensor]] = [None]

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            if name not in order:
                order.append(name)
                shares[name] = x is last[0]
            last[0] = x
            queue = pending.get(name)
            stats[name].add(drop_padding(x, mask[0]), queue.pop(0) if queue else None)

        return hook

    def make_ref_hook(name):
        def hook(module, args):
            pending.setdefault(name, []).append(drop_padding(args[0], mask[0]))

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in layers.items()]
    if reference is not None:
        ref_run, ref_items, ref_layers = reference
        handles += [ref_layers[name].register_forward_pre_hook(make_ref_hook(name)) for name in layers]
    try:
        for i, item in enumerate(items):
            mask[0] = masks[i] if masks is not None else None
            if reference is not None:
                pending.clear()
                ref_run(ref_items[i])
            run(item)
    finally:
        for h in handles:
            h.remove()
        last[0] = mask[0] = None
        pending.clear()
    return Collected(
        {name: stats[name] for name in order}, _stages(order, shares), [n for n in stats if n not in order]
    )


def drop_padding(x: Tensor, m: Optional[Tensor]) -> Tensor:
    """The rows of ``x (B, L, C)`` where the mask ``m (B, L)`` is non-zero, as ``(n, C)``; ``x``
    itself when there is no mask or the shapes do not pair up."""
    if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
        return x[m.to(device=x.device, dtype=torch.bool)]
    return x


class Collected(NamedTuple):
    """``stats`` of the layers that ran, in execution order (first call); ``stages``: those layers
    grouped into runs of consecutive calls on the *same* input tensor (e.g. q, k, v), in order;
    ``unused``: the layers that never ran."""

    stats: Dict[str, LayerStats]
    stages: List[List[str]]
    unused: List[str]


def _stages(order: List[str], shares: Dict[str, bool]) -> List[List[str]]:
    stages: List[List[str]] = []
    for name in order:
        if stages and shares.get(name):
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, items: Iterable) -> List[Tuple[tuple, dict]]:
    """The ``(args, kwargs)`` the first block receives for each calibration item (the model is run
    up to that block and stopped there)."""
    captured: List[Tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for item in items:
            try:
                call_model(model, item)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: List[Tuple[tuple, dict]]) -> List[Tuple[tuple, dict]]:
    """Run ``block`` on each captured input; the next block's input replaces the first argument
    by this block's output (its first element if it returns a tuple), the rest unchanged."""
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = block(*args, **kwargs)
            if isinstance(y, (tuple, list)):
                y = y[0]
            out.append(((y,) + tuple(args[1:]), kwargs))
    return out


def block_runner(block: nn.Module) -> Callable:
    def run(inp):
        args, kwargs = inp
        return block(*args, **kwargs)

    return run
