"""``GuardedTrainingMixin``: a ``transformers.Trainer`` whose faults lose nothing.

- A non-finite loss or gradient norm applies no update and, past the patience, stops the run
  with ``TrainingDiverged`` before anything is saved (``dense_ft.divergence``).
- Every checkpoint is marked complete once whole, with the identity of its run
  (``dense_ft.checkpoints``); a save that fails for space says so in one line, removes what it
  wrote and leaves the previous checkpoint the newest complete one.
"""

import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .checkpoints import full_disk_error, mark_complete
from .divergence import NonFiniteGuard
from .errors import SAVE_ERRORS


class GuardedTrainingMixin:
    """List it before the Trainer class among the bases.

    ``nonfinite_patience``: optimizer steps in a row with a non-finite loss or gradient norm that are
    skipped before the run stops (default 0: stop at the first). ``run_identity``: what the
    checkpoints' markers record, for a later resume to compare.
    """

    def __init__(self, *args, nonfinite_patience: int = 0, run_identity: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonFiniteGuard(nonfinite_patience)
        self.run_identity = run_identity

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.record_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if not self.nonfinite_guard.step_is_sound(grad_norm, self.args, self.state.global_step + 1):
            model.zero_grad(set_to_none=True)  # no update this step: the optimizer skips gradient-less parameters
        return grad_norm

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # The Trainer rotates old checkpoints out at the end of its save; that waits for the marker,
        # or a kill in between would leave no complete checkpoint under --save_total_limit 1.
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        except SAVE_ERRORS as error:
            full = full_disk_error(error, checkpoint, checkpoint, "the incomplete checkpoint was removed and the "
                                   "previous one kept; free some space and run the same command again to resume")
            if full is None:
                raise
            if self.args.should_save:
                shutil.rmtree(checkpoint, ignore_errors=True)
            raise full from error
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()  # every rank's part is written
        if self.args.should_save:
            mark_complete(checkpoint, self.run_identity)
            rotate_checkpoints(run_dir, save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
