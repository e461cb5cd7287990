"""The whole pipeline on the embedded default, through the real entry points, at CPU sizes.

1. dense perplexity (main_block.py --sparsity_ratio 0)
2. Wanda 16x16 block pruning to 20% (main_block.py --save_model)
3. sparse full fine-tuning (run_dense_finetune_block_20sparsity.sh, CPU path)
4. python -m dense_ft.check_sparsity --reference on the result
5. perplexity of the fine-tuned model

Writes report.md, report.json and loss.png in --out and prints the before/after table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prepare_embedded import REPO_ROOT, corpus_dir, model_dir

SIZES = {
    # seqlen / windows of the perplexity protocol, calibration windows, fine-tuning sizes. "full" trains 16 steps of
    # 2,048 tokens, which fit the 15 minutes of `make demo` on a 2-core VM without AVX-512 on a slow day (README).
    "full": {"seqlen": 256, "eval_windows": 16, "nsamples": 16, "block_size": 256, "train_samples": 128,
             "eval_samples": 8, "eval_steps": 8, "learning_rate": "3e-4"},
    "quick": {"seqlen": 128, "eval_windows": 4, "nsamples": 4, "block_size": 128, "train_samples": 32,
              "eval_samples": 8, "eval_steps": 2, "learning_rate": "1e-4"},
}


def run_stage(name: str, command: list, timings: dict, env=None) -> None:
    print(f"\n=== {name} ===\n$ {' '.join(map(str, command))}", flush=True)
    started = time.perf_counter()
    subprocess.run(list(map(str, command)), cwd=REPO_ROOT, env=env, check=True, stdin=subprocess.DEVNULL)
    timings[name] = round(time.perf_counter() - started, 1)


def evaluate(model: Path, save: Path, sizes: dict, timings: dict, stage: str, *extra) -> dict:
    run_stage(stage, [sys.executable, "main_block.py", "--model", model, "--eval_dataset", corpus_dir(),
                      "--seqlen", sizes["seqlen"], "--max_eval_windows", sizes["eval_windows"], "--save", save,
                      *extra], timings)
    return json.loads((save / "results.json").read_text())


def fine_tune(pruned: Path, output: Path, sizes: dict, timings: dict, teacher: Path | None) -> None:
    env = {**os.environ, **({"TEACHER_MODEL": str(teacher)} if teacher else {}),
           "PYTHON": sys.executable, "PRUNED_MODEL": str(pruned), "OUTPUT_DIR": str(output),
           "DATASET_DIR": str(corpus_dir()), "BLOCK_SIZE": str(sizes["block_size"]), "NUM_EPOCHS": "1",
           "MAX_TRAIN_SAMPLES": str(sizes["train_samples"]), "BATCH_SIZE": "2",
           "LEARNING_RATE": sizes["learning_rate"], "LOGGING_STEPS": "2"}
    # GPU 0 where there is one (the launcher's default is the guide's GPU 2); ignored on the CPU.
    run_stage("fine-tune", ["bash", "run_dense_finetune_block_20sparsity.sh", "--gpu_ids", "0", "--yes", "--",
                            "--max_eval_samples", sizes["eval_samples"], "--eval_strategy", "steps",
                            "--eval_steps", sizes["eval_steps"], "--overwrite_output_dir", "true"], timings, env)


def check_against_reference(model: Path, reference: Path, timings: dict) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dense_ft.check_sparsity", str(model), "--reference",
                             str(reference), "--json"], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        sys.exit(f"check_sparsity failed: {result.stderr.strip()}")
    timings["check sparsity"] = round(time.perf_counter() - started, 1)
    return json.loads(result.stdout)


def plot_losses(trainer_state: dict, path: Path) -> None:
    """Training loss per logged step, its terms under distillation, and the evaluation loss (step 0: before
    training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = trainer_state["log_history"]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evaluation = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(*zip(*train, strict=True), marker=".", label="training loss")
    for term in ("ce_loss", "kl_loss", "squarehead_loss"):  # what a distilled run's loss is made of
        points = [(h["step"], h[term]) for h in history if term in h]
        if points:
            axes.plot(*zip(*points, strict=True), linestyle="--", label=f"training {term.replace('_', ' ')}")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), marker="o", label="evaluation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (evaluation: cross-entropy)")
    axes.set_title("Sparse full fine-tuning of SmolLM2-135M (20% Wanda 16x16 blocks)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown_report(report: dict) -> str:
    rows = [("dense", report["dense"]), ("pruned (Wanda 16x16, 20%)", report["pruned"]),
            ("fine-tuned (SparseTrainer" + (", distilled from the dense model" if report["distilled"] else "") + ")",
             report["finetuned"])]
    lines = ["# Pipeline report: SmolLM2-135M, embedded default", "",
             f"Perplexity: test split of the embedded Wikipedia corpus, seqlen {report['seqlen']}, "
             f"{report['eval_windows']} windows.", "",
             "| model | perplexity | sparsity |", "|---|---|---|"]
    lines += [f"| {name} | {r['perplexity']:.2f} | {r['sparsity']:.4f} |" for name, r in rows]
    lines += ["", f"Pruned weights that became non-zero: **{report['violations']}**", "",
              "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {stage} | {seconds} |" for stage, seconds in report["timings"].items()]
    lines += ["", "![losses](loss.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "demo_out", help="output folder")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (what the tests run)")
    parser.add_argument("--distill", action="store_true", help="fine-tune with the dense model as teacher")
    args = parser.parse_args()
    sizes = SIZES["quick" if args.quick else "full"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pruned_model, finetuned_model = out / "pruned" / "pruned_model", out / "finetuned"
    timings, started = {}, time.perf_counter()

    dense = evaluate(model_dir(), out / "dense", sizes, timings, "dense perplexity")
    pruned = evaluate(model_dir(), out / "pruned", sizes, timings, "prune (Wanda 16x16, 20%)",
                      "--sparsity_ratio", 0.2, "--block_size", 16, "--nsamples", sizes["nsamples"],
                      "--calib_dataset", corpus_dir(), "--save_model", pruned_model)
    fine_tune(pruned_model, finetuned_model, sizes, timings, model_dir() if args.distill else None)
    check = check_against_reference(finetuned_model, pruned_model, timings)
    finetuned = evaluate(finetuned_model, out / "finetuned_eval", sizes, timings, "fine-tuned perplexity")
    timings["total"] = round(time.perf_counter() - started, 1)

    plot_losses(json.loads((finetuned_model / "trainer_state.json").read_text()), out / "loss.png")
    report = {
        "seqlen": sizes["seqlen"], "eval_windows": sizes["eval_windows"],
        "dense": {"model": str(model_dir()), "perplexity": dense["perplexity"],
                  "sparsity": dense["actual_sparsity"]},
        "pruned": {"model": str(pruned_model), "perplexity": pruned["perplexity"],
                   "sparsity": pruned["actual_sparsity"]},
        "finetuned": {"model": str(finetuned_model), "perplexity": finetuned["perplexity"],
                      "sparsity": check["sparsity"]},
        "violations": check["violations"], "timings": timings, "distilled": args.distill,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    print("\n" + markdown_report(report).split("![losses]")[0])
    print(f"Report: {out / 'report.md'}, {out / 'report.json'}, {out / 'loss.png'}")
    if check["violations"] or finetuned["perplexity"] >= pruned["perplexity"]:
        sys.exit("the fine-tuned model broke the sparsity or did not improve on the pruned one")


if __name__ == "__main__":
    main()
