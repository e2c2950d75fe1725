"""Side-by-side timing for the benchmarks: interleaved runs (A B C A B C …), medians.

These machines are shared and noisy, so every benchmark times its cases in one process,
interleaved, and prints ratios of medians, never an absolute time on its own.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved_medians(cases: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 1,
                        sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each case over ``repeats`` interleaved rounds (after ``warmup`` calls
    of each); ``sync`` (e.g. ``torch.cuda.synchronize``) brackets every timed call."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine_line() -> str:
    """The CPU, torch version and thread count, for the first line of a benchmark's output."""
    return f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
