"""Wall time of every optimizer step of a Trainer, for the benchmarks."""

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.durations, self._started = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time it to its end
        self.durations.append(time.perf_counter() - self._started)
