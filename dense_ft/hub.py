"""``--push_to_hub``: the output directory goes to the Hub as the run leaves it, model card included.

The repository is created before any work, so a Hub that cannot be reached (offline, no token, a
name it refuses) is one line, not a traceback once the model is loaded. The final push comes after
the model, its card and the metrics are saved and the sparsity is checked; the Trainer's own push at
``save_model`` would come before them, with the Trainer's card.
"""

import os

from huggingface_hub import HfApi
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import INCOMPLETE_PREFIX
from .errors import UserError, first_line


def create_hub_repo(args) -> None:
    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))  # the Trainer's default name
    try:
        HfApi().create_repo(name, token=args.hub_token, private=args.hub_private_repo, exist_ok=True)
    except Exception as error:  # each cause has its own class (network, HTTP status, name validation)
        raise UserError(f"--push_to_hub: cannot create the Hub repository {name}: {first_line(error)}") from None


def push_output_dir(trainer) -> str:
    """Upload the output directory, checkpoints left out; the repository's id."""
    args, repo_id = trainer.args, trainer.hub_model_id
    try:
        HfApi().upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                              token=args.hub_token, revision=args.hub_revision,
                              ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*", f"{INCOMPLETE_PREFIX}*"])
    except Exception as error:
        command = f"hf upload {repo_id} {args.output_dir} --exclude '{PREFIX_CHECKPOINT_DIR}-*'"
        raise UserError(f"the model is saved in {args.output_dir}, but pushing it to {repo_id} failed: "
                        f"{first_line(error)}; push it with: {command}") from None
    return repo_id
