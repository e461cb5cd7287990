"""Evaluation: WikiText-style perplexity (the Wanda protocol) and lm-eval zero-shot accuracy."""

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError
from .layerwise import layerwise_nll

ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               progress: bool = True, offload_device=None) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seqlen`` windows; the remainder is dropped.

    With ``offload_device`` the model stays on the CPU and runs there one layer at a time.
    """
    windows = token_ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise UserError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    if offload_device is not None:
        windows = token_ids[:windows * seqlen].view(windows, seqlen)
        return math.exp(layerwise_nll(model, windows, offload_device, offload=True, progress=progress))
    device = next(model.parameters()).device
    total_nll, predicted = 0.0, 0
    for i in tqdm(range(windows), desc="Perplexity", disable=not progress):
        window = token_ids[i * seqlen:(i + 1) * seqlen][None].to(device)
        loss = model(input_ids=window, labels=window, use_cache=False).loss
        total_nll += loss.float().item() * (seqlen - 1)
        predicted += seqlen - 1
    return math.exp(total_nll / predicted)


def zero_shot_task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's ``TaskManager`` (its tasks, and those under ``include_path``), once every one of ``tasks`` is
    known: cheap enough to check before a model is loaded."""
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if not task_manager.match_tasks([task])]
    if unknown:
        raise UserError(f"unknown lm-eval task: {', '.join(map(repr, unknown))}")
    return task_manager


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], task_manager, limit: float | None = None,
              batch_size: int | str = 1) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` (from ``zero_shot_task_manager``), zero-shot, on the in-memory
    model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    return simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                           tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=task_manager)


def accuracies(results: dict) -> dict[str, float]:
    """task -> accuracy (``acc,none``) from lm-eval results."""
    return {task: metrics["acc,none"] for task, metrics in results["results"].items() if "acc,none" in metrics}


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """task -> every numeric metric lm-eval reported (``acc``, ``acc_norm``, their ``_stderr``), filter dropped."""
    return {task: {name.split(",")[0]: value for name, value in metrics.items()
                   if "," in name and isinstance(value, int | float)}
            for task, metrics in results["results"].items()}


def save_lm_eval_results(results: dict, path: str) -> None:
    """lm-eval's own results (configs, versions, metrics with standard errors), without the per-sample logs."""
    import json

    from lm_eval.utils import handle_non_serializable

    with open(path, "w") as f:
        json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2, default=handle_non_serializable)
