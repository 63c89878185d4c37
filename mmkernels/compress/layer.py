"""One layer of :func:`mmkernels.quantize_model`: smoothing, RTN / GPTQ, optional outlier split,
replacement in the model, and the layer's report row. (``method="signround"`` uses GPTQ here:
for its start point, :meth:`LayerQuantizer.gptq`, and for layers outside the tuned blocks.)"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn.quant_linear import QuantLinear
from ..nn.split_linear import OutlierSplitLinear
from .calibration import LayerStats
from .gptq import GPTQResult, gptq_quantize
from ..quant.metrics import sqnr
from ..quant.quantize import quantize_weight, smoothquant_factors
from .sqnr_report import LayerReport, QuantizationReport
from .smoothing import search_alpha

SEARCH_ROWS = 2048  # calibration rows an alpha candidate is scored on


class LayerQuantizer:
    """Quantizes one target Linear at a time (given its calibration statistics), replaces it in
    ``model`` and appends its row to ``report``. ``cfg``: quantize_model's settings."""

    def __init__(
        self,
        model: nn.Module,
        cfg,
        targets: Dict[str, nn.Linear],
        report: QuantizationReport,
        bar,
        is_vision: Callable[[str], bool],
    ):
        self.model, self.cfg, self.targets, self.report, self.bar = (model, cfg, targets, report, bar)
        self.is_vision = is_vision

    def quantize(self, name: str, stats: Optional[LayerStats]) -> None:
        cfg, linear = self.cfg, self.targets[name]
        w = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach()
        x = stats.samples if stats is not None else None
        H = stats.hessian.H if (stats is not None and stats.hessian is not None) else None
        C = stats.cross if (stats is not None and stats.cross_ok) else None
        absmax = stats.absmax if stats is not None else None
        method = "gptq" if cfg.method == "signround" else cfg.method
        method = method if (method == "rtn" or H is not None) else "rtn (no calib input)"

        k = cfg.outlier_channels if absmax is not None else 0
        if 0 < k < w.shape[1]:
            out_idx = torch.topk(absmax, k).indices.sort().values
            keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
            keep[out_idx] = False
            main, alpha = self._part(w[:, keep], bias, _cols(x, keep), absmax[keep], _sub(H, keep), _sub(C, keep))
            outl, _ = self._part(
                w[:, out_idx],
                None,
                _cols(x, out_idx),
                absmax[out_idx],
                _sub(H, out_idx),
                _sub(C, out_idx),
                smoothing=False,
            )
            module = OutlierSplitLinear(main, outl, out_idx)
        else:
            module, alpha = self._part(w, bias, x, absmax, H, C)
        config = cfg.describe() + (f" +{k} outlier ch" if 0 < k < w.shape[1] else "")
        self.place(name, module, stats, method, config, alpha)

    def gptq(self, name: str, stats: LayerStats) -> GPTQResult:
        """GPTQ of target ``name`` with the configured grid and options (its Hessian from
        ``stats``), without replacing it."""
        cfg = self.cfg
        return gptq_quantize(
            self.targets[name].weight.detach().float(),
            stats.hessian.H,
            cfg.bits,
            cfg.group_size,
            cfg.symmetric,
            percdamp=cfg.percdamp,
            desc_act=cfg.desc_act,
            clip_search=cfg.clip_search,
        )

    def place(
        self,
        name: str,
        module: nn.Module,
        stats: Optional[LayerStats],
        method: str,
        config: Optional[str] = None,
        alpha: Optional[float] = None,
    ) -> None:
        """Replace target ``name`` by ``module`` (quantized elsewhere) and report it; the output
        SQNR is measured on the rows recorded in ``stats``."""
        cfg, linear = self.cfg, self.targets[name]
        w = linear.weight.detach().float()
        x = stats.samples if stats is not None else None
        module.train(linear.training)
        _replace(self.model, name, module)
        row = LayerReport(
            name,
            tuple(w.shape),
            config or cfg.describe(),
            method,
            alpha=alpha,
            vision=self.is_vision(name),
            weight_sqnr=sqnr(w, module.dequantized_weight()),
        )
        if x is not None:
            with torch.no_grad():
                xs = x[: cfg.max_rows].to(linear.weight.dtype)
                row.output_sqnr = sqnr(linear(xs), module(xs))
        self.report.layers.append(row)
        self.bar.update(1)

    def _part(
        self,
        w: Tensor,
        bias: Optional[Tensor],
        x: Optional[Tensor],
        absmax: Optional[Tensor],
        H: Optional[Tensor],
        C: Optional[Tensor] = None,
        smoothing: bool = True,
    ) -> Tuple[QuantLinear, Optional[float]]:
        """One QuantLinear for ``w``: smoothing (fixed or searched alpha), then RTN or GPTQ."""
        cfg = self.cfg
        gptq = cfg.method in ("gptq", "signround")
        if C is not None and H is not None and gptq:
            w = float_target_weight(w, H, C, cfg.percdamp)

        def rtn(wm: Tensor, s: Optional[Tensor]):
            return quantize_weight(wm, cfg.bits, cfg.group_size, cfg.symmetric, fp8=cfg.fp8), None

        def make(wm: Tensor, s: Optional[Tensor]):
            if not gptq or H is None:
                return rtn(wm, s)
            Hs = H if s is None else H / (s.double()[:, None] * s.double()[None, :])
            r = gptq_quantize(
                wm,
                Hs,
                cfg.bits,
                cfg.group_size,
                cfg.symmetric,
                percdamp=cfg.percdamp,
                desc_act=cfg.desc_act,
                clip_search=cfg.clip_search,
            )
            return r.qweight, r.perm

        alpha, smooth = None, None
        if not smoothing:
            pass
        elif cfg.smooth_alpha == "search" and x is not None:
            # Candidates are RTN-quantized (GPTQ per candidate costs ~10x more, and the
            # activation error that alpha trades against does not depend on it), scored on at
            # most SEARCH_ROWS calibration rows spread over all of them.
            xs = x[:: -(-x.shape[0] // SEARCH_ROWS)]
            alpha, smooth, _ = search_alpha(w, bias, xs, absmax, rtn, cfg.act_bits, cfg.alpha_grid)
        elif cfg.smooth_alpha is not None and absmax is not None:
            alpha = float(cfg.smooth_alpha)
            smooth = smoothquant_factors(absmax, w, alpha)
        qw, perm = make(w if smooth is None else w * smooth[None, :], smooth)
        if perm is not None and smooth is not None:
            smooth = smooth[perm]  # QuantLinear divides the *gathered* input
        return QuantLinear.from_quantized(
            qw, bias, act_bits=cfg.act_bits, smooth=smooth, input_perm=perm, backend=cfg.backend
        ), alpha


def float_target_weight(w: Tensor, H: Tensor, C: Tensor, percdamp: float) -> Tensor:
    """``W* = W + W (C - H) (H + d I)^-1``: with ``H = 2/n X~ X~^T`` (inputs of the partly
    quantized model) and ``C = 2/n X X~^T`` (``X``: the float model's inputs for the same tokens),
    ``||W X - W_hat X~||^2 = ||(W* - W_hat) X~||^2 + const`` (exactly when ``d = 0``), so GPTQ on
    ``W*`` with ``H`` minimises the error against the *float* model's output, compensating the
    error the quantized layers before this one introduced (the asymmetric calibration of GPTAQ,
    Li et al. 2025, written as a closed-form target). ``d = percdamp * mean(diag H)`` damps the
    correction only."""
    Hd = H.clone()
    Hd.diagonal().add_(percdamp * torch.diag(H).mean())
    w64 = w.to(torch.float64)
    corr = torch.linalg.solve(Hd, (C - H).T @ w64.T).T  # W (C - H) Hd^-1 (Hd symmetric)
    return (w64 + corr).to(w.dtype)


def _cols(x: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    return None if x is None else x[:, idx]


def _sub(H: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    return None if H is None else H[idx][:, idx]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
