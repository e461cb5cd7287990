"""Checkpoints that are complete or absent, and that belong to the run that resumes them.

The Trainer writes a checkpoint file by file: a kill or a full disk in between leaves a
directory that looks like a checkpoint and cannot be loaded. Every checkpoint a
``SparseTrainingMixin`` trainer saves gets a marker, written last, that holds the identity of
its run (model, weights, data, the hyperparameters that define the run). Resuming takes the
newest checkpoint that has one and moves the others aside, where neither a resume nor the
Trainer's rotation of old checkpoints will pick them up.
"""

import errno
import hashlib
import json
import os
import re
import shutil

import torch
from transformers.trainer import SCHEDULER_NAME

from .errors import UserError

MARKER = "dense_ft_checkpoint.json"
INCOMPLETE_PREFIX = "incomplete-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Below this much free space after a failed write, the write failed for space.
_NEARLY_FULL_BYTES = 16 * 2**20


def mark_complete(checkpoint: str, run_identity: dict | None) -> None:
    """Write the marker last, atomically: a checkpoint with a marker is whole."""
    partial = os.path.join(checkpoint, MARKER + ".tmp")
    with open(partial, "w") as file:
        json.dump({"run": run_identity}, file, indent=2, sort_keys=True)
    os.replace(partial, os.path.join(checkpoint, MARKER))


def is_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, MARKER))


def checkpoints_by_step(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` directories of ``output_dir``, oldest step first."""
    found = [(int(match.group(1)), name) for name in os.listdir(output_dir)
             if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_complete_checkpoint(output_dir: str, move_incomplete: bool) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint, and the incomplete ones (moved aside when ``move_incomplete``)."""
    latest, incomplete = None, []
    for checkpoint in checkpoints_by_step(output_dir):
        if is_complete(checkpoint):
            latest = checkpoint
        else:
            incomplete.append(checkpoint)
    if move_incomplete:
        for checkpoint in incomplete:
            os.replace(checkpoint, _aside(checkpoint))
    return latest, incomplete


def _aside(checkpoint: str) -> str:
    directory, name = os.path.split(checkpoint)
    target, n = os.path.join(directory, INCOMPLETE_PREFIX + name), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(directory, f"{INCOMPLETE_PREFIX}{n}-{name}")
    return target


# What a checkpoint given by hand must share with the run that resumes it: what its files hold (an adapter or the
# whole model, the optimizer's state). The rest (learning rate, data, ...) such a resume may change on purpose.
CHECKPOINT_CONTENT_KEYS = ("lora", "optim")


def identity_differences(checkpoint: str, run_identity: dict, keys=None) -> list[str]:
    """How the run recorded in ``checkpoint``'s marker differs from ``run_identity`` (on ``keys``, default all)."""
    marker = os.path.join(checkpoint, MARKER)
    if not os.path.isfile(marker):  # saved by another trainer
        return []
    with open(marker) as file:
        theirs = json.load(file)["run"]
    if theirs is None:  # saved by a trainer that was given no identity
        return []
    return [f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in run_identity.items()
            if (keys is None or key in keys) and theirs.get(key) != value]


def check_belongs_to_run(checkpoint: str, run_identity: dict) -> None:
    """Refuse, in one line, a checkpoint of another run (another model, other data or hyperparameters)."""
    differences = identity_differences(checkpoint, run_identity)
    if differences:
        raise UserError(f"{checkpoint} belongs to another run ({'; '.join(differences)}): pass "
                        "--overwrite_output_dir to start over, or choose another --output_dir")


def check_resumable(checkpoint: str, run_identity: dict) -> None:
    """Refuse, in one line, a checkpoint given by hand whose files this run cannot load."""
    differences = identity_differences(checkpoint, run_identity, CHECKPOINT_CONTENT_KEYS)
    if differences:
        raise UserError(f"--resume_from_checkpoint {checkpoint} holds another kind of run ({'; '.join(differences)}): "
                        "give a checkpoint of a run with the same method and optimizer")


def check_holds_training_state(checkpoint: str) -> None:
    """Refuse, in one line, a checkpoint saved with --save_only_model: the Trainer would resume its weights with the
    optimizer's state and the learning-rate schedule started over."""
    if not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
        raise UserError(f"{checkpoint} holds the model only (--save_only_model), not the optimizer's state and the "
                        f"learning-rate schedule: it cannot resume a run. Fine-tune from it as a new run "
                        f"(--model_name_or_path {checkpoint}), or pass --overwrite_output_dir to start over")


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A hash of every tensor's name, shape, dtype and an evenly strided sample of its values.

    Cheap at any size (no full pass over the weights), and different for a pruned model and its
    dense original, or a model and its fine-tuned copy.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // samples_per_tensor)][:samples_per_tensor]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def out_of_space(error: BaseException, directory: str) -> bool:
    """Whether a failed write failed for space: ENOSPC anywhere in its chain, or a nearly full disk.

    safetensors reports ENOSPC only in its message; torch.save's "unexpected pos" not at all, but
    it leaves its partial file behind, so the disk is still full.
    """
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return free_bytes(directory) < _NEARLY_FULL_BYTES


def full_disk_error(error: BaseException, directory: str, what: str, consequence: str) -> UserError | None:
    """The one line for a save of ``what`` that failed for space (None when it failed for another reason)."""
    if not out_of_space(error, directory):
        return None
    return UserError(f"no space left on the device while saving {what} ({gib(free_bytes(directory))} free): "
                     f"{consequence}")


def free_bytes(directory: str) -> int:
    while not os.path.exists(directory):
        directory = os.path.dirname(os.path.abspath(directory))
    return shutil.disk_usage(directory).free


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def checkpoint_bytes(model: torch.nn.Module, optim: str, adapter_only: bool, save_only_model: bool) -> int:
    """About the size of one checkpoint: the saved weights (all, or the adapters) and AdamW's two moments."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = trainable if adapter_only else list(model.parameters())
    size = sum(p.numel() * p.element_size() for p in saved)
    if not save_only_model:
        size += sum(p.numel() * (2 if "8bit" in optim else 2 * p.element_size()) for p in trainable)
    return size


def check_free_space(output_dir: str, one_checkpoint: int) -> str | None:
    """Refuse when one checkpoint does not fit; a warning (returned) when two do not (rotation holds two)."""
    free = free_bytes(output_dir)
    if free < one_checkpoint:
        raise UserError(f"not enough space for a checkpoint in {output_dir}: {gib(free)} free, one checkpoint "
                        f"takes about {gib(one_checkpoint)}")
    if free < 2 * one_checkpoint:
        return (f"Warning: {gib(free)} free in {output_dir} holds fewer than two checkpoints of about "
                f"{gib(one_checkpoint)}: a save may fail for space before the older checkpoint is rotated out")
    return None
