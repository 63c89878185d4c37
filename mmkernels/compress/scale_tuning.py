"""End-to-end tuning of the quantization scales of a quantized model (integers kept).

Implemented from Chen, Shao, Xu, Wang, Gao, Zhang, Qiao, Luo, "EfficientQAT: Efficient
Quantization-Aware Training for Large Language Models" (2024, arXiv:2407.11062), its second
phase, *end-to-end training of the quantization parameters* (E2E-QP): after a block-wise method
has fixed every weight's integer, only the group scales (step sizes) are trained, through the
whole model at once, on the model's final output. Block-wise methods (GPTQ, SignRound) each
minimise their own block's output error; the errors of six blocks do not add up to the error that
matters (a sentence embedding, a CLS token), and the scales are few (one per group of
``group_size`` weights) so they can be fitted to the final output from little data.

Each weight-only :class:`~mmkernels.nn.QuantLinear` with an integer format is replaced, for the
duration of the tuning, by a :class:`ScaleTuner`::

    w_hat = (q - z) * (s0 * a)            # q, z: the layer's integers (fixed); s0 its scales

with one trainable multiplier ``a`` per group (start 1, clamped to
``[1 - scale_range, 1 + scale_range]``). The loss compares the quantized model's output with
the float reference model's on calibration items: ``"mse"`` (mean squared error) or ``"cosine"``
(mean of ``1 - cos`` over the last dimension), after ``output_fn(output, item)`` (default: the
output itself, restricted to the item's non-padding tokens when the item is a dict with an
``attention_mask`` ``(B, L)`` and the output is ``(B, L, C)``). Optimiser: Adam (the paper's
AdamW without weight decay, which would pull ``a`` towards 0) with a cosine-decayed step size,
``epochs`` shuffled passes over the items. Nothing else in the model changes (LayerNorms, the
integers; the layers' biases only with ``bias_lr > 0``, a learned bias correction, off by
default: see the README's recipe notes); if the mean
calibration loss after tuning is not below the loss before, the start values are kept. The
result is exported back to QuantLinear layers with the new float32 scales: the same integers, the
same formats and kernels.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._activations import apply_activation
from ..nn.quant_linear import QuantLinear
from .calibration import call_model, drop_padding, token_mask
from ..quant.packing import QuantizedWeight, is_fp8
from .trainable import train_only

LOSSES = ("mse", "cosine")


class ScaleTuner(nn.Module):
    """Stand-in for one weight-only QuantLinear during :func:`tune_scales`: its integers fixed,
    one trainable scale multiplier ``a`` per group (module docstring)."""

    def __init__(self, layer: QuantLinear, scale_range: float = 0.2, train_bias: bool = False):
        super().__init__()
        qw = layer.quantized
        n, k = qw.shape
        g = qw.scales.shape[1]
        self.layer = layer  # exported with new scales
        self.scale_range = float(scale_range)
        self.register_buffer("centered", qw.int_weight().to(torch.float32).reshape(n, g, k // g))
        self.register_buffer("s0", qw.scales.detach().to(torch.float32).clone())
        self.a = nn.Parameter(torch.ones_like(self.s0))
        bias = layer.bias
        self.bias = nn.Parameter(bias.detach().clone()) if train_bias and bias is not None else None

    def current_bias(self) -> Optional[Tensor]:
        return self.layer.bias if self.bias is None else self.bias

    def scales(self) -> Tensor:
        return self.s0 * self.a

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        w = (self.centered * self.scales()[..., None]).reshape(self.centered.shape[0], -1)
        b = self.current_bias()
        return apply_activation(F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)), layer.activation)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.a.clamp_(1.0 - self.scale_range, 1.0 + self.scale_range)

    @torch.no_grad()
    def export(self) -> QuantLinear:
        """The layer with the tuned float32 scales (same integers, zero points, permutation)."""
        layer, qw = self.layer, self.layer.quantized
        tuned = QuantizedWeight(
            qw.qweight,
            self.scales().to(qw.scales.dtype).contiguous(),
            qw.zeros,
            bits=qw.bits,
            group_size=qw.group_size,
            shape=tuple(qw.shape),
        )
        bias = None if layer.bias is None else self.current_bias().to(layer.bias.dtype)
        out = QuantLinear.from_quantized(tuned, bias, input_perm=layer.input_perm, backend=layer.backend)
        out.activation = layer.activation
        out.train(layer.training)
        return out


def tunable(layer: nn.Module) -> bool:
    """Whether :func:`tune_scales` tunes ``layer``: a weight-only QuantLinear with an integer
    format (not fp8, no SmoothQuant factors, not W8A8)."""
    return (
        type(layer) is QuantLinear
        and layer.act_bits is None
        and layer.smooth is None
        and not is_fp8(layer.quantized.qweight)
    )


def _default_output(output, item) -> Tensor:
    out = output[0] if isinstance(output, (tuple, list)) else output
    return drop_padding(out, token_mask(item))


def tune_scales(
    model: nn.Module,
    reference: nn.Module,
    calib_data: Iterable,
    *,
    output_fn: Optional[Callable] = None,
    loss: str = "mse",
    epochs: int = 2,
    lr: float = 1e-3,
    scale_range: float = 0.2,
    bias_lr: float = 0.0,
    seed: int = 0,
    include: Optional[Callable[[str], bool]] = None,
) -> Tuple[float, float]:
    """Tune the group scales of ``model``'s weight-only QuantLinear layers, in place, so that
    ``output_fn(model(item), item)`` matches ``output_fn(reference(item), item)`` (the float
    model) on ``calib_data`` (items run as in ``quantize_model``: tensor, dict or tuple).
    ``loss``: ``"mse"`` or ``"cosine"``; ``epochs`` passes over the items with Adam at step size
    ``lr`` (cosine decay to 0); multipliers clamped to ``1 +- scale_range``. ``include(name)``:
    restrict to some layers (default: every tunable layer, see :func:`tunable`). ``bias_lr > 0``:
    also train the layers' biases, at that step size. Returns the mean calibration loss before
    and after (the start values are kept when tuning did not lower it).
    See the module docstring for the method."""
    if not isinstance(model, nn.Module) or not isinstance(reference, nn.Module):
        raise TypeError("model and reference must be nn.Module instances")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    for name, value in (("lr", lr), ("scale_range", scale_range)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    if isinstance(bias_lr, bool) or not isinstance(bias_lr, (int, float)) or not 0 <= bias_lr < float("inf"):
        raise ValueError(f"bias_lr must be a finite float >= 0, got {bias_lr!r}")
    if scale_range >= 1:
        raise ValueError(f"scale_range must be < 1 (scales stay positive), got {scale_range!r}")
    items = list(calib_data)
    if not items:
        raise ValueError("calib_data is empty")
    output_fn = output_fn or _default_output
    names = [n for n, m in model.named_modules() if tunable(m) and (include is None or include(n))]
    if not names:
        raise ValueError(
            "model has no weight-only integer QuantLinear layer to tune (quantize "
            "it first, e.g. with quantize_model(..., act_bits=None))"
        )
    if "" in names:
        raise ValueError("model is a single QuantLinear: wrap it in a module")

    with torch.no_grad():
        wanted = [output_fn(call_model(reference, item), item).detach() for item in items]
    tuners: Dict[str, ScaleTuner] = {n: ScaleTuner(model.get_submodule(n), scale_range, bias_lr > 0) for n in names}
    for n, t in tuners.items():
        model.set_submodule(n, t)
    params = [t.a for t in tuners.values()]
    biases = [t.bias for t in tuners.values() if t.bias is not None]
    try:
        with train_only(model, params + biases):

            def loss_of(i: int) -> Tensor:
                got = output_fn(call_model(model, items[i]), items[i]).float()
                want = wanted[i].float()
                if loss == "mse":
                    return F.mse_loss(got, want)
                return (1.0 - F.cosine_similarity(got, want, dim=-1)).mean()

            def mean_loss() -> float:
                with torch.no_grad():
                    return sum(float(loss_of(i)) for i in range(len(items))) / len(items)

            before = mean_loss()
            groups = [{"params": params, "lr": lr, "base": lr}]
            if biases:
                groups.append({"params": biases, "lr": bias_lr, "base": bias_lr})
            opt = torch.optim.Adam(groups)
            total = epochs * len(items)
            gen = torch.Generator().manual_seed(int(seed))
            step = 0
            with torch.enable_grad():
                for _ in range(epochs):
                    for i in torch.randperm(len(items), generator=gen).tolist():
                        for group in opt.param_groups:
                            group["lr"] = group["base"] * 0.5 * (1.0 + math.cos(math.pi * step / total))
                        opt.zero_grad(set_to_none=True)
                        loss_of(i).backward()
                        opt.step()
                        for t in tuners.values():
                            t.clamp_()
                        step += 1
            after = mean_loss()
            if not after < before:
                with torch.no_grad():
                    for p in params:
                        p.fill_(1.0)
                    for t in tuners.values():
                        if t.bias is not None:
                            t.bias.copy_(t.layer.bias)
                after = before
    except BaseException:
        for n, t in tuners.items():  # interrupted: the model as it was
            model.set_submodule(n, t.layer)
        raise
    for n, t in tuners.items():
        model.set_submodule(n, t.export())
    return before, after


__all__: List[str] = ["ScaleTuner", "tune_scales", "tunable", "LOSSES"]
