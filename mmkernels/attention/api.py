"""``mmkernels.attention``: argument checks, the custom op, autograd, and dispatch to a backend.

The public function validates every argument once (clear ``ValueError``/``TypeError`` naming the
argument), picks a backend from metadata only (no host sync), then calls the ``mmkernels::attention``
custom op, which builds the canonical strided views of docs/attention_kernel_contract.md and runs
the backend. ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op with a fake
implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._eager import plain_eager
from .._calibration import size_bucket
from .._describe import describe as _describe
from .._describe import dtype_name
from . import reference

OP = "attention"
_SCORES_NAMES = {code: name for name, code in reference.SCORES_MODES.items()}


class AttentionOutput(NamedTuple):
    """Returned when ``scores`` or ``return_lse`` is asked; fields not asked for are ``None``."""

    out: Tensor
    lse: Optional[Tensor]
    scores: Optional[Tensor]


@dataclass(frozen=True)
class AttentionCall:
    """What dispatch needs to know about one call (metadata only, never tensor values)."""

    device_type: str
    dtype_name: str
    head_dim: int
    head_dim_v: int
    num_heads_q: int
    num_heads_kv: int
    varlen: bool
    causal: bool
    has_bias: bool
    scores: Optional[str]
    return_lse: bool
    # (Lq, Lk, B * Hq) rounded up to powers of two: the size class that calibrated auto-selection
    # times (mmkernels._calibration); None for varlen calls and while tracing.
    bucket: Optional[Tuple[int, int, int]] = None

    def __str__(self):
        extras = [
            n
            for n, on in (
                ("varlen", self.varlen),
                ("causal", self.causal),
                ("key_bias", self.has_bias),
                ("lse", self.return_lse),
            )
            if on
        ]
        if self.scores:
            extras.append(f"scores={self.scores!r}")
        return (
            f"attention({self.dtype_name} on {self.device_type}, D={self.head_dim}, "
            f"Dv={self.head_dim_v}, Hq={self.num_heads_q}, Hkv={self.num_heads_kv}"
            + (", " + ", ".join(extras) if extras else "")
            + ")"
        )


# ----------------------------------------------------------------------------------------------
# Argument checks (once, before dispatch)
# ----------------------------------------------------------------------------------------------


def _require_tensor(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _values_checkable(t: Tensor) -> bool:
    """Value checks (cu_seqlens contents) read the tensor on the host: skip them while tracing or
    during CUDA-graph capture, where that is impossible."""
    if torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _check_cu_seqlens(name, cu, total, batch, max_name, max_seqlen):
    _require_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (like flash_attn_varlen_func), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length batch+1, got shape {list(cu.shape)}")
    if batch is not None and cu.shape[0] != batch:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch+1): got {batch} and {cu.shape[0]}"
        )
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0):
        raise TypeError(f"{max_name} must be a non-negative Python int, got {max_seqlen!r}")
    if not _values_checkable(cu):
        if max_seqlen is None:
            raise ValueError(
                f"{max_name} is required under torch.compile / CUDA-graph capture "
                "(it cannot be read from cu_seqlens without a host sync)"
            )
        return max_seqlen
    return _check_cu_values(name, cu.tolist(), total, max_name, max_seqlen)


def _check_cu_values(name, values, total, max_name, max_seqlen):
    """The value checks of a cu_seqlens (read to the host as ``values``): start 0, non-decreasing,
    last == ``total`` packed tokens, every length <= ``max_seqlen`` (when given). Returns
    ``max_seqlen``, or the longest length when it is None."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {values[-1]}")
    longest = max(lengths, default=0)
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({longest})")
    return max_seqlen


def _check_cu_in_op(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Value checks of cu_seqlens at execution time, inside the custom op.

    The public function's checks run in eager mode only: under torch.compile / torch.export the
    op is traced with fake tensors and :func:`check_arguments` cannot read cu_seqlens. A compiled
    graph would then hand a cu_seqlens whose last value exceeds the token count, or a max_seqlen
    shorter than a real sequence, straight to a backend (out-of-bounds reads / writes, rows left
    unwritten, or sequences silently truncated). This runs where the values exist.

    CPU tensors: read on the host (a few microseconds) and checked exactly like the eager path.
    CUDA tensors: not checked here, since reading them would add a device sync to every call
    (and break CUDA-graph capture); the Triton kernels keep every access inside the tensors
    instead (mmkernels/attention/triton.py: the forward skips a sequence whose rows fall outside
    them, leaving its rows unwritten), so malformed values give a wrong result but never an
    out-of-bounds access. Validate on the host before compiling if needed.
    """
    if cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_seqlens_q.device.type != "cpu" or cu_seqlens_k.device.type != "cpu":
        return
    _check_cu_values("cu_seqlens_q", cu_seqlens_q.tolist(), q.shape[0], "max_seqlen_q", max_seqlen_q)
    _check_cu_values("cu_seqlens_k", cu_seqlens_k.tolist(), k.shape[0], "max_seqlen_k", max_seqlen_k)


def _check_bias(key_bias, q, batch, num_heads, num_keys, varlen):
    _require_tensor("key_bias", key_bias)
    if not key_bias.is_floating_point():
        raise TypeError(f"key_bias must be a floating tensor, got {key_bias.dtype}")
    if key_bias.device != q.device:
        raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
    if varlen:
        ok = key_bias.shape in ((num_keys,), (num_keys, num_heads))
        expected = f"({num_keys},) or ({num_keys}, {num_heads}) for packed (varlen) keys"
    else:
        ok = (
            key_bias.dim() in (2, 3)
            and key_bias.shape[0] in (1, batch)
            and key_bias.shape[-1] == num_keys
            and (key_bias.dim() == 2 or key_bias.shape[1] == num_heads)
        )
        expected = f"(B, Lk) = ({batch}, {num_keys}) or (B, Hq, Lk) = ({batch}, {num_heads}, {num_keys})"
    if not ok:
        raise ValueError(f"key_bias must have shape {expected}, got {list(key_bias.shape)}")


def _check_scale(scale) -> None:
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")


def check_arguments(
    q,
    k,
    v,
    causal,
    scale,
    key_bias,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scores,
    return_lse,
    backend,
) -> Tuple[int, int]:
    """Validate everything; return the (possibly derived) ``max_seqlen_q, max_seqlen_k``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    _check_scale(scale)
    if scores not in reference.SCORES_MODES:
        raise ValueError(f"scores must be one of None, 'cls', 'last', 'mean'; got {scores!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "(T, H, D) packed layout (cu_seqlens given)" if varlen else "(B, H, L, D) layout (no cu_seqlens)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D in the {layout}, got shape {list(t.shape)}")
    h_axis, l_axis = (1, 0) if varlen else (1, 2)
    hq, hkv, d = q.shape[h_axis], k.shape[h_axis], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head dim, got q {_describe(q)}, k {_describe(k)}")
    if v.shape[h_axis] != hkv or v.shape[l_axis] != k.shape[l_axis]:
        raise ValueError(f"v must match k in heads and length, got k {_describe(k)}, v {_describe(v)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {_describe(q)}, k {_describe(k)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv}) (GQA/MQA)"
        )
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q {_describe(q)}, v {_describe(v)}")

    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            _require_tensor(name, cu)
            if cu.device != q.device:
                raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        max_seqlen_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, "max_seqlen_q", max_seqlen_q)
        max_seqlen_k = _check_cu_seqlens(
            "cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.shape[0], "max_seqlen_k", max_seqlen_k
        )
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q / max_seqlen_k are only used with cu_seqlens (varlen)")
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    if key_bias is not None:
        _check_bias(key_bias, q, None if varlen else q.shape[0], hq, k.shape[l_axis], varlen)
    return max_seqlen_q, max_seqlen_k


def _size_bucket(q, k, varlen) -> Optional[Tuple[int, int, int]]:
    if varlen or type(q) is not Tensor or torch.compiler.is_compiling():  # FakeTensor: no sizes
        return None
    b, hq, lq, _ = q.shape
    return size_bucket(lq), size_bucket(k.shape[2]), size_bucket(b * hq, cap=256)


def describe_call(q, k, v, causal, key_bias, varlen, scores, return_lse) -> AttentionCall:
    h_axis = 1
    return AttentionCall(
        device_type=q.device.type,
        dtype_name=dtype_name(q.dtype),
        head_dim=q.shape[-1],
        head_dim_v=v.shape[-1],
        num_heads_q=q.shape[h_axis],
        num_heads_kv=k.shape[h_axis],
        varlen=varlen,
        causal=causal,
        has_bias=key_bias is not None,
        scores=scores,
        return_lse=return_lse,
        bucket=_size_bucket(q, k, varlen),
    )


# ----------------------------------------------------------------------------------------------
# Canonical views and the custom op
# ----------------------------------------------------------------------------------------------


def _output_shapes(q, k, v, varlen):
    dv = v.shape[-1]
    if varlen:
        return (q.shape[0], q.shape[1], dv), (q.shape[0], q.shape[1]), (k.shape[0],)
    b, hq, lq, _ = q.shape
    return (b, hq, lq, dv), (b, hq, lq), (b, k.shape[2])


def _out_stride(out_shape, varlen) -> Optional[Tuple[int, ...]]:
    """The output's strides: dense ``(B, Hq, Lq, Dv)`` is a view of ``(B, Lq, Hq, Dv)`` memory (as
    SDPA's CPU output is), so ``out.transpose(1, 2)``, the layout models consume, is contiguous
    and reshaping it to ``(B, Lq, Hq * Dv)`` needs no copy. None (contiguous) for varlen."""
    if varlen:
        return None
    _, hq, lq, dv = out_shape
    return (lq * hq * dv, dv, hq * dv, 1)


def _new_out(q, out_shape, stride):
    """The output buffer, of ``_out_stride``'s strides (None: contiguous)."""
    if stride is None:
        return q.new_empty(out_shape)
    return torch.empty_strided(out_shape, stride, dtype=q.dtype, device=q.device)


def _bias_view(key_bias, q, num_heads, varlen):
    """key_bias as (Bb, Hq, Sk) in float32 (float64 for float64 inputs); per-key bias has head stride 0."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    b = key_bias if key_bias.dtype == dtype else key_bias.to(dtype)
    if varlen:
        return b[None, None, :].expand(1, num_heads, -1) if b.dim() == 1 else b.t()[None]
    batch = q.shape[0]
    if b.dim() == 3:
        return b.expand(batch, num_heads, -1)
    rows, keys = b.shape
    return b.as_strided((batch, num_heads, keys), (b.stride(0) if rows > 1 else 0, 0, b.stride(1)), b.storage_offset())


def _poison_requested() -> bool:
    return _dispatch.env_flag("MMKERNELS_DEBUG_POISON")


@dataclass(frozen=True)
class _Plan:
    """What a call's metadata decides, worked out once per shape: its description (dispatch),
    its outputs' shapes, the sequence lengths, and whether there is anything to attend."""

    call: AttentionCall
    out_shape: Tuple[int, ...]
    out_stride: Optional[Tuple[int, ...]]  # None: contiguous (varlen)
    lse_shape: Tuple[int, ...]
    scores_shape: Tuple[int, ...]
    empty: bool  # no query row, no key or no output column: every row is fully masked
    max_seqlen_q: int  # dense calls: Lq and Lk
    max_seqlen_k: int


def _make_plan(q, k, v, causal, key_bias, varlen, scores_mode, return_lse) -> _Plan:
    out_shape, lse_shape, scores_shape = _output_shapes(q, k, v, varlen)
    keys = k.shape[0] if varlen else k.shape[2]
    return _Plan(
        call=describe_call(q, k, v, causal, key_bias, varlen, _SCORES_NAMES[scores_mode], return_lse),
        out_shape=out_shape,
        out_stride=_out_stride(out_shape, varlen),
        lse_shape=lse_shape,
        scores_shape=scores_shape,
        empty=math.prod(out_shape) == 0 or keys == 0,
        max_seqlen_q=q.shape[2] if not varlen else 0,
        max_seqlen_k=k.shape[2] if not varlen else 0,
    )


_PLANS = _dispatch.CallMemo()


def _plan_for(q, k, v, causal, key_bias, varlen, scores_mode, return_lse) -> _Plan:
    """_make_plan, memoised on everything it reads (the op's body: arguments already checked)."""
    key = (
        type(q),
        q.device.type,
        q.dtype,
        q.shape,
        k.shape,
        v.shape[-1],
        varlen,
        causal,
        key_bias is not None,
        scores_mode,
        return_lse,
    )
    return _PLANS.get(key, lambda: _make_plan(q, k, v, causal, key_bias, varlen, scores_mode, return_lse))


_CHECKED = _dispatch.CallMemo()


def _checked_plan(q, k, v, causal, key_bias, scores, return_lse, backend) -> Optional[_Plan]:
    """The plan of a dense call in plain eager mode, with :func:`check_arguments` run once per
    distinct metadata (its outcome is a function of the key: types, dtypes, devices, shapes and
    the flags; q / k / v / key_bias are plain tensors here). None for arguments of other types
    (the full checks then run and say what is wrong). ``scale`` is checked by the caller."""
    if not (
        q is not None
        and k is not None
        and v is not None
        and type(causal) is bool
        and type(return_lse) is bool
        and (scores is None or type(scores) is str)
        and (backend is None or type(backend) is str)
    ):
        return None
    bias = None if key_bias is None else (key_bias.dtype, key_bias.device, key_bias.shape)
    key = (
        q.dtype,
        k.dtype,
        v.dtype,
        q.device,
        k.device,
        v.device,
        q.shape,
        k.shape,
        v.shape,
        causal,
        scores,
        return_lse,
        backend,
        bias,
    )

    def build():
        check_arguments(q, k, v, causal, None, key_bias, None, None, None, None, scores, return_lse, backend)
        mode = reference.SCORES_MODES[scores]
        return _make_plan(q, k, v, causal, key_bias, False, mode, return_lse)

    return _CHECKED.get(key, build)


def _attention_impl(
    q,
    k,
    v,
    key_bias,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    scores_mode,
    return_lse,
    backend,
    plan: Optional[_Plan] = None,
):
    """The op's body: allocate the outputs, select a backend, run it. Returns ``(out, lse,
    scores)``, ``lse`` / ``scores`` None when not asked for. ``plan``: the call's plan when the
    caller has it (plain eager calls), else looked up here."""
    varlen = cu_seqlens_q is not None
    if varlen:
        _check_cu_in_op(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if plan is None:
        plan = _plan_for(q, k, v, causal, key_bias, varlen, scores_mode, return_lse)
    dtype, device = q.dtype, q.device
    out = _new_out(q, plan.out_shape, plan.out_stride)
    lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=device) if return_lse else None
    scores = torch.empty(plan.scores_shape, dtype=torch.float32, device=device) if scores_mode else None
    if _poison_requested():
        for t in (out, lse, scores):
            if t is not None:
                t.fill_(float("nan"))
    if plan.empty:
        # Nothing to attend: every row is fully masked (out 0, lse -inf, scores 0).
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        if scores is not None:
            scores.zero_()
        return out, lse, scores
    if varlen:
        q4, k4, v4 = (t.permute(1, 0, 2)[None] for t in (q, k, v))
        out4 = out.permute(1, 0, 2)[None]
        lse3 = lse.t()[None] if return_lse else None
        scores2 = scores[None] if scores_mode else None
    else:
        q4, k4, v4, out4, lse3, scores2 = q, k, v, out, lse, scores
    bias3 = None if key_bias is None else _bias_view(key_bias, q, q.shape[1], varlen)
    # Selection runs here, at execution time, so that tracing never enters the registry.
    chosen = _dispatch.select(OP, plan.call, device.type, backend or None)
    produced = chosen.run(
        q4,
        k4,
        v4,
        bias3,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        scores_mode,
        out4,
        lse3,
        scores2,
    )
    if produced is not None:  # a dense call's output made by the backend (the contract allows it)
        if varlen or produced.shape != out.shape or produced.stride() != out.stride() or produced.dtype != dtype:
            raise RuntimeError(
                f"attention backend {chosen.name!r} returned an output of shape {tuple(produced.shape)}, "
                f"strides {produced.stride()}, {produced.dtype} for {tuple(out.shape)}, {out.stride()}, {dtype}"
            )
        out = produced
    return out, lse, scores


@torch.library.custom_op("mmkernels::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    scores_mode: int,
    return_lse: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    out, lse, scores = _attention_impl(
        q,
        k,
        v,
        key_bias,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        scores_mode,
        return_lse,
        backend,
    )
    if lse is None:
        lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    if scores is None:
        scores = torch.empty((0,), dtype=torch.float32, device=q.device)
    return out, lse, scores


@_attention_op.register_fake
def _attention_fake(
    q,
    k,
    v,
    key_bias,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    scores_mode,
    return_lse,
    backend,
):
    out_shape, lse_shape, scores_shape = _output_shapes(q, k, v, cu_seqlens_q is not None)
    return (
        _new_out(q, out_shape, _out_stride(out_shape, cu_seqlens_q is not None)),
        q.new_empty(lse_shape if return_lse else (0,), dtype=torch.float32),
        q.new_empty(scores_shape if scores_mode else (0,), dtype=torch.float32),
    )


# Autograd: the backward recomputes the forward through the reference (float32 math for half
# inputs) and differentiates it. Correct for every backend; a fused backward kernel is future work.
# ``scores`` are not differentiable (they are importance signals for pruning).


def _setup_context(ctx, inputs, output):
    (q, k, v, key_bias, cu_q, cu_k, _mq, _mk, causal, scale, _scores_mode, return_lse, _b) = inputs
    ctx.save_for_backward(q, k, v, key_bias, cu_q, cu_k)
    ctx.causal, ctx.scale, ctx.return_lse = causal, scale, return_lse


def _backward(ctx, grad_out, grad_lse, _grad_scores):
    q, k, v, key_bias, cu_q, cu_k = ctx.saved_tensors
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        leaves = [t.detach().to(compute).requires_grad_(True) for t in (q, k, v)]
        bias_leaf = None
        if key_bias is not None and ctx.needs_input_grad[3]:
            bias_leaf = key_bias.detach().to(compute).requires_grad_(True)
        bias = bias_leaf if bias_leaf is not None else key_bias
        out, lse = reference_attention(
            *leaves, key_bias=bias, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=ctx.causal, scale=ctx.scale
        )
        targets, grads = [out], [grad_out.to(compute)]
        if ctx.return_lse and grad_lse is not None and grad_lse.numel():
            finite = torch.isfinite(lse)
            targets.append(torch.where(finite, lse, 0))
            grads.append(torch.where(finite, grad_lse.to(compute), 0))
        wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
        computed = torch.autograd.grad(targets, wrt, grads, allow_unused=True)
    dq, dk, dv = (None if g is None else g.to(t.dtype) for g, t in zip(computed[:3], (q, k, v)))
    dbias = computed[3].to(key_bias.dtype) if bias_leaf is not None else None
    return dq, dk, dv, dbias, None, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_bias: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    scores: Optional[str] = None,
) -> Tuple[Tensor, ...]:
    """Differentiable reference on the public layouts: returns ``(out, lse)`` (and scores when
    asked, as a third element). Used by the backward pass and by tests as the oracle."""
    varlen = cu_seqlens_q is not None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses, score_list = [], [], []
    if varlen:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = [
            (
                q[a:b].transpose(0, 1),
                k[c:e].transpose(0, 1),
                v[c:e].transpose(0, 1),
                None if key_bias is None else (key_bias[c:e] if key_bias.dim() == 1 else key_bias[c:e].t()),
            )
            for a, b, c, e in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])
        ]
    else:
        nb = q.shape[0]
        pieces = [
            (q[i], k[i], v[i], None if key_bias is None else key_bias[i if key_bias.shape[0] > 1 else 0])
            for i in range(nb)
        ]
    for qs, ks, vs, bs in pieces:
        o, lse, p = reference.sequence_attention(qs, ks, vs, bs, causal=causal, scale=scale)
        if varlen:
            o, lse = o.transpose(0, 1), lse.transpose(0, 1)
        outs.append(o)
        lses.append(lse)
        if scores:
            score_list.append(reference.sequence_scores(p, reference.SCORES_MODES[scores]))
    cat = torch.cat if varlen else torch.stack
    result = (cat(outs), cat(lses))
    if scores:
        result = result + (cat(score_list),)
    return result


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    key_bias: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    scores: Optional[str] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, AttentionOutput]:
    """Fused scaled-dot-product attention with per-key bias, varlen, GQA and per-key scores.

    Dense layout (like ``F.scaled_dot_product_attention``): q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``,
    v ``(B, Hkv, Lk, Dv)`` -> out ``(B, Hq, Lq, Dv)``, any input strides; out is a view of
    ``(B, Lq, Hq, Dv)`` memory (like SDPA's CPU output): ``out.transpose(1, 2)`` is contiguous.
    Packed varlen layout (like ``flash_attn_varlen_func``): q ``(Tq, Hq, D)``, k/v ``(Tk, Hkv, D|Dv)``,
    int32 ``cu_seqlens_q/k`` of length B+1, ``max_seqlen_q/k`` Python ints (derived from cu_seqlens,
    with one host sync, when omitted outside torch.compile).

    * ``causal``: bottom-right aligned (query i sees keys j <= i + Lk - Lq).
    * ``scale``: defaults to ``1/sqrt(D)``.
    * ``key_bias``: additive per-key bias added to the scaled logits, ``(B, Lk)`` or ``(B, Hq, Lk)``
      (varlen ``(Tk,)`` or ``(Tk, Hq)``); ``-inf`` masks a key. ToMe's ``log(size)`` or key padding.
    * ``scores``: ``"cls"`` | ``"last"`` | ``"mean"`` returns per-key softmax probabilities of the first
      query row / the last query row / the mean over rows, averaged over heads, float32 ``(B, Lk)``
      (varlen ``(Tk,)``), computed without materialising ``(Lq, Lk)``.
    * ``return_lse``: float32 log-sum-exp per row, ``(B, Hq, Lq)`` (varlen ``(Tq, Hq)``).
    * ``backend``: ``"reference" | "cpu" | "triton" | "cuda"``; default: the fastest capable one
      (environment override: ``MMKERNELS_BACKEND`` or ``MMKERNELS_ATTENTION_BACKEND``).

    Returns the output tensor, or ``AttentionOutput(out, lse, scores)`` when scores or lse is asked.
    Fully masked rows give 0 output and ``-inf`` lse. Gradients flow to q, k, v and key_bias (the
    backward recomputes through the reference).

    NaN / inf, the same on every backend (docs/nan_semantics.md): a key masked for a row (causal,
    or ``key_bias = -inf``) is never read by it. A row that sees a NaN logit (NaN in q, in k or in
    the key_bias of a key it sees) or a ``+inf`` one (``key_bias = +inf``) is NaN: out and lse NaN,
    and its probabilities are NaN on the keys it sees, so those keys' ``scores`` are NaN when the
    row counts. A NaN or ``±inf`` in ``v[j, c]`` makes ``out[i, c]`` NaN for every row ``i`` that
    sees key ``j``. A row that sees no key stays 0 with lse ``-inf`` whatever q holds.
    """
    plan = None
    eager = plain_eager(q, k, v, key_bias, cu_seqlens_q, cu_seqlens_k)
    dense = cu_seqlens_q is None and cu_seqlens_k is None and max_seqlen_q is None and max_seqlen_k is None
    if eager and dense:
        # Plain eager inference (the op is skipped, see mmkernels._eager): the checks' outcome is
        # memoised per metadata, since per-call overheads decide small calls (decoding, batch 1).
        plan = _checked_plan(q, k, v, causal, key_bias, scores, return_lse, backend)
    if plan is None:
        max_seqlen_q, max_seqlen_k = check_arguments(
            q,
            k,
            v,
            causal,
            scale,
            key_bias,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scores,
            return_lse,
            backend,
        )
    else:
        _check_scale(scale)
        max_seqlen_q, max_seqlen_k = plan.max_seqlen_q, plan.max_seqlen_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (q, k, v, key_bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    args += (reference.SCORES_MODES[scores], return_lse, backend or "")
    if plan is not None:
        out, lse, score = _attention_impl(*args, plan=plan)
    elif eager:
        out, lse, score = _attention_impl(*args)
    else:
        out, lse, score = _attention_op(*args)
    if scores is None and not return_lse:
        return out
    return AttentionOutput(out, lse if return_lse else None, score if scores else None)
