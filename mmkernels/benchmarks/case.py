"""The benchmark case every family builds (attention, reduce, quant, models, qmatmul_gpu) and
:mod:`mmkernels.benchmarks.report` runs: inputs built once, the contenders as zero-argument
callables (ours under ``"mmkernels"``), optionally a function measuring our max error against the
float64 oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional


@dataclass
class Case:
    """``id`` names the case in tables and gates.toml; ``contenders`` maps a name to a
    zero-argument callable (``"mmkernels"`` is ours, the others are peers timed in the same
    rounds); ``error()`` returns our max error against the oracle; ``flops`` gives GFLOP/s in the
    table; ``meta`` carries family-specific extras (the models family's fidelity numbers)."""

    id: str
    description: str
    contenders: Dict[str, Callable[[], object]]
    error: Optional[Callable[[], float]] = None
    flops: float = 0.0
    meta: Dict[str, object] = field(default_factory=dict)
    # Seconds of timing for this case (None: the run's default) and the most rounds it may take
    # (None: timing.timed_rounds' default). Cases whose gate measures a small effect get more
    # rounds so that the median of the paired ratios settles.
    budget_s: Optional[float] = None
    max_rounds: Optional[int] = None
