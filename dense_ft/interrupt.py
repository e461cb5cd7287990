"""Ctrl+C and SIGTERM: finish the optimizer step, save a checkpoint, stop; a second Ctrl+C aborts."""

import signal

from transformers import TrainerCallback

from .ranks import max_over_ranks


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
        if not self._previous:  # once: --auto_find_batch_size begins the loop again after an out-of-memory error
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        """The handlers from before training back: at its end, or after a run that raised (no on_train_end then)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if max_over_ranks(self.requested, args.device):  # every rank stops at the same step
            self.requested = True
            args.save_only_model = False  # a rerun resumes this checkpoint: it needs the optimizer's state too
            control.should_save = True
            control.should_training_stop = True
