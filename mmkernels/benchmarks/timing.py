"""Timing helpers: interleaved repetitions and medians (the machine is shared and noisy)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def median_times(fns: Dict[str, Callable[[], object]], *, warmup: int = 2, min_reps: int = 5,
                 max_reps: int = 40, budget_s: float = 3.0) -> Dict[str, float]:
    """Median seconds per call of each function.

    The functions are timed round-robin (one call of each per round) so that a burst of load on
    the machine hits every contender alike; ratios from one run are what the gates compare.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in samples.items()}
