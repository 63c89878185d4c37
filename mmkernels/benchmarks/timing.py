"""Timing helpers: interleaved repetitions, medians and paired ratios (the machine is shared and
noisy)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List

MIN_SAMPLE_S = 2e-3  # a sample shorter than this is dominated by timer and scheduler noise


def _calls_per_sample(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    return max(1, math.ceil(MIN_SAMPLE_S / max(single, 1e-7)))


def timed_rounds(
    fns: Dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 40,
    budget_s: float = 3.0,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, one sample per function per round.

    The functions are timed round-robin so that a burst of load on the machine hits every
    contender alike; the order is reversed every other round so that no contender always runs
    right after the same neighbour (whose cache footprint or clock boost it would inherit).
    Sample ``i`` of every function comes from round ``i``, so samples can be paired.
    Sub-millisecond functions are called several times per sample (as ``timeit`` does) so that
    each sample lasts at least ``MIN_SAMPLE_S``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calls_per_sample(fn) for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        for name in order if rounds % 2 == 0 else order[::-1]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
        rounds += 1
    return samples


def paired_ratio(numerator: List[float], denominator: List[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``.

    Both lists come from the same rounds of :func:`timed_rounds`. Load that drifts over seconds
    slows both samples of a round alike and cancels in their ratio, so this estimate of a speed-up
    is steadier than the ratio of two medians when the effect measured is a few percent.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(
            f"paired_ratio needs two sample lists of one length, got {len(numerator)} and {len(denominator)}"
        )
    return statistics.median(a / b for a, b in zip(numerator, denominator))
