"""Timing helpers: interleaved repetitions and medians (the machine is shared and noisy)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict

MIN_SAMPLE_S = 2e-3  # a sample shorter than this is dominated by timer and scheduler noise


def _calls_per_sample(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    return max(1, math.ceil(MIN_SAMPLE_S / max(single, 1e-7)))


def median_times(fns: Dict[str, Callable[[], object]], *, warmup: int = 2, min_reps: int = 5,
                 max_reps: int = 40, budget_s: float = 3.0) -> Dict[str, float]:
    """Median seconds per call of each function.

    The functions are timed round-robin (one sample of each per round) so that a burst of load on
    the machine hits every contender alike; ratios from one run are what the gates compare.
    Sub-millisecond functions are called several times per sample (as ``timeit`` does) so that
    each sample lasts at least ``MIN_SAMPLE_S``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calls_per_sample(fn) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
        rounds += 1
    return {name: statistics.median(ts) for name, ts in samples.items()}
