"""The report :func:`mmkernels.quantize_model` returns: one row per Linear, and a summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LayerReport:
    """One Linear. ``weight_sqnr``: SQNR (dB) of the effective weight (smoothing and column
    permutation undone) against the float weight; ``output_sqnr``: SQNR (dB) of the QuantLinear's
    output (the real ``qmatmul`` path, activations quantized when W8A8) against the float layer's
    on the recorded calibration inputs (``None`` without calibration data). ``status``:
    ``"quantized"``, or why the layer was left in float."""

    name: str
    shape: tuple
    config: str
    method: str
    weight_sqnr: Optional[float] = None
    output_sqnr: Optional[float] = None
    alpha: Optional[float] = None
    vision: bool = False
    status: str = "quantized"

    @property
    def quantized(self) -> bool:
        return self.status == "quantized"


@dataclass
class QuantizationReport:
    """``str(report)``: the per-layer table and the summary; ``report.layers``: the rows."""

    layers: List[LayerReport] = field(default_factory=list)

    def quantized(self, vision: Optional[bool] = None) -> List[LayerReport]:
        return [r for r in self.layers if r.quantized and (vision is None or r.vision == vision)]

    def skipped(self) -> List[LayerReport]:
        return [r for r in self.layers if not r.quantized]

    def summary(self) -> str:
        parts = [_summary("quantized", self.quantized(vision=False))]
        vision_q = self.quantized(vision=True)
        if vision_q:
            parts.append(_summary("vision tower", vision_q))
        vision_skipped = [r for r in self.skipped() if r.vision]
        if vision_skipped:
            parts.append(
                f"vision tower: {len(vision_skipped)} Linear layers left in float (pass vision=True to quantize them)"
            )
        other = [r for r in self.skipped() if not r.vision]
        if other:
            parts.append(
                f"left in float: {len(other)} ({', '.join(r.name for r in other[:4])}"
                f"{' ...' if len(other) > 4 else ''})"
            )
        return "; ".join(parts)

    def __str__(self) -> str:
        header = ("layer", "shape (N, K)", "format", "method", "alpha", "weight SQNR dB", "output SQNR dB")
        rows = [
            (
                r.name + (" [vision]" if r.vision else ""),
                f"{r.shape[0]}x{r.shape[1]}",
                r.config if r.quantized else r.status,
                r.method if r.quantized else "-",
                "-" if r.alpha is None else f"{r.alpha:.2f}",
                _db(r.weight_sqnr),
                _db(r.output_sqnr),
            )
            for r in self.layers
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [self.summary()])

    def __repr__(self) -> str:
        return f"QuantizationReport({len(self.layers)} layers: {self.summary()})"


def _db(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def _summary(label: str, rows: List[LayerReport]) -> str:
    if not rows:
        return f"{label}: 0 Linear layers"
    w = [r.weight_sqnr for r in rows]
    text = (
        f"{label}: {len(rows)} Linear layers, weight SQNR mean {_mean(w):.1f} dB "
        f"(min {min(w):.1f} dB, {rows[w.index(min(w))].name})"
    )
    out = [r.output_sqnr for r in rows if r.output_sqnr is not None]
    if out:
        worst = min(out)
        name = next(r.name for r in rows if r.output_sqnr == worst)
        text += f", output SQNR mean {_mean(out):.1f} dB (min {worst:.1f} dB, {name})"
    return text


def _mean(values) -> float:
    finite = [v for v in values if not math.isinf(v)]
    return sum(finite) / len(finite) if finite else math.inf
