"""Prune a causal LM with Wanda in 16x16 blocks, then evaluate it.

    python main_block.py --model meta-llama/Llama-2-7b-hf --sparsity_ratio 0.2 \
        --save out/llama2_7b/block_16x16_20sparsity/wanda \
        --save_model out/llama2_7b/block_16x16_20sparsity/wanda/pruned_model

``--sparsity_ratio 0`` (the default) only evaluates: WikiText-2 perplexity, and zero-shot
accuracy with ``--eval_zero_shot``.
"""

import argparse
import json
import os
import time

import torch

from .errors import SAVE_ERRORS, UserError, exit_on_user_error, first_line, out_of_memory_as_user_error
from .evaluation import (
    ZERO_SHOT_TASKS,
    accuracies,
    perplexity,
    save_lm_eval_results,
    task_metrics,
    zero_shot,
    zero_shot_task_manager,
)
from .layerwise import check_decoder_layout
from .model_card import write_model_card
from .modeling import check_vocabulary, default_device, load_model, save_model
from .output_dir import check_not_an_input, check_output_path
from .sparsity import check_sparsity
from .text import joined_text, load_corpus
from .versions import check_installed_versions
from .wanda import calibration_windows, check_prunable, prune_wanda_blocks


def lm_eval_batch_size(value: str) -> int | str:
    if value == "auto" or value.startswith("auto:"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer or auto, got {value!r}")
    return int(value)


def available_device(value: str) -> str:
    """``cpu``, or a device of the accelerator that this PyTorch can use (``cuda``, ``cuda:1``, ...)."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cpu":
        return value
    if not torch.accelerator.is_available() or torch.accelerator.current_accelerator().type != device.type:
        raise argparse.ArgumentTypeError(f"{value}: this PyTorch has no usable {device.type} device")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{value}: this machine has {count} {device.type} device(s), numbered from 0")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hub id or local directory of the model")
    parser.add_argument("--cache_dir", help="where the model and corpora fetched from the Hub are stored (default, "
                                            "and for lm-eval's task data: the Hugging Face cache)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the code the model comes with, for an architecture transformers does not hold "
                             "(read it first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--sparsity_ratio", type=float, default=0.0, help="fraction of blocks to prune, in [0, 1)")
    parser.add_argument("--block_size", type=int, default=16, help="side of the square pruning blocks")
    parser.add_argument("--save", help="directory for the log and results.json")
    parser.add_argument("--save_model", help="directory for the pruned model (a normal HF directory)")
    parser.add_argument("--eval_zero_shot", action="store_true", help="also run lm-eval zero-shot tasks")
    parser.add_argument("--calib_dataset", default="wikitext2",
                        help="'wikitext2' (Hub wikitext-2-raw-v1) or a directory with wiki.{train,valid,test}.raw")
    parser.add_argument("--eval_dataset", default="wikitext2", help="as --calib_dataset; its test split is evaluated")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default: the model's max_position_embeddings)")
    parser.add_argument("--max_eval_windows", type=int, help="evaluate at most this many windows")
    parser.add_argument("--device", default=default_device(), type=available_device,
                        help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--offload", action="store_true",
                        help="keep the weights on the CPU and bring one decoder layer at a time to --device "
                             "(chosen by itself on a GPU that cannot hold the model)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--tasks", default=",".join(ZERO_SHOT_TASKS), help="comma-separated lm-eval tasks")
    parser.add_argument("--include_path", help="extra folder of lm-eval task definitions")
    parser.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction)")
    parser.add_argument("--eval_batch_size", default="1", type=lm_eval_batch_size,
                        help="lm-eval batch size: a number, or auto (the largest that fits)")
    args = parser.parse_args(argv)
    if not 0 <= args.sparsity_ratio < 1:
        parser.error(f"--sparsity_ratio must be in [0, 1), got {args.sparsity_ratio}")
    for flag in ("nsamples", "block_size", "seqlen", "max_eval_windows"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag} must be positive, got {value}")
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if args.eval_zero_shot and not args.tasks:
        parser.error("--tasks names no task")
    if args.include_path and not os.path.isdir(args.include_path):
        parser.error(f"--include_path {args.include_path} is not a directory")
    if args.limit is not None and not args.limit > 0:
        parser.error(f"--limit must be positive (examples per task, or a fraction of them below 1), got {args.limit}")
    if args.offload and args.eval_zero_shot:
        parser.error("--eval_zero_shot needs the whole model on one device: drop --offload, or run lm-eval "
                     "on the saved model over several GPUs (--model_args parallelize=True)")
    if args.dtype == "auto":
        args.dtype = "float32" if torch.device(args.device).type == "cpu" else "float16"
    return args


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def does_not_fit(model, device: str, activation_bytes: int) -> bool:
    """Whether a GPU lacks the free memory for the weights plus the calibration activations."""
    if not device.startswith("cuda"):
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return weight_bytes + activation_bytes > free


def place_model(model, args: argparse.Namespace, seqlen: int) -> bool:
    """Move the model to --device, or leave it on the CPU for layer offload; True when offloading."""
    windows = args.nsamples if args.sparsity_ratio > 0 else 1
    activation_bytes = windows * seqlen * model.config.hidden_size * model.dtype.itemsize
    offload = args.offload or does_not_fit(model, args.device, activation_bytes)
    if offload and args.eval_zero_shot:
        raise UserError(f"the model does not fit on {args.device}, and --eval_zero_shot needs it whole on one device: "
                        "run lm-eval on the saved model over several GPUs (--model_args parallelize=True)")
    if offload:
        check_decoder_layout(model)
        print(f"Layer offload: the weights stay on the CPU; each decoder layer comes to {args.device} in turn "
              f"(calibration activations: {activation_bytes / 2**30:.2f} GiB on {args.device})")
    else:
        model.to(args.device)
    return offload


def run(args: argparse.Namespace) -> dict:
    for path, flag in ((args.save, "--save"), (args.save_model, "--save_model"), (args.cache_dir, "--cache_dir")):
        if path:
            check_output_path(path, flag)  # before the work, not after it
    if args.save_model:
        check_not_an_input(args.save_model, "--save_model", {"--model": args.model})
    task_manager = zero_shot_task_manager(args.tasks, args.include_path) if args.eval_zero_shot else None
    calib = (load_corpus(args.calib_dataset, splits=("train",), cache_dir=args.cache_dir)
             if args.sparsity_ratio > 0 else None)
    evaluation = load_corpus(args.eval_dataset, splits=("test",), cache_dir=args.cache_dir)
    model, tokenizer = load_model(args.model, args.dtype, cache_dir=args.cache_dir,
                                  trust_remote_code=args.trust_remote_code)
    check_vocabulary(model, tokenizer, args.model)
    model.eval()
    seqlen = args.seqlen or model.config.max_position_embeddings
    if seqlen > model.config.max_position_embeddings:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {model.config.max_position_embeddings} positions")
    args.offload = place_model(model, args, seqlen)  # also when chosen here: the model does not fit the device

    results = {"model": args.model, "sparsity_ratio": args.sparsity_ratio, "block_size": args.block_size,
               "eval_dataset": args.eval_dataset, "seqlen": seqlen}
    if args.sparsity_ratio > 0:
        check_prunable(model, args.block_size, args.sparsity_ratio)
        started = time.perf_counter()
        windows = calibration_windows(token_ids(tokenizer, " ".join(calib["train"]["text"])),
                                      args.nsamples, seqlen, args.seed)
        prune_wanda_blocks(model, windows, args.sparsity_ratio, args.block_size, args.device, args.offload,
                           calibration={"dataset": args.calib_dataset, "seed": args.seed})
        results.update(calib_dataset=args.calib_dataset, nsamples=args.nsamples, seed=args.seed, offload=args.offload,
                       pruning_seconds=round(time.perf_counter() - started, 2))
    results["actual_sparsity"] = check_sparsity(model)
    print(f"sparsity sanity check {results['actual_sparsity']:.4f}")

    test_ids = token_ids(tokenizer, joined_text(evaluation, "test", "\n\n"))
    results["perplexity"] = perplexity(model, test_ids, seqlen, args.max_eval_windows,
                                       offload_device=args.device if args.offload else None)
    print(f"wikitext perplexity {results['perplexity']:.4f}")

    save_outputs(args, model, tokenizer, results)
    if task_manager is not None:
        add_zero_shot(args, model, tokenizer, task_manager, results)
    return results


def save_outputs(args: argparse.Namespace, model, tokenizer, results: dict) -> None:
    if args.save:  # first: a model save that fails must not lose the figures
        write_results(results, args.save)
        print(f"Results saved to {os.path.join(args.save, 'results.json')}")
    if args.save_model:
        save_pruned_model(args, model, tokenizer, results)


def add_zero_shot(args: argparse.Namespace, model, tokenizer, task_manager, results: dict) -> None:
    """Zero-shot accuracy, added to what is saved already: an evaluation that fails loses nothing."""
    try:
        lm_eval_results = zero_shot(model, tokenizer, args.tasks, task_manager, args.limit, args.eval_batch_size)
    except OSError as error:  # a task's data out of reach (no Hub) or unreadable
        saved = ", ".join(path for path in (args.save, args.save_model) if path)
        raise UserError(f"zero-shot evaluation failed: {first_line(error)}"
                        + (f" (saved before it: {saved})" if saved else "")) from error
    from lm_eval.utils import make_table

    print(make_table(lm_eval_results))
    results["zero_shot"] = accuracies(lm_eval_results)
    results["zero_shot_metrics"] = task_metrics(lm_eval_results)
    if args.save:
        save_lm_eval_results(lm_eval_results, os.path.join(args.save, "lm_eval_results.json"))
        write_results(results, args.save)
        print(f"Zero-shot accuracy added to {os.path.join(args.save, 'results.json')}")
    if args.save_model:
        write_pruned_card(args, model, results)


def save_pruned_model(args: argparse.Namespace, model, tokenizer, results: dict) -> None:
    try:
        save_model(model, tokenizer, args.save_model)
    except SAVE_ERRORS as error:
        raise UserError(f"cannot save the model to {args.save_model}: {first_line(error)}"
                        + (f" (the results are saved in {args.save})" if args.save else "")) from error
    write_pruned_card(args, model, results)
    print(f"Pruned model saved to {args.save_model}" if args.sparsity_ratio > 0 else
          f"Model saved to {args.save_model} (not pruned: --sparsity_ratio 0)")


def write_pruned_card(args: argparse.Namespace, model, results: dict) -> None:
    pruned = args.sparsity_ratio > 0
    title = (f"{os.path.basename(args.model.rstrip('/'))}, {args.block_size}x{args.block_size} Wanda blocks, "
             f"{args.sparsity_ratio:.0%} pruned" if pruned else f"{os.path.basename(args.model.rstrip('/'))}")
    data = (f"Calibration: {args.nsamples} windows of {results['seqlen']} tokens from {args.calib_dataset} "
            f"(seed {args.seed}). " if pruned else "") + f"Evaluation: the test split of {args.eval_dataset}."
    recipe = {"method": "Wanda block pruning" if pruned else "none (evaluated only)",
              "sparsity ratio": args.sparsity_ratio, "block size": args.block_size, "dtype": args.dtype,
              "layer offload": results.get("offload", False), "pruning seconds": results.get("pruning_seconds", "-")}
    scores = {f"perplexity (seqlen {results['seqlen']})": results["perplexity"],
              **{f"{task} accuracy (zero-shot)": value for task, value in results.get("zero_shot", {}).items()}}
    write_model_card(args.save_model, title, args.model, model.config, data, recipe, scores,
                     {"sparsity of the prunable weights": results["actual_sparsity"]})


def write_results(results: dict, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(directory, "log_wanda_block.txt"), "w") as f:
        print("method\tactual_sparsity\tppl_test", file=f)
        print(f"wanda_block\t{results['actual_sparsity']:.4f}\t{results['perplexity']:.4f}", file=f)
        for task, accuracy in results.get("zero_shot", {}).items():
            print(f"{task}\t{accuracy:.4f}", file=f)


def memory_remedies(args: argparse.Namespace) -> list[str]:
    remedies = ["lower --nsamples or --seqlen"]
    if not args.offload and torch.device(args.device).type != "cpu":
        remedies.append(f"add --offload (the weights stay on the CPU, one decoder layer at a time on {args.device})")
    if args.eval_zero_shot and args.eval_batch_size != 1:
        remedies.append("lower --eval_batch_size")
    return remedies


def main(argv=None) -> None:
    args = parse_args(argv)
    with exit_on_user_error(), out_of_memory_as_user_error(lambda: memory_remedies(args)):
        check_installed_versions()
        run(args)


if __name__ == "__main__":
    main()
