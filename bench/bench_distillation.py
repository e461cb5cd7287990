"""Recovery with distillation from the dense model against plain fine-tuning, at two budgets.

On the embedded default (SmolLM2-135M pruned by Wanda to 20% of its 16x16 blocks, as ``make demo``
does) each loss trains through ``dense_ft/finetune.py`` with the same data, seed (``--seed``) and
constant learning rate (``--learning_rate``), steps of the demo's size (2 x 256 tokens,
accumulated 4 times); the teacher is the dense model itself. Perplexity is the validation loss the
Trainer measures every ``--eval_steps`` (``--eval_samples`` sequences of 256 tokens), read at each
of ``--budgets`` (by default 40 steps, the demo's until 2026-12-07, and 4x it, from one run: the
learning rate is constant, so step N of the long run is an N-step run). Training time excludes
evaluations (train_runtime minus every eval_runtime); peak RSS comes from ``/usr/bin/time``. Cross-entropy
trains longer (``--ce_steps``), so that it can be read at the wall time each distillation run
took: "CE at equal time"; ``--ce_results`` reads it from an earlier run's JSON line instead, and
``--losses ''`` trains CE alone, so the runs of a long budget can be spread over several sittings.
``--teacher_model_init_kwargs`` loads the teacher with them (finetune.py's flag: a 4-bit teacher, say).
``--train_samples N`` trains on the first N sequences only, so that a budget runs over several
epochs (the regime where cross-entropy overfits). Every run is one JSON line, with the CPU's
vector capability, the learning rate, the training set's size, the seed and the validation set's
size: a CE line that differs in one of them is refused before anything trains (CPUs of another
vector capability step at other speeds and round differently).

    PYTHONPATH=scripts .venv/bin/python bench/bench_distillation.py [--budgets 40 --ce_steps 76]
"""

import argparse
import itertools
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from bench_lora_recovery import prune_embedded, run
from prepare_embedded import corpus_dir, model_dir

COMMON = ["--dataset_dir", str(corpus_dir()), "--block_size", "256", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "4",
          "--lr_scheduler_type", "constant", "--logging_steps", "4",
          "--eval_strategy", "steps", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
CPU = torch.backends.cpu.get_cpu_capability()
SETTINGS = ("learning_rate", "train_samples", "seed", "eval_samples")  # a ``--ce_results`` line must share


def train(pruned: Path, output: Path, steps: int, args: argparse.Namespace, *extra) -> dict:
    """Validation perplexity by step, training seconds per step, peak RSS, the CPU and data it ran on."""
    data = ["--max_train_samples", args.train_samples] if args.train_samples else []
    _, _, peak_gib = run([sys.executable, "dense_ft/finetune.py", "--model_name_or_path", pruned, "--output_dir",
                          output, *COMMON, *data, "--learning_rate", args.learning_rate, "--seed", args.seed,
                          "--max_steps", steps, "--eval_steps", args.eval_steps,
                          "--max_eval_samples", args.eval_samples, *extra],
                         timed=True)
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    evaluations = {record["step"]: math.exp(record["eval_loss"]) for record in history if "eval_loss" in record}
    runtime = next(record["train_runtime"] for record in history if "train_runtime" in record)
    training = runtime - sum(record["eval_runtime"] for record in history if "eval_runtime" in record)
    return {"perplexity_by_step": evaluations, "seconds_per_step": training / steps, "peak_rss_gib": peak_gib,
            "cpu": CPU, **{setting: getattr(args, setting) for setting in SETTINGS}}


def read_ce_line(path: Path, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """An earlier run's CE line, if it ran on a CPU like this one and with the same settings."""
    ce = json.loads(path.read_text())
    for setting in SETTINGS:
        theirs = ce.get(setting, parser.get_default(setting))  # lines older than a setting ran at its default
        if theirs != getattr(args, setting):
            raise SystemExit(f"{path} trained with --{setting} {theirs}, this run with {getattr(args, setting)}: "
                             "the curves do not compare")
    if "cpu" not in ce:
        print(f"warning: {path} does not say which CPU it ran on; its times are read as if it were this one ({CPU})",
              file=sys.stderr)
    elif ce["cpu"] != CPU:
        raise SystemExit(f"{path} ran on an {ce['cpu']} CPU, this one is {CPU}: its time per step does not compare")
    ce["perplexity_by_step"] = {int(step): value for step, value in ce["perplexity_by_step"].items()}
    return ce


def at_time(curve: dict, seconds_per_step: float, seconds: float) -> float | None:
    """The perplexity of a run at ``seconds`` of training, linear between its evaluations."""
    points = sorted((step * seconds_per_step, value) for step, value in curve.items())
    for (t0, p0), (t1, p1) in itertools.pairwise(points):
        if t0 <= seconds <= t1:
            return p0 + (p1 - p0) * (seconds - t0) / (t1 - t0)
    return None  # beyond the run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="40,160", help="optimizer steps at which to compare the losses")
    parser.add_argument("--ce_steps", type=int, default=304, help="steps of the cross-entropy run")
    parser.add_argument("--ce_results", type=Path, help="the CE line of an earlier run, instead of training CE")
    parser.add_argument("--losses", default="kl+ce,squarehead,kl", help="distillation losses; '' trains CE alone")
    parser.add_argument("--eval_steps", type=int, default=10)
    parser.add_argument("--eval_samples", type=int, default=48)
    parser.add_argument("--train_samples", type=int, help="train on the first N sequences, for several epochs")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="constant, for every loss")
    parser.add_argument("--seed", type=int, default=0, help="the order of the training sequences")
    parser.add_argument("--teacher_model_init_kwargs", help="JSON: the teacher's from_pretrained arguments")
    args = parser.parse_args()
    budgets = [int(budget) for budget in args.budgets.split(",")]
    ce = read_ce_line(args.ce_results, args, parser) if args.ce_results else None
    with tempfile.TemporaryDirectory(prefix="distillation_") as work:
        compare_losses(Path(work), ce, budgets, args)


def compare_losses(work: Path, ce: dict | None, budgets: list[int], args: argparse.Namespace):
    """Train CE (unless given) and each distillation loss from the pruned embedded default, a JSON line each."""
    pruned = prune_embedded(work)
    if ce is None:
        ce = train(pruned, work / "ce", args.ce_steps, args)
        print(json.dumps({"loss": "ce", **ce}), flush=True)
    teacher = ["--teacher_model", model_dir()]
    if args.teacher_model_init_kwargs:
        teacher += ["--teacher_model_init_kwargs", args.teacher_model_init_kwargs]
    for loss in filter(None, args.losses.split(",")):
        result = train(pruned, work / loss, max(budgets), args, *teacher, "--distill_loss", loss)
        if not math.isclose(result["perplexity_by_step"][0], ce["perplexity_by_step"][0], rel_tol=1e-4):
            raise SystemExit(f"{loss}: the perplexity before fine-tuning is not CE's: another model or validation set")
        row = {"loss": loss, **result, "teacher_model_init_kwargs": args.teacher_model_init_kwargs,
               "time_vs_ce": result["seconds_per_step"] / ce["seconds_per_step"]}
        for budget in budgets:
            row[f"ce_at_equal_time_{budget}"] = at_time(ce["perplexity_by_step"], ce["seconds_per_step"],
                                                        budget * result["seconds_per_step"])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
