"""Wall-time helpers for the benchmarks, GPU work included (it runs asynchronously)."""

import statistics
import time

import torch
from transformers import TrainerCallback


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(function, repeats: int) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls, after one untimed warm-up call."""
    function()
    durations = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def milliseconds(seconds: float) -> float:
    """``seconds`` in ms to three significant digits: a few microseconds do not round to 0."""
    return float(f"{seconds * 1e3:.3g}")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step of a Trainer."""

    def __init__(self):
        self.durations, self._started = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.durations.append(time.perf_counter() - self._started)
