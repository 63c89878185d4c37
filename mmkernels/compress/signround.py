"""SignRound: block-wise output reconstruction with learned rounding and learned group scales.

Implemented from Cheng, Zhang, Shen, Meng, Lv, Yang, Liu, "Optimize Weight Rounding via Signed
Gradient Descent for the Quantization of LLMs" (2023, arXiv:2309.05516; the AutoRound method).
Each quantized weight is written with a learnable rounding offset ``V`` (one per weight, in
``[-0.5, 0.5]``) and a learnable grid::

    q     = clamp(round(w / s + V) + z, qmin, qmax)
    w_hat = (q - z) * s

and, one transformer block at a time, ``V`` and the grid are optimised to make the block's output
match the float block's: the loss is ``mean ||block_hat(x_hat) - block(x)||^2`` over calibration
tokens (padding excluded), with ``x_hat`` the block's input in the model whose earlier blocks are
already quantized and ``x`` its input in the float model. ``round`` is differentiated with the
straight-through estimator (its gradient taken as 1), and every parameter takes *signed* gradient
steps, ``p -= lr_t * sign(grad)`` with ``lr_t`` decaying linearly to 0 over ``iters`` steps of one
calibration item each (paper, section 3; its default is 200 steps at ``lr = 1 / 200``), followed by
clamping ``V`` to ``[-0.5, 0.5]``. With linear decay the steps of ``V`` sum to ``lr * iters / 2``,
so ``lr = 5e-3`` over 200 steps can move a weight by at most half a grid step: one rounding flip.

Differences from the paper:

* Start point: GPTQ (:mod:`mmkernels.compress.gptq`) instead of round-to-nearest. The weight ``w``
  in the formula above is GPTQ's *latent* (:attr:`GPTQResult.latent`: each column as updated by
  the errors of the columns GPTQ quantized before it, in GPTQ's column order when act-order
  permutes them), ``s`` and ``z`` start as GPTQ's grid, so ``V = 0`` reproduces GPTQ's integers
  exactly and tuning only adds rounding flips that the block output asks for. (The README's
  recipe notes compare the two start points on all-MiniLM-L6-v2.)
* Grid: the paper learns multipliers of the group's min and max (recomputing ``s`` and ``z``);
  here the zero point stays GPTQ's and the scale gets a multiplier ``a`` in
  ``[1 - scale_range, 1 + scale_range]`` (``s = a * s_gptq``), with its own step size
  ``scale_lr`` (GPTQ's grid is already clipped and error-compensated; a min/max multiplier
  would throw that away).
* Safeguard: when a block's loss over the whole calibration set ends above its start, the block
  keeps its start point (the paper keeps the best iterate by minibatch loss instead).
* The result is stored as a plain :class:`QuantizedWeight` (integers, float32 scales, integer zero
  points) that ``qmatmul`` serves unchanged; the exported integers are exactly those of the last
  step's forward pass (same float32 scale, same formula).

:func:`tune_block` is the block-level procedure; :func:`mmkernels.quantize_model` with
``method="signround"`` drives it over a model's transformer blocks.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.quant_linear import QuantLinear
from ..quant.packing import qrange
from .calibration import drop_padding
from .gptq import GPTQResult, _pack
from .trainable import train_only


def _round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class RoundingTuner(nn.Module):
    """Stand-in for one Linear during :func:`tune_block`: ``y = x[..., perm] @ w_hat.T + bias``
    with ``w_hat`` from the learnable rounding ``V`` and scale multiplier ``a`` (module
    docstring). Build it with :meth:`from_gptq`; :meth:`export` gives the QuantLinear."""

    def __init__(
        self,
        latent: Tensor,
        scales: Tensor,
        zeros: Optional[Tensor],
        bits: int,
        group_size: Optional[int],
        bias: Optional[Tensor] = None,
        perm: Optional[Tensor] = None,
        scale_range: float = 0.2,
    ):
        super().__init__()
        n, k = latent.shape
        self.bits, self.group_size = bits, group_size
        self.gs = group_size or k
        self.qmin, self.qmax = qrange(bits, zeros is None)
        self.symmetric = zeros is None
        self.scale_range = float(scale_range)
        self.register_buffer("latent", latent.detach().to(torch.float32).reshape(n, -1, self.gs))
        self.register_buffer("s0", scales.detach().to(torch.float32).clone())
        self.register_buffer(
            "z", torch.zeros_like(self.s0) if zeros is None else zeros.detach().to(torch.float32).clone()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("perm", None if perm is None else perm.clone())
        self.V = nn.Parameter(torch.zeros_like(self.latent))
        self.a = nn.Parameter(torch.ones_like(self.s0))

    @classmethod
    def from_gptq(cls, result: GPTQResult, bias: Optional[Tensor] = None, scale_range: float = 0.2) -> "RoundingTuner":
        if result.latent is None:
            raise ValueError("result must carry GPTQ's latent weights (GPTQResult.latent)")
        qw = result.qweight
        return cls(result.latent, qw.scales, qw.zeros, qw.bits, qw.group_size, bias, result.perm, scale_range)

    def _codes(self, rounding: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor]:
        s = self.s0 * self.a
        q = torch.clamp(rounding(self.latent / s[..., None] + self.V) + self.z[..., None], self.qmin, self.qmax)
        return q, s

    def weight(self) -> Tensor:
        q, s = self._codes(_round_ste)
        return ((q - self.z[..., None]) * s[..., None]).reshape(q.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the parameters back onto their ranges (after each step)."""
        self.V.clamp_(-0.5, 0.5)
        self.a.clamp_(1.0 - self.scale_range, 1.0 + self.scale_range)

    @torch.no_grad()
    def export(self, backend: Optional[str] = None) -> QuantLinear:
        """The tuned weight as a QuantLinear (same integers and float32 scales as the forward)."""
        q, s = self._codes(torch.round)
        n = q.shape[0]
        qweight = _pack(
            q.reshape(n, -1).to(torch.float64),
            s.to(torch.float32),
            None if self.symmetric else self.z,
            self.bits,
            self.group_size,
        )
        return QuantLinear.from_quantized(qweight, self.bias, input_perm=self.perm, backend=backend)


def block_output(block: nn.Module, inp: Tuple[tuple, dict]) -> Tensor:
    """``block(*args, **kwargs)`` (the first element when it returns a tuple)."""
    args, kwargs = inp
    y = block(*args, **kwargs)
    return y[0] if isinstance(y, (tuple, list)) else y


def tune_block(
    block: nn.Module,
    tuners: Dict[str, RoundingTuner],
    inputs: Sequence[Tuple[tuple, dict]],
    targets: Sequence[Tensor],
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    iters: int = 200,
    lr: float = 5e-3,
    scale_lr: float = 1e-3,
    seed: int = 0,
) -> Tuple[float, float]:
    """SignRound on one block: ``tuners`` maps submodule names of ``block`` (its Linear layers)
    to their :class:`RoundingTuner`; they are swapped in, tuned for ``iters`` signed-gradient
    steps (each on one calibration item drawn with a generator seeded by ``seed``) so that
    ``block(inputs[i])`` matches ``targets[i]`` (tokens where ``masks[i]`` is non-zero, when the
    output is ``(B, L, C)`` and the mask ``(B, L)``), and left in place (call their ``export``).
    The block's own parameters are not changed (their ``requires_grad`` is restored). If the
    mean loss over all of ``inputs`` ends higher than it started, the tuners are reset to their
    start point (``V = 0``, ``a = 1``). Returns the mean calibration loss before and after."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    for name, value in (("lr", lr), ("scale_lr", scale_lr)):
        if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(
            f"inputs and targets must be non-empty and of the same length, got {len(inputs)} and {len(targets)}"
        )
    masks = list(masks) if masks is not None else [None] * len(inputs)
    for name, tuner in tuners.items():
        block.set_submodule(name, tuner)
    with train_only(block, [p for t in tuners.values() for p in (t.V, t.a)]):

        def loss_of(i: int) -> Tensor:
            out = drop_padding(block_output(block, inputs[i]), masks[i])
            return F.mse_loss(out.float(), drop_padding(targets[i], masks[i]).float())

        def mean_loss() -> float:
            with torch.no_grad():
                return sum(float(loss_of(i)) for i in range(len(inputs))) / len(inputs)

        before = mean_loss()
        rounding = [t.V for t in tuners.values()]
        scales = [t.a for t in tuners.values()]
        gen = torch.Generator().manual_seed(int(seed))
        with torch.enable_grad():
            for step in range(iters):
                i = int(torch.randint(len(inputs), (1,), generator=gen))
                for p in rounding + scales:
                    p.grad = None
                loss_of(i).backward()
                decay = 1.0 - step / iters
                with torch.no_grad():
                    for params, rate in ((rounding, lr), (scales, scale_lr)):
                        for p in params:
                            if p.grad is not None:
                                p.sub_(rate * decay * torch.sign(p.grad))
                for t in tuners.values():
                    t.clamp_()
        for p in rounding + scales:
            p.grad = None
        after = mean_loss()
        if after > before:  # keep the start point (GPTQ) when tuning did not help
            with torch.no_grad():
                for p in rounding:
                    p.zero_()
                for p in scales:
                    p.fill_(1.0)
            after = before
        return before, after


__all__: List[str] = ["RoundingTuner", "tune_block", "block_output"]
