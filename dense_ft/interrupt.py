"""Ctrl+C and SIGTERM: finish the optimizer step, save a checkpoint, stop; a second Ctrl+C aborts."""

import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """Turns SIGINT/SIGTERM into a checkpoint and a clean stop at the end of the current step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: abort at once
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _requested_anywhere(self, args) -> bool:
        # Every rank must stop at the same step, or the others wait forever in the next all-reduce.
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([float(self.requested)], device=args.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested_anywhere(args):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
