"""A diverged run stops before anything of it is saved.

The Trainer would go on: its ``logging_nan_inf_filter`` hides a NaN loss from the log, the
optimizer writes NaN into every weight, and the run ends "successfully". Here a step whose
loss or gradient norm is not finite, or whose gradient norm is exactly zero (a collapsed model,
as after a far too high learning rate: its loss stays flat at ln(vocabulary)), applies no
update (its gradients are dropped, and the optimizer skips parameters without one); after
``patience`` such steps in a row the run stops with ``TrainingDiverged``, which names the step
and what to try. Under fp16 a non-finite gradient norm is the loss scaler's business (it skips
the step and lowers the scale), so it does not count there.
"""

import torch

from .errors import UserError
from .ranks import max_over_ranks

_SOUND, _NOT_FINITE, _ZERO_GRADIENT = 0, 1, 2
_PROBLEMS = {_NOT_FINITE: "the loss or gradient norm is not finite",
             _ZERO_GRADIENT: "the gradient norm is zero (the model has collapsed and no longer learns)"}


class TrainingDiverged(UserError):
    """The loss or the gradient norm stopped being finite, or every gradient vanished."""


class NonFiniteGuard:
    def __init__(self, patience: int = 0):
        if patience < 0:
            raise UserError(f"--nonfinite_patience must be 0 or more, got {patience}")
        self.patience = patience
        self.bad_steps = 0
        self._loss_not_finite = None  # over the micro-batches, on the loss's device: no sync per micro-batch

    def record_loss(self, loss: torch.Tensor) -> None:
        not_finite = ~torch.isfinite(loss.detach()).all()
        self._loss_not_finite = not_finite if self._loss_not_finite is None else self._loss_not_finite | not_finite

    def _problem(self, grad_norm, args) -> torch.Tensor:
        flag, self._loss_not_finite = self._loss_not_finite, None
        problem = torch.zeros(()) if flag is None else flag.float() * _NOT_FINITE
        if grad_norm is None:
            return problem
        if hasattr(grad_norm, "full_tensor"):  # FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm, device=problem.device)
        if not args.fp16:
            problem = torch.maximum(problem, (~torch.isfinite(grad_norm)).float() * _NOT_FINITE)
        return torch.maximum(problem, (grad_norm == 0).float() * _ZERO_GRADIENT)

    def step_is_sound(self, grad_norm, args, step: int) -> bool:
        """Once per optimizer step, before it: False when the step must not update; raises past the patience."""
        problem = int(max_over_ranks(self._problem(grad_norm, args), args.device))
        if problem == _SOUND:
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        if self.bad_steps > self.patience:
            raise TrainingDiverged(
                f"{_PROBLEMS[problem]} at step {step}: training stopped and no final model was saved (earlier "
                f"checkpoints are kept). Try a lower --learning_rate (this run: {args.learning_rate:g})"
                + (", or --bf16 instead of --fp16" if args.fp16 else "")
                + "; --nonfinite_patience N skips up to N such steps in a row")
        return False
