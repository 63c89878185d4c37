"""Token-reduction primitives: argument checks, custom ops, dispatch.

```
plan = mmkernels.tome_plan(metric, r, protect_first=1)
x_out, size_out = mmkernels.tome_merge(x, plan, size=None)
x_back = mmkernels.tome_unmerge(x_out, plan)
idx = mmkernels.select_tokens(scores, k, protect_first=1)
x_sel = mmkernels.gather_tokens(x, idx)
```
Definitions are in reference.py. Each primitive is a ``torch.library`` custom op with a fake
implementation (a plan is a named tuple of index tensors whose shapes depend only on ``N`` and
``r``), so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._describe import describe as _describe
from .._describe import dtype_name
from .._eager import plain_eager
from . import reference


class TomePlan(NamedTuple):
    """Index tensors describing one ToMe merge step (int64); see mmkernels/reduce/reference.py."""

    src_to_out: Tensor  # (B, N)      output slot of each input token
    keep_idx: Tensor  # (B, N - r)  input position of each output slot, ascending
    src_idx: Tensor  # (B, r)      merged (A) positions, ascending
    dst_idx: Tensor  # (B, r)      their destinations (B positions)

    @property
    def num_tokens(self) -> int:
        return self.src_to_out.shape[1]

    @property
    def num_out(self) -> int:
        return self.keep_idx.shape[1]


class ReduceCall(NamedTuple):
    op: str
    device_type: str
    dtype_name: str

    def __str__(self):
        return f"{self.op}({self.dtype_name} on {self.device_type})"


def _check_int(name, value, low, high=None, what=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} must be {bound}{what}")


def _check_tokens(name, t, rank=3, floating=True):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        layout = "(B, N, C)" if rank == 3 else "(B, N)"
        raise ValueError(f"{name} must be {rank}-D {layout}, got {_describe(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def mergeable_a_tokens(n: int, protect_first: int) -> int:
    """Number of A (even-position, unprotected) tokens that may be merged, given an odd partner exists."""
    a = len(range(protect_first + (protect_first % 2), n, 2))
    b = len(range(protect_first + 1 - (protect_first % 2), n, 2))
    return a if b > 0 else 0


def _values_checkable(t: Tensor) -> bool:
    """Whether ``t``'s values can be read on the host now: not while tracing (fake tensors) nor
    during CUDA-graph capture."""
    if torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _select(op: str, t: Tensor, backend: Optional[str]):
    call = ReduceCall(op, t.device.type, dtype_name(t.dtype))
    return _dispatch.select(op, call, t.device.type, backend or None)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _tome_plan_impl(metric: Tensor, r: int, protect_first: int, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.contiguous() for t in _select("tome_plan", metric, backend).run(metric, r, protect_first))


@torch.library.custom_op("mmkernels::tome_plan", mutates_args=())
def _tome_plan_op(metric: Tensor, r: int, protect_first: int, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _tome_plan_impl(metric, r, protect_first, backend)


@_tome_plan_op.register_fake
def _(metric, r, protect_first, backend):
    b, n, _ = metric.shape
    idx = dict(dtype=torch.int64)
    return (
        metric.new_empty((b, n), **idx),
        metric.new_empty((b, n - r), **idx),
        metric.new_empty((b, r), **idx),
        metric.new_empty((b, r), **idx),
    )


def _tome_merge_impl(x: Tensor, src_to_out: Tensor, n_out: int, size: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _select("tome_merge", x, backend).run(x, src_to_out, n_out, size)


@torch.library.custom_op("mmkernels::tome_merge", mutates_args=())
def _tome_merge_op(x: Tensor, src_to_out: Tensor, n_out: int, size: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _tome_merge_impl(x, src_to_out, n_out, size, backend)


@_tome_merge_op.register_fake
def _(x, src_to_out, n_out, size, backend):
    return x.new_empty((x.shape[0], n_out, x.shape[2])), size.new_empty((x.shape[0], n_out))


def _tome_unmerge_impl(x_out: Tensor, src_to_out: Tensor, backend: str) -> Tensor:
    return _select("tome_unmerge", x_out, backend).run(x_out, src_to_out).contiguous()


@torch.library.custom_op("mmkernels::tome_unmerge", mutates_args=())
def _tome_unmerge_op(x_out: Tensor, src_to_out: Tensor, backend: str) -> Tensor:
    return _tome_unmerge_impl(x_out, src_to_out, backend)


@_tome_unmerge_op.register_fake
def _(x_out, src_to_out, backend):
    return x_out.new_empty((x_out.shape[0], src_to_out.shape[1], x_out.shape[2]))


def _select_tokens_impl(scores: Tensor, k: int, protect_first: int, backend: str) -> Tensor:
    return _select("select_tokens", scores, backend).run(scores, k, protect_first).contiguous()


@torch.library.custom_op("mmkernels::select_tokens", mutates_args=())
def _select_tokens_op(scores: Tensor, k: int, protect_first: int, backend: str) -> Tensor:
    return _select_tokens_impl(scores, k, protect_first, backend)


@_select_tokens_op.register_fake
def _(scores, k, protect_first, backend):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


def _gather_tokens_impl(x: Tensor, idx: Tensor, backend: str) -> Tensor:
    return _select("gather_tokens", x, backend).run(x, idx).contiguous()


@torch.library.custom_op("mmkernels::gather_tokens", mutates_args=())
def _gather_tokens_op(x: Tensor, idx: Tensor, backend: str) -> Tensor:
    return _gather_tokens_impl(x, idx, backend)


@_gather_tokens_op.register_fake
def _(x, idx, backend):
    return x.new_empty((*idx.shape, x.shape[-1]))


def _gather_backward(ctx, grad):
    b, n = ctx.n_batch, ctx.n_tokens
    idx = ctx.saved_tensors[0]
    out = grad.new_zeros((b, n, grad.shape[-1]))
    out.scatter_add_(1, idx[..., None].expand(*idx.shape, grad.shape[-1]), grad)
    return out, None, None


def _gather_setup(ctx, inputs, output):
    x, idx, _ = inputs
    ctx.save_for_backward(idx)
    ctx.n_batch, ctx.n_tokens = x.shape[0], x.shape[1]


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def _packed_rows(idx: Tensor, cu_seqlens: Tensor, batch: int, n: int) -> Tensor:
    """Row of ``x.reshape(B * N, C)`` for each packed index: token ``t`` belongs to sequence
    ``s`` with ``cu_seqlens[s] <= t < cu_seqlens[s + 1]`` (found without a host sync). The sequence
    is clamped to ``[0, B)``, so a malformed cu_seqlens that was not checked (GPU tensors under
    torch.compile) picks wrong rows of ``x`` but never rows outside it."""
    pos = torch.arange(idx.shape[0], device=idx.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)
    return seq.clamp_(max=max(batch - 1, 0)) * n + idx.long()


def _check_cu_seqlens_values(cu_seqlens: Tensor, total: int) -> None:
    """Host-side value checks of a packed ``cu_seqlens``: starts at 0, non-decreasing, last value
    ``total`` (the number of packed indices)."""
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]} (cu_seqlens {values[:8]})")
    if any(b < a for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values[:16]}")
    if values[-1] != total:
        raise ValueError(f"cu_seqlens[-1] must equal len(idx) = {total}, got {values[-1]}")


def _gather_packed_impl(x: Tensor, idx: Tensor, cu_seqlens: Tensor, check: bool) -> Tensor:
    if check and x.device.type == "cpu":
        # The op's execution-time checks: under torch.compile the public function cannot read
        # cu_seqlens / idx (fake tensors), so a compiled graph is checked here. CPU only: on a
        # GPU this would be a device sync per call; there _packed_rows clamps the sequence and
        # indexing bounds-checks idx.
        _check_cu_seqlens_values(cu_seqlens, idx.shape[0])
        _check_index_range(idx, x.shape[1])
    flat = _packed_rows(idx, cu_seqlens, x.shape[0], x.shape[1])
    return x.reshape(-1, x.shape[-1])[flat]


@torch.library.custom_op("mmkernels::gather_tokens_packed", mutates_args=())
def _gather_packed_op(x: Tensor, idx: Tensor, cu_seqlens: Tensor) -> Tensor:
    return _gather_packed_impl(x, idx, cu_seqlens, check=True)


@_gather_packed_op.register_fake
def _(x, idx, cu_seqlens):
    return x.new_empty((idx.shape[0], x.shape[-1]))


def _gather_packed_backward(ctx, grad):
    idx, cu_seqlens = ctx.saved_tensors
    b, n = ctx.n_batch, ctx.n_tokens
    flat = _packed_rows(idx, cu_seqlens, b, n)
    out = grad.new_zeros((b * n, grad.shape[-1]))
    out.index_add_(0, flat, grad)
    return out.view(b, n, grad.shape[-1]), None, None


def _gather_packed_setup(ctx, inputs, output):
    x, idx, cu_seqlens = inputs
    ctx.save_for_backward(idx, cu_seqlens)
    ctx.n_batch, ctx.n_tokens = x.shape[0], x.shape[1]


_gather_packed_op.register_autograd(_gather_packed_backward, setup_context=_gather_packed_setup)


def _unmerge_backward(ctx, grad):
    (src_to_out,) = ctx.saved_tensors
    b, n = src_to_out.shape
    out = grad.new_zeros((b, ctx.n_out, grad.shape[-1]))
    out.scatter_add_(1, src_to_out[..., None].expand(b, n, grad.shape[-1]), grad)
    return out, None, None


def _unmerge_setup(ctx, inputs, output):
    x_out, src_to_out, _ = inputs
    ctx.save_for_backward(src_to_out)
    ctx.n_out = x_out.shape[1]


_tome_unmerge_op.register_autograd(_unmerge_backward, setup_context=_unmerge_setup)


def _merge_backward(ctx, grad_x, grad_size):
    src_to_out, size, size_out = ctx.saved_tensors[:3]
    b, n = src_to_out.shape
    # x_out[s] = sum_{i -> s} size_i x_i / size_out[s],  size_out[s] = sum_{i -> s} size_i:
    #   dx_i    = size_i / size_out[s(i)] * gx[s(i)]
    #   dsize_i = <gx[s(i)], x_i - x_out[s(i)]> / size_out[s(i)] + gsize[s(i)]
    so = size_out.gather(1, src_to_out)
    dx = dsize = None
    if grad_x is not None:
        gx = grad_x.gather(1, src_to_out[..., None].expand(b, n, grad_x.shape[-1]))
        if ctx.needs_input_grad[0]:
            dx = gx * (size / so).to(grad_x.dtype)[..., None]
    if ctx.needs_input_grad[3]:
        x, x_out = ctx.saved_tensors[3:]
        compute = torch.float64 if torch.float64 in (x.dtype, size.dtype) else torch.float32
        dsize = torch.zeros((b, n), dtype=compute, device=size.device)
        if grad_x is not None:
            xo = x_out.gather(1, src_to_out[..., None].expand(b, n, x_out.shape[-1]))
            dsize += ((x.to(compute) - xo.to(compute)) * gx.to(compute)).sum(-1) / so.to(compute)
        if grad_size is not None:
            dsize += grad_size.gather(1, src_to_out).to(compute)
        dsize = dsize.to(size.dtype)
    return dx, None, None, dsize, None


def _merge_setup(ctx, inputs, output):
    x, src_to_out, _n, size, _b = inputs
    extra = (x, output[0]) if size.requires_grad else ()
    ctx.save_for_backward(src_to_out, size, output[1], *extra)


_tome_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def tome_plan(metric: Tensor, r: int, *, protect_first: int = 1, backend: Optional[str] = None) -> TomePlan:
    """ToMe bipartite soft matching: which ``r`` tokens merge into which (see reference.py).

    ``metric (B, N, C)``: per-token features compared by cosine similarity (ToMe uses the keys
    averaged over heads). ``r`` may be 0 and at most the number of mergeable A tokens.

    NaN / inf (every backend, docs/nan_semantics.md): a token whose metric row holds a NaN or
    ``±inf`` has NaN similarities, and a NaN similarity counts as ``-inf``: such a B token is
    nobody's best match while a finite similarity exists; such an A token matches the first B
    token with score ``-inf`` and is chosen last (ties to the lower position).
    """
    _check_tokens("metric", metric)
    _check_int("protect_first", protect_first, 0, metric.shape[1])
    limit = mergeable_a_tokens(metric.shape[1], protect_first)
    _check_int("r", r, 0, limit, f" (N={metric.shape[1]}, protect_first={protect_first}: {limit} tokens can merge)")
    if plain_eager(metric):
        return TomePlan(*_tome_plan_impl(metric, r, protect_first, backend or ""))
    return TomePlan(*_tome_plan_op(metric, r, protect_first, backend or ""))


def _check_plan(plan, name="plan"):
    if not isinstance(plan, TomePlan):
        raise TypeError(f"{name} must be a TomePlan from mmkernels.tome_plan, got {type(plan).__name__}")


def tome_merge(
    x: Tensor, plan: TomePlan, size: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Merge ``x (B, N, C)`` by ``plan``: size-weighted mean per group -> ``(x_out, size_out)``.

    ``size (B, N)`` counts the original tokens each token stands for (default ones); the returned
    ``size_out (B, N - r)`` is their sum per group. Survivors keep their original relative order.
    Differentiable with respect to ``x`` and ``size`` (a learned or soft size gets its gradient).
    """
    _check_plan(plan)
    _check_tokens("x", x)
    if tuple(x.shape[:2]) != tuple(plan.src_to_out.shape):
        raise ValueError(f"x has {tuple(x.shape[:2])} (B, N) but the plan was made for {tuple(plan.src_to_out.shape)}")
    if x.device != plan.src_to_out.device:
        raise ValueError(f"x is on {x.device} but the plan is on {plan.src_to_out.device}")
    if size is None:
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    else:
        _check_tokens("size", size, rank=2)
        if size.shape != x.shape[:2] or size.device != x.device:
            raise ValueError(f"size must be (B, N) = {tuple(x.shape[:2])} on {x.device}, got {_describe(size)}")
    return _merge(x, plan.src_to_out, plan.num_out, size, backend)


def merge_tokens(
    x: Tensor, src_to_out: Tensor, n_out: int, size: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Size-weighted average of the tokens assigned to each of ``n_out`` slots.

    ``src_to_out (B, N)`` int64 gives every token's slot (each slot must receive at least one
    token). The general form of :func:`tome_merge`, used by VisionZip's contextual merging.
    """
    _check_tokens("x", x)
    if (
        not isinstance(src_to_out, Tensor)
        or src_to_out.dtype != torch.int64
        or tuple(src_to_out.shape) != tuple(x.shape[:2])
    ):
        raise ValueError(f"src_to_out must be int64 (B, N) = {tuple(x.shape[:2])}")
    _check_int("n_out", n_out, 1, x.shape[1])
    _check_index_range(src_to_out, n_out)
    if size is None:
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    return _merge(x, src_to_out, n_out, size, backend)


def _merge(x, src_to_out, n_out, size, backend):
    op = _tome_merge_impl if plain_eager(x, size) else _tome_merge_op
    return op(x, src_to_out, n_out, size, backend or "")


def tome_unmerge(x_out: Tensor, plan: TomePlan, *, backend: Optional[str] = None) -> Tensor:
    """Undo a merge for dense outputs: every source position gets its group's value."""
    _check_plan(plan)
    _check_tokens("x_out", x_out, floating=False)
    expected = (plan.src_to_out.shape[0], plan.num_out)
    if tuple(x_out.shape[:2]) != expected:
        raise ValueError(f"x_out has {tuple(x_out.shape[:2])} (B, N_out) but the plan merges to {expected}")
    op = _tome_unmerge_impl if plain_eager(x_out) else _tome_unmerge_op
    return op(x_out, plan.src_to_out, backend or "")


def select_tokens(
    scores: Tensor, k: Union[int, Tensor], *, protect_first: int = 1, backend: Optional[str] = None
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Indices of the ``k`` highest-scoring tokens per row, ascending, first ``protect_first`` kept.

    ``k`` an int: returns ``(B, k)`` int64. ``k`` a ``(B,)`` integer tensor (per-image counts,
    e.g. PruMerge's adaptive count): returns ``(idx (T,), cu_seqlens (B+1,) int32)``, packed for
    :func:`gather_tokens` and the varlen attention. Ties break toward the lower index.
    """
    _check_tokens("scores", scores, rank=2)
    n = scores.shape[1]
    _check_int("protect_first", protect_first, 0, n)
    if isinstance(k, Tensor):
        return _select_tokens_varlen(scores, k, protect_first, backend)
    _check_int("k", k, protect_first, n, f" (protect_first={protect_first}, N={n})")
    op = _select_tokens_impl if plain_eager(scores) else _select_tokens_op
    return op(scores, k, protect_first, backend or "")


def _select_tokens_varlen(scores, counts, protect_first, backend):
    b, n = scores.shape
    if counts.shape != (b,) or counts.is_floating_point():
        raise ValueError(f"k as a tensor must be integer (B,) = ({b},), got {_describe(counts)}")
    if counts.device != scores.device:
        raise ValueError(f"k is on {counts.device} but scores is on {scores.device}")
    lo, hi = int(counts.min()), int(counts.max())
    if lo < protect_first or hi > n:
        raise ValueError(f"every k must be in [protect_first={protect_first}, N={n}], got values in [{lo}, {hi}]")
    # Rank every token once (k = N), then keep each row's best counts[b]: the same order as
    # select_tokens with that row's k.
    ranked = reference._stable_topk_desc(scores[:, protect_first:], n - protect_first) + protect_first
    head = torch.arange(protect_first, device=scores.device).expand(b, protect_first)
    order = torch.cat([head, ranked], dim=1)
    keep = torch.arange(n, device=scores.device)[None] < counts[:, None]
    chosen = torch.where(keep, order, n).sort(dim=1).values  # ascending, padding (n) last
    idx = chosen[chosen < n]
    cu = torch.zeros(b + 1, dtype=torch.int32, device=scores.device)
    cu[1:] = counts.cumsum(0)
    return idx, cu


def gather_tokens(
    x: Tensor, idx: Tensor, cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tensor:
    """Gather tokens: ``x (B, N, C)``, ``idx (B, k)`` -> ``(B, k, C)``; packed ``idx (T,)`` with
    ``cu_seqlens (B+1,)`` -> ``(T, C)`` ready for the varlen attention.

    ``cu_seqlens``: int32 / int64, starting at 0, non-decreasing, ending at ``T`` (TypeError /
    ValueError naming it otherwise). Its values are read on the host in eager calls on any device,
    and when the op runs under torch.compile on CPU; GPU tensors under torch.compile are not read
    (no device sync): a malformed one then selects wrong rows of ``x``, never rows outside it.
    """
    _check_tokens("x", x, floating=False)
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an int64/int32 tensor, got {idx!r:.60}")
    if idx.device != x.device:
        raise ValueError(f"idx is on {idx.device} but x is on {x.device}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"cu_seqlens must be an int32/int64 tensor (B+1,), got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be an int32/int64 tensor (B+1,), got {_describe(cu_seqlens)}")
        if idx.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != x.shape[0] + 1:
            raise ValueError(
                f"packed gather needs idx (T,) and cu_seqlens (B+1,) = "
                f"({x.shape[0] + 1},), got idx {_describe(idx)}, "
                f"cu_seqlens {_describe(cu_seqlens)}"
            )
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
        if _values_checkable(cu_seqlens):
            # Eager: checked here on any device (one host read, as the varlen attention does).
            # While tracing the values do not exist: the op checks them when it runs (CPU).
            _check_cu_seqlens_values(cu_seqlens, idx.shape[0])
            _check_index_range(idx, x.shape[1])
        if plain_eager(x):
            return _gather_packed_impl(x, idx, cu_seqlens, check=False)
        return _gather_packed_op(x, idx, cu_seqlens)
    if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be (B, k) with B = {x.shape[0]}, got {_describe(idx)}")
    _check_index_range(idx, x.shape[1])
    op = _gather_tokens_impl if plain_eager(x) else _gather_tokens_op
    return op(x, idx.long(), backend or "")


def _check_index_range(idx, n):
    """Bounds check on the host (CPU tensors only: on CUDA it would cost a device sync)."""
    if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= n:
            raise ValueError(f"idx values must be in [0, {n}), got [{lo}, {hi}]")
