"""Recovery in 40 steps of 2,048 tokens: the pruned model, sparse full fine-tuning, sparse LoRA.

On the embedded default (SmolLM2-135M pruned by Wanda to 20% of its 16x16 blocks, as
``make demo`` does), each method trains through ``dense_ft/finetune.py`` with the demo's
budget until 2026-12-07 (320 sequences of 256 tokens, one epoch, effective batch 8: 40 steps of
2,048 tokens; the demo now trains 16), one after the other on the same machine; then
``main_block.py`` measures the perplexity with the demo's protocol (seqlen 256, 16 windows).
Wall time and peak RSS come from ``/usr/bin/time``; every run is one JSON line.

    PYTHONPATH=scripts .venv/bin/python bench/bench_lora_recovery.py [--methods full,lora:1e-4,lora:1e-3]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from prepare_embedded import corpus_dir, model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

FORTY_STEPS = ["--block_size", "256", "--max_train_samples", "320", "--num_train_epochs", "1",
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4"]
PERPLEXITY = ["--eval_dataset", str(corpus_dir()), "--seqlen", "256", "--max_eval_windows", "16"]


def run(command: list, timed: bool = False) -> tuple[str, float, float]:
    """stdout, wall seconds, peak RSS in GiB."""
    prefix = ["/usr/bin/time", "-f", "TIME %e %M"] if timed else []
    result = subprocess.run(prefix + [str(c) for c in command], cwd=REPO_ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode:
        sys.exit(f"{command[1]} failed: {result.stderr.strip().splitlines()[-1]}")
    seconds, kib = (re.findall(r"^TIME (\S+) (\d+)$", result.stderr, re.M) or [("0", "0")])[-1]
    return result.stdout, float(seconds), int(kib) / 2**20


def prune_embedded(work: Path) -> Path:
    """The embedded default pruned by Wanda to 20% of its 16x16 blocks, as ``make demo`` prunes it, in ``work``."""
    pruned = work / "pruned_model"
    run([sys.executable, "main_block.py", "--model", model_dir(), "--calib_dataset", corpus_dir(), *PERPLEXITY,
         "--sparsity_ratio", "0.2", "--nsamples", "16", "--save", work / "pruned", "--save_model", pruned])
    return pruned


def perplexity(model: Path, save: Path) -> float:
    run([sys.executable, "main_block.py", "--model", model, *PERPLEXITY, "--save", save])
    return json.loads((save / "results.json").read_text())["perplexity"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,lora:1e-4,lora:1e-3", help="full[:lr] or lora[:lr], comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora_recovery_") as work:
        compare_methods(Path(work), args.methods.split(","))


def compare_methods(work: Path, methods: list[str]):
    """Fine-tune the pruned embedded default by each method, a JSON line each: perplexity, time, memory."""
    pruned = prune_embedded(work)
    print(json.dumps({"method": "pruned", "perplexity": perplexity(pruned, work / "pruned_eval")}), flush=True)
    for spec in methods:
        method, _, learning_rate = spec.partition(":")
        learning_rate = learning_rate or "1e-4"
        output = work / spec.replace(":", "_")
        stdout, seconds, peak_gib = run(
            [sys.executable, "dense_ft/finetune.py", "--model_name_or_path", pruned, "--dataset_dir", corpus_dir(),
             "--output_dir", output, *FORTY_STEPS, "--learning_rate", learning_rate, "--max_eval_samples", "8",
             "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
             *(["--lora"] if method == "lora" else [])], timed=True)
        trainable = int(re.search(r"Trainable params: ([\d,]+)", stdout).group(1).replace(",", ""))
        check = subprocess.run([sys.executable, "-m", "dense_ft.check_sparsity", str(output), "--reference",
                                str(pruned), "--json"], cwd=REPO_ROOT, capture_output=True, text=True)
        print(json.dumps({"method": method, "learning_rate": learning_rate,
                          "perplexity": perplexity(output, work / f"{spec}_eval"), "wall_seconds": seconds,
                          "peak_rss_gib": round(peak_gib, 2), "trainable_parameters": trainable,
                          "violations": json.loads(check.stdout)["violations"]}), flush=True)


if __name__ == "__main__":
    main()
