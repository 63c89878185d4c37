"""``quantize_model``: replace a model's ``nn.Linear`` layers by :class:`mmkernels.nn.QuantLinear`.

```
report = mmkernels.quantize_model(model, bits=4, group_size=128, method="gptq",
                                  calib_data=[batch1, batch2, ...])
print(report)            # per-layer table (weight / output SQNR in dB) and a summary line
```

Methods

* ``"rtn"``: round-to-nearest (:func:`~mmkernels.quant.quantize_weight`); no data needed.
* ``"gptq"``: GPTQ (Frantar et al. 2023, :mod:`mmkernels.compress.gptq`); needs ``calib_data``.
* ``"signround"``: SignRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient
  Descent for the Quantization of LLMs", :mod:`mmkernels.compress.signround`); needs
  ``calib_data``, weight-only. Every layer is first GPTQ-quantized (Hessians from one pass of the
  float model; ``desc_act``, ``clip_search``, ``percdamp`` apply), then, one transformer block at
  a time, the rounding of every weight and the group scales are tuned by signed gradient descent
  (``signround_iters`` steps of one calibration item, step size ``signround_lr``) so that the
  block, fed the output of the already-quantized blocks, reproduces the float block's output on
  the float model's stream. Layers outside the block stack (a pooler, a head) keep their GPTQ
  weights; without a block stack the result is GPTQ's. ``sequential`` does not apply.
* ``act_bits=8`` (W8A8) with ``smooth_alpha``: SmoothQuant (Xiao et al. 2023,
  :mod:`mmkernels.compress.smoothing`), a fixed ``alpha`` or ``"search"`` (per layer, by output
  error on the calibration inputs, smoothing off being one of the candidates; candidates are scored
  with RTN weights, the chosen one is then quantized with ``method``).
* ``outlier_channels=k`` (W8A8): each layer's ``k`` input channels with the largest calibrated
  ``max |x|`` get their own W8A8 GEMM (:class:`mmkernels.nn.OutlierSplitLinear`: two QuantLinears,
  both int8 weights and per-token int8 activations, so the small channels' per-token scale is no
  longer set by the outliers).
* GPTQ options: ``desc_act`` (act-order), ``clip_search`` (clipped group grid), ``percdamp``,
  ``float_target`` (minimise the error against the *float* model's layer output, given the
  partly quantized model's input: the asymmetric calibration of GPTAQ, Li et al. 2025; see
  :func:`mmkernels.compress.layer.float_target_weight`; off by default).

Which recipe reaches which accuracy on real weights is measured, not promised here: see the
README's "Accuracy on real weights" table and recipe notes, tests/compress/test_model_accuracy.py
(the floors CI guards) and ``mmkernels bench --family fidelity``.

Calibration order (what the GPTQ paper calls quantizing "sequentially", each layer seeing the
outputs of the layers quantized before it). When the model holds its transformer blocks in an
``nn.ModuleList`` (the one containing most target layers), the procedure is block by block: the
first block's inputs are captured once; inside each block the Linear layers are quantized stage by
stage in execution order (layers fed the same tensor, like q/k/v, form one stage), each stage's
inputs recorded by running the block with the earlier stages already quantized; the block's
quantized output then feeds the next block. Target layers outside that stack (a head, a pooler), or
all layers when there is no such stack (or the block's first input is not positional), are handled
the standard way: one pass of calibration data through the (partly quantized) model with hooks on
every remaining layer, then all of them are quantized. A target Linear that never runs on the
calibration data is quantized with RTN (noted in the report). ``sequential=False`` skips the
block-by-block procedure (one pass for every layer, faster).

Calibration items are run as ``model(item)`` (tensor), ``model(**item)`` (dict) or
``model(*item)`` (tuple / list). Every input row of a Linear counts as a calibration token, except
that a dict item's ``attention_mask`` ``(B, L)`` removes padding positions from the statistics of
layers whose input is ``(B, L, K)``.

Vision towers: a Linear whose qualified name has a component in ``vision_names`` (by default
``vision_tower``, ``vision_model``, ``visual``, ``vision_encoder``, ``image_encoder``) is left in
float unless ``vision=True``; the report summarises vision-tower layers separately.

Errors: every invalid or inconsistent argument raises ``ValueError`` naming it and the value
seen: the weight format (``bits``, ``group_size``, ``act_bits=8`` without 8-bit per-channel
weights, ``fp8`` with anything but symmetric 8-bit RTN), an unknown ``method``, an option that
needs ``calib_data`` without it, or one that does not apply to the chosen method or format
(``smooth_alpha`` / ``outlier_channels`` without W8A8, ``float_target`` outside sequential GPTQ,
``clip_search`` with RTN, ``signround`` with W8A8); a bare ``nn.Linear`` as ``model`` (it cannot
be replaced in place) is refused too.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calibration import block_runner, call_model, capture_block_inputs, collect, run_block, token_mask
from ..quant.packing import VALID_BITS, VALID_GROUP_SIZES
from .layer import LayerQuantizer
from .sqnr_report import LayerReport, QuantizationReport
from .signround import RoundingTuner, block_output, tune_block
from .smoothing import ALPHA_GRID

VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")


@dataclass(frozen=True)
class _Config:
    bits: int
    group_size: Optional[int]
    symmetric: bool
    act_bits: Optional[int]
    method: str
    fp8: bool
    smooth_alpha: Union[None, float, str]
    desc_act: bool
    percdamp: float
    alpha_grid: Tuple[float, ...]
    max_rows: int
    backend: Optional[str]
    vision_names: Tuple[str, ...]
    outlier_channels: int
    float_target: bool
    clip_search: bool
    sequential: bool
    signround_iters: int
    signround_lr: float

    @property
    def needs_absmax(self) -> bool:
        return self.smooth_alpha is not None or self.outlier_channels > 0

    def describe(self) -> str:
        w = "fp8" if self.fp8 else f"int{self.bits}"
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        a = "A8" if self.act_bits else "weight-only"
        return f"{w} {g} {'sym' if self.symmetric else 'asym'} {a}"


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    group_size: Optional[int] = None,
    symmetric: bool = True,
    act_bits: Optional[int] = None,
    method: str = "rtn",
    calib_data: Optional[Iterable] = None,
    include: Union[None, str, Sequence[str]] = None,
    exclude: Union[None, str, Sequence[str]] = None,
    smooth_alpha: Union[None, float, str] = None,
    fp8: bool = False,
    vision: bool = False,
    progress: bool = True,
    *,
    vision_names: Sequence[str] = VISION_TOWER_NAMES,
    desc_act: bool = False,
    percdamp: float = 0.01,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    max_rows: int = 4096,
    outlier_channels: int = 0,
    float_target: bool = False,
    clip_search: bool = False,
    sequential: bool = True,
    signround_iters: int = 200,
    signround_lr: float = 5e-3,
    backend: Optional[str] = None,
) -> QuantizationReport:
    """Replace ``nn.Linear`` modules of ``model`` by ``QuantLinear`` in place; return a
    :class:`~mmkernels.compress.sqnr_report.QuantizationReport` (``print`` it for the table).

    ``bits`` 8 / 4, ``group_size`` None (per channel) / 32 / 64 / 128, ``symmetric``, ``fp8``
    (float8 e4m3, RTN only): the weight format (see ``quantize_weight``). ``act_bits``: None
    (weight-only) or 8 (W8A8, per-token int8 activations; needs 8-bit per-channel weights).
    ``method``: ``"rtn"``, ``"gptq"`` (needs ``calib_data``; ``desc_act``, ``percdamp`` as in
    :func:`~mmkernels.compress.gptq.gptq_quantize`) or ``"signround"`` (SignRound, Cheng et al.
    2023, started from GPTQ; weight-only, needs ``calib_data``; ``signround_iters`` signed
    gradient steps per block at step size ``signround_lr``, see the module docstring and
    :mod:`mmkernels.compress.signround`). ``smooth_alpha`` (W8A8 only, needs
    ``calib_data``): None (no smoothing), an alpha in [0, 1], or ``"search"`` (per layer over
    ``alpha_grid``). ``include`` / ``exclude``: fnmatch patterns (or lists of them) on qualified
    module names (``"encoder.layer.*.attention.*"``); default all. ``vision``: also quantize
    vision-tower layers (see the module docstring). ``max_rows``: calibration input rows kept per
    layer (spread over all the data) for the alpha search and the report's output SQNR.
    ``outlier_channels``, ``float_target``, ``clip_search``, ``sequential``: see the module
    docstring. ``backend``: the QuantLinears' ``qmatmul`` backend (None: automatic).
    """
    if isinstance(model, nn.Linear):
        raise ValueError(
            "model is a single nn.Linear, which quantize_model cannot replace in "
            "place: use mmkernels.nn.QuantLinear.from_linear(linear, ...), or wrap "
            "it in a module (nn.Sequential(linear))"
        )
    cfg = _check_args(
        bits,
        group_size,
        symmetric,
        act_bits,
        method,
        calib_data,
        smooth_alpha,
        fp8,
        desc_act,
        percdamp,
        alpha_grid,
        max_rows,
        backend,
        vision_names,
        outlier_channels,
        float_target,
        clip_search,
        sequential,
        signround_iters,
        signround_lr,
    )
    report = QuantizationReport()
    targets = _select(model, include, exclude, vision, cfg.vision_names, cfg, report)
    items = list(calib_data) if calib_data is not None else None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(targets), desc="quantize", unit="layer", disable=not progress)
    quantizer = LayerQuantizer(model, cfg, targets, report, bar, lambda name: is_vision_name(name, cfg.vision_names))
    try:
        if items is None:
            for name in targets:
                quantizer.quantize(name, None)
        else:
            _calibrated(model, targets, items, quantizer, cfg)
    finally:
        bar.close()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.layers.sort(key=lambda r: order.get(r.name, len(order)))
    return report


# ---------------------------------------------------------------------------------------------
# Arguments and targets
# ---------------------------------------------------------------------------------------------


def _check_args(
    bits,
    group_size,
    symmetric,
    act_bits,
    method,
    calib_data,
    smooth_alpha,
    fp8,
    desc_act,
    percdamp,
    alpha_grid,
    max_rows,
    backend,
    vision_names,
    outlier_channels,
    float_target,
    clip_search,
    sequential,
    signround_iters,
    signround_lr,
) -> _Config:
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be None, 32, 64 or 128, got {group_size!r}")
    if act_bits is not None and (isinstance(act_bits, bool) or act_bits != 8):
        raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
    if act_bits and (bits != 8 or group_size is not None):
        raise ValueError(
            f"act_bits=8 (W8A8) needs bits=8 and group_size=None, got bits={bits}, group_size={group_size}"
        )
    if method not in ("rtn", "gptq", "signround"):
        raise ValueError(f"method must be 'rtn', 'gptq' or 'signround', got {method!r}")
    if method in ("gptq", "signround") and calib_data is None:
        raise ValueError(f"method={method!r} needs calib_data (an iterable of model inputs)")
    if method == "signround":
        if act_bits:
            raise ValueError(f"method='signround' is weight-only: act_bits must be None, got {act_bits!r}")
        if isinstance(signround_iters, bool) or not isinstance(signround_iters, int) or signround_iters < 1:
            raise ValueError(f"signround_iters must be an int >= 1, got {signround_iters!r}")
        if (
            isinstance(signround_lr, bool)
            or not isinstance(signround_lr, (int, float))
            or not 0 < signround_lr < float("inf")
        ):
            raise ValueError(f"signround_lr must be a positive finite float, got {signround_lr!r}")
    if fp8 and (method != "rtn" or bits != 8 or not symmetric):
        raise ValueError(
            f"fp8=True supports method='rtn', bits=8, symmetric=True only, got "
            f"method={method!r}, bits={bits}, symmetric={symmetric}"
        )
    if smooth_alpha is not None:
        if not act_bits:
            raise ValueError("smooth_alpha (SmoothQuant) applies to W8A8: pass act_bits=8")
        if calib_data is None:
            raise ValueError("smooth_alpha needs calib_data to calibrate activation ranges")
        if smooth_alpha != "search" and not (isinstance(smooth_alpha, (int, float)) and 0.0 <= smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha must be None, a float in [0, 1] or 'search', got {smooth_alpha!r}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be positive, got {percdamp!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
    if isinstance(outlier_channels, bool) or not isinstance(outlier_channels, int) or outlier_channels < 0:
        raise ValueError(f"outlier_channels must be an int >= 0, got {outlier_channels!r}")
    if float_target and not sequential:
        raise ValueError("float_target needs sequential=True (block-by-block calibration)")
    if float_target and method != "gptq":
        raise ValueError("float_target applies to method='gptq'")
    if clip_search and method not in ("gptq", "signround"):
        raise ValueError("clip_search applies to method='gptq' or 'signround'")
    if outlier_channels and (not act_bits or calib_data is None):
        raise ValueError("outlier_channels applies to W8A8 (act_bits=8) and needs calib_data")
    return _Config(
        bits,
        group_size,
        symmetric,
        act_bits,
        method,
        fp8,
        smooth_alpha,
        desc_act,
        float(percdamp),
        tuple(float(a) for a in alpha_grid),
        int(max_rows),
        backend,
        tuple(vision_names),
        outlier_channels,
        bool(float_target),
        bool(clip_search),
        bool(sequential),
        int(signround_iters),
        float(signround_lr),
    )


def _patterns(p) -> Tuple[str, ...]:
    if p is None:
        return ()
    return (p,) if isinstance(p, str) else tuple(p)


def is_vision_name(name: str, vision_names: Sequence[str] = VISION_TOWER_NAMES) -> bool:
    """Whether a qualified module name lies inside a vision tower (a dotted component matches)."""
    return any(part in vision_names for part in name.split("."))


def _select(
    model, include, exclude, vision, vision_names, cfg: _Config, report: QuantizationReport
) -> Dict[str, nn.Linear]:
    inc, exc = _patterns(include), _patterns(exclude)
    targets: Dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        in_vision = is_vision_name(name, vision_names)
        shape = tuple(mod.weight.shape)
        why = _unsupported(shape[1], cfg)
        if in_vision and not vision:
            why = "float (vision tower)"
        if why:
            report.layers.append(LayerReport(name, shape, cfg.describe(), cfg.method, vision=in_vision, status=why))
            continue
        targets[name] = mod
    return targets


def _unsupported(k: int, cfg: _Config) -> Optional[str]:
    if cfg.group_size is not None and k % cfg.group_size:
        return f"float (K={k} not a multiple of group_size)"
    if cfg.bits == 4 and k % 2:
        return f"float (int4 needs an even K, K={k})"
    return None


# ---------------------------------------------------------------------------------------------
# Calibration order
# ---------------------------------------------------------------------------------------------


def _find_blocks(model: nn.Module, targets: Dict[str, nn.Linear]):
    """``[(block name, block), ...]`` of the ModuleList holding the most target layers (every
    element holding at least one), or None."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        blocks = [(f"{name}.{i}", b) for i, b in enumerate(mod)]
        counts = [sum(t.startswith(bn + ".") for t in targets) for bn, _ in blocks]
        if min(counts) > 0 and sum(counts) > best_count:
            best, best_count = blocks, sum(counts)
    return best


def _calibrated(model, targets, items, quantizer: LayerQuantizer, cfg: _Config) -> None:
    remaining = list(targets)
    masks = [token_mask(item) for item in items]
    if cfg.method == "signround":
        _signround(model, targets, items, quantizer, cfg, masks)
        return
    blocks = _find_blocks(model, targets) if cfg.sequential else None
    inputs = capture_block_inputs(model, blocks[0][1], items) if blocks else None
    if inputs and all(len(args) > 0 for args, _ in inputs):
        block_masks = masks if len(inputs) == len(items) else None
        fp_inputs = inputs
        for block_name, block in blocks:
            names = [n for n in remaining if n.startswith(block_name + ".")]
            reference = None
            if cfg.float_target:  # the float block, fed the float stream
                fp_block = copy.deepcopy(block)
                fp_layers = {n: fp_block.get_submodule(n[len(block_name) + 1 :]) for n in names}
                reference = (block_runner(fp_block), fp_inputs, fp_layers)
            _stagewise(block_runner(block), inputs, names, quantizer, cfg, block_masks, reference)
            remaining = [n for n in remaining if n not in names]
            inputs = run_block(block, inputs)
            if cfg.float_target:
                fp_inputs = run_block(fp_block, fp_inputs)
    if remaining:  # one pass for the rest (standard GPTQ)
        run = lambda item: call_model(model, item)  # noqa: E731
        got = collect(
            run,
            items,
            {n: targets[n] for n in remaining},
            hessian=cfg.method == "gptq",
            absmax=cfg.needs_absmax,
            max_rows=cfg.max_rows,
            masks=masks,
        )
        for name in remaining:
            quantizer.quantize(name, got.stats.get(name))


def _signround(model, targets, items, quantizer: LayerQuantizer, cfg: _Config, masks) -> None:
    """GPTQ from one pass of the float model, then SignRound block by block (module docstring):
    each block is tuned on the quantized stream's inputs against the float block's outputs on the
    float stream."""
    got = collect(
        lambda item: call_model(model, item),
        items,
        targets,
        hessian=True,
        absmax=False,
        max_rows=cfg.max_rows,
        masks=masks,
    )
    blocks = _find_blocks(model, targets)
    inputs = capture_block_inputs(model, blocks[0][1], items) if blocks else None
    remaining = list(targets)
    if inputs and all(len(args) > 0 for args, _ in inputs):
        block_masks = masks if len(inputs) == len(items) else None
        fp_inputs = inputs
        for index, (block_name, block) in enumerate(blocks):
            names = [n for n in remaining if n.startswith(block_name + ".") and n in got.stats]
            fp_block = copy.deepcopy(block)
            with torch.no_grad():
                wanted = [block_output(fp_block, inp) for inp in fp_inputs]
            tuners = {
                n[len(block_name) + 1 :]: RoundingTuner.from_gptq(quantizer.gptq(n, got.stats[n]), targets[n].bias)
                for n in names
            }
            tune_block(
                block, tuners, inputs, wanted, block_masks, iters=cfg.signround_iters, lr=cfg.signround_lr, seed=index
            )
            for n in names:
                quantizer.place(n, tuners[n[len(block_name) + 1 :]].export(cfg.backend), got.stats[n], "signround")
            remaining = [n for n in remaining if n not in names]
            inputs = run_block(block, inputs)
            fp_inputs = run_block(fp_block, fp_inputs)
    for name in remaining:  # outside the stack (or never ran): GPTQ (RTN)
        quantizer.quantize(name, got.stats.get(name))


def _stagewise(run, inputs, names: List[str], quantizer: LayerQuantizer, cfg: _Config, masks, reference=None):
    """Quantize ``names`` (layers of one block) stage by stage, re-recording each stage's inputs
    with the earlier stages already quantized (paired with the float block's when
    ``reference`` is given)."""
    layers = {n: quantizer.targets[n] for n in names}
    kw = dict(
        hessian=cfg.method == "gptq", absmax=cfg.needs_absmax, max_rows=cfg.max_rows, masks=masks, reference=reference
    )
    first = collect(run, inputs, layers, **kw)
    for i, stage in enumerate(first.stages):
        got = first if i == 0 else collect(run, inputs, {n: layers[n] for n in stage}, **kw)
        for name in stage:
            quantizer.quantize(name, got.stats.get(name))
    for name in first.unused:
        quantizer.quantize(name, None)


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------

__all__ = ["quantize_model", "VISION_TOWER_NAMES", "is_vision_name"]
