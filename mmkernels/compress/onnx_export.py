"""``export_onnx``: an ONNX model in which every QuantLinear stays quantized.

```
onnx_model = mmkernels.export_onnx(model, (x,), "model.onnx")
```

How: the model is exported with ``torch.onnx.export(dynamo=True)`` (torch 2.13's exporter, which
needs ``onnxscript``: ``pip install mmkernels[onnx]``). During the export each QuantLinear is
swapped for a stand-in (in eval mode) whose forward calls a custom op of namespace
``mmkernels_onnx`` on buffers already in the ONNX layout; ``custom_translation_table`` turns that
op into the nodes below. The rest of the model (LayerNorm, GELU, ...) exports as usual. The model
(its layers and train / eval flags) is restored afterwards.

Per layer, after ``x[..., input_perm]`` (``Gather``) and ``x / smooth`` (``Div``) when present:

* **int4 / int8 weight-only** -> ``com.microsoft::MatMulNBits`` (onnxruntime contrib op, bits 4
  or 8, float32 A). Attributes ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``. Inputs:
  ``B`` uint8 ``(N, k_blocks, block_size * bits / 8)``, the unsigned values ``u`` packed along K
  inside each block, lowest bits first (4-bit: element ``2j`` in the low nibble of byte ``j``,
  which is mmkernels' own int4 packing); ``scales`` ``(N, k_blocks)``; ``zero_points`` uint8
  packed the same way ``(N, ceil(k_blocks * bits / 8))`` for asymmetric layers, absent for
  symmetric ones, whose values are stored as ``u = q + 2^(bits-1)`` and use the op's default zero
  point ``2^(bits-1)``; ``bias``. ``block_size`` is the group size; per-channel layers use the
  largest of 256/128/64/32/16 dividing K (scales repeated per block, exact), or 16 with the last
  block zero-padded. accuracy_level 0 (default) dequantizes to float32 like ``qmatmul``.
* **W8A8** (``act_bits=8``, int8 per-channel) -> mmkernels' symmetric per-token quantization built
  from primitive ops, then ``MatMulInteger``::

      s   = Where(ReduceMax(Abs(x), -1) > 0, amax / 127, 1)
      x_q = Cast<int8>(Clip(Round(x / s), -127, 127))         # Round: half to even, as torch
      y   = Cast<float>(MatMulInteger(x_q, W_q^T[, w_zero])) * s * w_scale + bias

  This reproduces ``qmatmul``'s activation quantization step for step (same float32 operations,
  exact int32 accumulation), so outputs agree to float32 rounding of the final products.
  ONNX's ``DynamicQuantizeLinear`` was not used: it quantizes the whole tensor to *asymmetric
  uint8* with one scale, a different (coarser) scheme than mmkernels' per-token symmetric int8.
* **fp8 e4m3** (opset >= 19) -> the fp8 weight is an initializer, widened with ``Cast`` and scaled
  at run time, then ``MatMul``; with ``act_bits=8`` the activations are quantized per token like
  ``qmatmul`` (``x / (amax / 448)`` then ``Cast`` to float8e4m3fn, saturating, round to nearest
  even) before the matmul. The exporter's graph optimizer is switched off for models with fp8
  layers: its constant folding would replace ``Cast(fp8 weight) * scale`` by a stored float32
  weight (onnxruntime may still fold it in memory when it loads the model; the file stays fp8).

Checked against onnxruntime 1.31's registered schema of MatMulNBits (its doc string and input
descriptions, read with ``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema``)
and by running the exported graphs with the CPUExecutionProvider (tests/compress/test_onnx_export.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._activations import apply_activation
from ..nn.quant_linear import QuantLinear
from ..quant.packing import pack_int4, unpack_weight
from .checkpoint.common import quant_layers

if TYPE_CHECKING:
    import onnx

_BLOCKS = (256, 128, 64, 32, 16)


# ---------------------------------------------------------------------------------------------
# Custom ops the stand-ins call (their eager forms decode the ONNX layouts: a check of the
# packing that needs no onnxruntime)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels_onnx::matmul_nbits", mutates_args=())
def _matmul_nbits(
    x: Tensor,
    b: Tensor,
    scales: Tensor,
    zero_points: Optional[Tensor],
    bias: Optional[Tensor],
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> Tensor:
    u = _unpack_blocks(b.reshape(n, -1), bits)[:, :k]
    blocks = scales.shape[1]
    if zero_points is None:
        z = torch.full((n, blocks), float(1 << (bits - 1)))
    else:
        z = _unpack_blocks(zero_points, bits)[:, :blocks].float()
    idx = torch.arange(k) // block_size
    w = (u.float() - z[:, idx]) * scales.float()[:, idx]
    y = x.float() @ w.T
    return (y if bias is None else y + bias.float()).to(x.dtype)


@_matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, k, n, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("mmkernels_onnx::w8a8", mutates_args=())
def _w8a8(x: Tensor, w_t: Tensor, w_zero: Optional[Tensor], w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from ..quant.reference import quantize_activations

    x2 = x.reshape(-1, x.shape[-1]).float()
    xq, sx = quantize_activations(x2)
    w = w_t.to(torch.int64) - (0 if w_zero is None else w_zero.to(torch.int64))
    y = (xq.to(torch.int64) @ w).float() * sx[:, None] * w_scale[None, :]
    y = y if bias is None else y + bias.float()
    return y.reshape(*x.shape[:-1], w_t.shape[1]).to(x.dtype)


@_w8a8.register_fake
def _(x, w_t, w_zero, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_t.shape[1]))


@torch.library.custom_op("mmkernels_onnx::fp8_matmul", mutates_args=())
def _fp8_matmul(x: Tensor, w: Tensor, scales: Tensor, bias: Optional[Tensor], act_bits: int) -> Tensor:
    from ..quant.reference import qmatmul_tensors

    return qmatmul_tensors(x, w, scales, None, 8, bias, act_bits or None)


@_fp8_matmul.register_fake
def _(x, w, scales, bias, act_bits):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _unpack_blocks(packed: Tensor, bits: int) -> Tensor:
    """uint8 rows holding ``8 / bits`` values per byte, lowest bits first -> int64 values."""
    if bits == 8:
        return packed.to(torch.int64)
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# Stand-ins for QuantLinear during the export
# ---------------------------------------------------------------------------------------------


class _Prologue(nn.Module):
    """``x[..., input_perm] / smooth`` before the product and the layer's fused activation after
    it (``QuantLinear.activation``, set by ``mmkernels.patch``: torch's function, exported as ONNX
    ops), as QuantLinear and qmatmul do."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.register_buffer("input_perm", layer.input_perm)
        self.register_buffer("smooth", None if layer.smooth is None else layer.smooth.detach().float())
        self.activation = layer.activation

    def epilogue(self, y: Tensor) -> Tensor:
        return apply_activation(y, self.activation)

    def prologue(self, x: Tensor) -> Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.smooth is not None:
            x = x / self.smooth
        return x


class _MatMulNBitsLinear(_Prologue):
    def __init__(self, layer: QuantLinear, accuracy_level: int):
        super().__init__(layer)
        qw = layer.quantized
        n, k = qw.shape
        bits, half = qw.bits, 1 << (qw.bits - 1)
        q = unpack_weight(qw.qweight, bits, qw.symmetric).to(torch.int64).cpu()
        u = q + half if qw.symmetric else q
        block = qw.group_size or next((b for b in _BLOCKS if k % b == 0), 16)
        blocks = -(-k // block)
        per_block = torch.arange(blocks) * block // (qw.group_size or k)  # group of each block
        scales = qw.scales.detach().cpu()[:, per_block]
        zeros = None if qw.symmetric else qw.zeros.cpu().to(torch.int64)[:, per_block]
        if blocks * block > k:  # pad the last block with its zero point
            pad = (
                torch.full((n, blocks * block - k), half)
                if zeros is None
                else zeros[:, -1:].expand(n, blocks * block - k)
            )
            u = torch.cat([u, pad], dim=1)
        self.k, self.n, self.bits, self.block = k, n, bits, block
        self.accuracy_level = int(accuracy_level)
        self.register_buffer("b", _pack_rows(u, bits).reshape(n, blocks, block * bits // 8))
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zero_points", None if zeros is None else _pack_rows(zeros, bits))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = _matmul_nbits(
            self.prologue(x),
            self.b,
            self.scales,
            self.zero_points,
            self.bias,
            self.k,
            self.n,
            self.bits,
            self.block,
            self.accuracy_level,
        )
        return self.epilogue(y)


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """``(N, L)`` values in ``[0, 2^bits)`` -> uint8 rows, lowest bits first (4-bit: odd L padded
    with a zero nibble)."""
    if bits == 8:
        return values.to(torch.uint8).contiguous()
    if values.shape[1] % 2:
        values = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)
    return pack_int4(values.to(torch.int16))


class _W8A8Linear(_Prologue):
    def __init__(self, layer: QuantLinear):
        super().__init__(layer)
        qw = layer.quantized
        self.register_buffer("w_t", qw.qweight.detach().T.contiguous())  # (K, N) int8/uint8
        self.register_buffer("w_zero", None if qw.symmetric else qw.zeros[:, 0].contiguous())
        self.register_buffer("w_scale", qw.scales[:, 0].detach().float().contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return self.epilogue(_w8a8(self.prologue(x), self.w_t, self.w_zero, self.w_scale, self.bias))


class _Fp8Linear(_Prologue):
    def __init__(self, layer: QuantLinear):
        super().__init__(layer)
        qw = layer.quantized
        self.act_bits = layer.act_bits or 0
        self.register_buffer("w", qw.qweight.detach())
        self.register_buffer("scales", qw.scales.detach().float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return self.epilogue(_fp8_matmul(self.prologue(x), self.w, self.scales, self.bias, self.act_bits))


def onnx_stand_in(layer: QuantLinear, accuracy_level: int = 0) -> nn.Module:
    """The module that replaces ``layer`` during the export (its eager forward computes the same
    result from the ONNX-layout buffers)."""
    if layer.quantized.fp8:
        return _Fp8Linear(layer)
    if layer.act_bits:
        return _W8A8Linear(layer)
    return _MatMulNBitsLinear(layer, accuracy_level)


# ---------------------------------------------------------------------------------------------
# Translations (onnxscript) and the export
# ---------------------------------------------------------------------------------------------


def _translations():
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    fp, attr = OpSchema.FormalParameter, OpSchema.Attribute
    optional = OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            fp("A", "T1"),
            fp("B", "T2"),
            fp("scales", "T1"),
            fp("zero_points", "T3", param_option=optional),
            fp("g_idx", "T4", param_option=optional),
            fp("bias", "T1", param_option=optional),
        ],
        outputs=[fp("Y", "T1")],
        type_constraints=[
            ("T1", floats, ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)"] + floats, ""),
            ("T4", ["tensor(int32)"], ""),
        ],
        attributes=[attr(a, OpSchema.AttrType.INT, "") for a in ("K", "N", "bits", "block_size", "accuracy_level")],
    )
    matmul_nbits = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)
    FLOAT, INT8, FLOAT8 = 1, 3, 17  # onnx.TensorProto data types

    def t_matmul_nbits(
        x, b, scales, zero_points, bias, k: int, n: int, bits: int, block_size: int, accuracy_level: int
    ):
        return matmul_nbits(
            x,
            b,
            scales,
            zero_points,
            None,
            bias,
            K=k,
            N=n,
            bits=bits,
            block_size=block_size,
            accuracy_level=accuracy_level,
        )

    def _per_token_scale(x, qmax: float):
        amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        return op.Where(
            op.Greater(amax, op.Constant(value_float=0.0)),
            op.Div(amax, op.Constant(value_float=qmax)),
            op.Constant(value_float=1.0),
        )

    def t_w8a8(x, w_t, w_zero, w_scale, bias):
        s = _per_token_scale(x, 127.0)
        xq = op.Cast(
            op.Clip(op.Round(op.Div(x, s)), op.Constant(value_float=-127.0), op.Constant(value_float=127.0)), to=INT8
        )
        acc = op.MatMulInteger(xq, w_t) if w_zero is None else op.MatMulInteger(xq, w_t, None, w_zero)
        y = op.Mul(op.Mul(op.Cast(acc, to=FLOAT), s), w_scale)
        return y if bias is None else op.Add(y, bias)

    def t_fp8_matmul(x, w, scales, bias, act_bits: int):
        wf = op.Cast(w, to=FLOAT)  # (N, K): e4m3 widens exactly
        if act_bits:  # per-channel scales (N, 1)
            s = _per_token_scale(x, 448.0)
            xq = op.Cast(op.Cast(op.Div(x, s), to=FLOAT8), to=FLOAT)
            acc = op.MatMul(xq, op.Transpose(wf, perm=[1, 0]))
            y = op.Mul(op.Mul(acc, s), op.Squeeze(scales, op.Constant(value_ints=[1])))
        else:  # W_hat = w * s per group
            grouped = op.Reshape(wf, op.Concat(op.Shape(scales), op.Constant(value_ints=[-1]), axis=0))  # (N, G, K / G)
            scaled = op.Mul(grouped, op.Unsqueeze(scales, op.Constant(value_ints=[2])))
            y = op.MatMul(x, op.Transpose(op.Reshape(scaled, op.Shape(wf)), perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    return {
        torch.ops.mmkernels_onnx.matmul_nbits.default: t_matmul_nbits,
        torch.ops.mmkernels_onnx.w8a8.default: t_w8a8,
        torch.ops.mmkernels_onnx.fp8_matmul.default: t_fp8_matmul,
    }


@contextlib.contextmanager
def _swapped(model: nn.Module, accuracy_level: int):
    layers = quant_layers(model)
    if "" in layers:
        raise ValueError("export_onnx: wrap a lone QuantLinear in a module (e.g. nn.Sequential)")
    stand_ins = {name: onnx_stand_in(layer, accuracy_level) for name, layer in layers.items()}
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()  # export the inference graph (dropout off, ...)
        for name, module in stand_ins.items():
            model.set_submodule(name, module)
        yield layers
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)
        for m, mode in training.items():
            m.training = mode


def export_onnx(
    model: nn.Module,
    example_inputs: Union[Tensor, Tuple[Tensor, ...]],
    path: Optional[str] = None,
    *,
    opset: int = 21,
    dynamic_shapes: Optional[Union[Dict[str, Any], Tuple[Any, ...]]] = None,
    accuracy_level: int = 0,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
) -> "onnx.ModelProto":
    """Export ``model`` (with its QuantLinear layers) to ONNX; see the module docstring.

    ``example_inputs``: a tensor or a tuple of positional inputs (float32 activations).
    ``path``: where to write the ``.onnx`` file (None: only return the model). ``opset``: ONNX
    opset of the default domain (>= 18; >= 19 when the model has fp8 layers). ``dynamic_shapes``:
    as for ``torch.export`` (e.g. ``({0: torch.export.Dim("batch")},)``). ``accuracy_level``:
    MatMulNBits' attribute (0: unset / float32 math; 4 lets onnxruntime quantize A to int8).
    Returns the ``onnx.ModelProto``.
    """
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError(
            "export_onnx needs onnxscript (torch.onnx's exporter uses it): "
            "pip install onnx onnxscript (or mmkernels[onnx])"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset must be an integer >= 18, got {opset!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 (MatMulNBits), got {accuracy_level!r}")
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    fp8 = [n for n, m in quant_layers(model).items() if m.quantized.fp8]
    if fp8 and opset < 19:
        raise ValueError(f"layers {fp8[:4]} hold fp8 weights, which need opset >= 19 (float8 Cast); got opset={opset}")
    with _swapped(model, accuracy_level):
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=_translations(),
            input_names=input_names,
            output_names=output_names,
            verbose=False,
            optimize=not fp8,
        )
    if path is not None:
        program.save(path)
    return program.model_proto
