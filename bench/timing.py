"""Side-by-side timing: every candidate warmed up once, then run in interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _timed(function: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved_medians(candidates: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds per candidate; interleaving spreads machine noise evenly over them."""
    for function in candidates.values():  # warm-up: allocator, first-call caches, preview map fit
        function()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(runs):
        for name, function in candidates.items():
            times[name].append(_timed(function))
    return {name: statistics.median(values) for name, values in times.items()}
