"""Pruning speed: Wanda 16x16 block selection vectorized vs a per-block Python loop, and the
whole pruning of the embedded default (SmolLM2-135M) at 20%.

    PYTHONPATH=scripts .venv/bin/python bench/bench_pruning.py [--nsamples 16 --seqlen 256]
"""

import argparse
import json
import math
import time

import torch
from prepare_embedded import corpus_dir, model_dir

from dense_ft.modeling import load_model
from dense_ft.text import load_corpus
from dense_ft.wanda import block_scores, calibration_windows, lowest_blocks, prune_wanda_blocks

BLOCK = 16
# (rows, cols) of q, k, v, o, gate, up, down in one SmolLM2-135M layer, and one Llama-2-7B q_proj.
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LLAMA2_7B_Q = [(4096, 4096)]


def naive_selection(weight, squared_norms, ratio):
    """The upstream's way: score every block in a Python loop, then threshold."""
    metric = weight.abs() * squared_norms.sqrt()
    rows, cols = weight.shape[0] // BLOCK, weight.shape[1] // BLOCK
    scores = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            scores[i, j] = metric[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].mean()
    k = math.floor(ratio * rows * cols)
    threshold = torch.sort(scores.flatten())[0][k - 1]
    return scores <= threshold


def time_selection(shapes, repeats):
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(shape, generator=generator), torch.rand(shape[1], generator=generator)) for shape in shapes]
    timings = {}
    for name, select in (("vectorized", lambda w, n: lowest_blocks(block_scores(w, n, BLOCK), 0.2)),
                         ("per-block loop", lambda w, n: naive_selection(w, n, 0.2))):
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            for weight, norms in inputs:
                select(weight, norms)
            runs.append(time.perf_counter() - started)
        timings[name] = min(runs)
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = {"torch_threads": torch.get_num_threads()}
    for label, shapes, repeats in (("smollm2_layer", SMOLLM2_LAYER, 3), ("llama2_7b_q_proj", LLAMA2_7B_Q, 3)):
        timings = time_selection(shapes, repeats)
        results[f"selection_{label}"] = {**{k: round(v, 4) for k, v in timings.items()},
                                         "speedup": round(timings["per-block loop"] / timings["vectorized"], 1)}

    model, tokenizer = load_model(str(model_dir()), "float32", "cpu")
    model.eval()
    train = load_corpus(str(corpus_dir()), splits=("train",))["train"]
    ids = tokenizer(" ".join(train["text"]), return_tensors="pt").input_ids[0]
    windows = calibration_windows(ids, args.nsamples, args.seqlen, seed=0)
    started = time.perf_counter()
    prune_wanda_blocks(model, windows, 0.2, BLOCK, "cpu", progress=False)
    results["prune_embedded_default"] = {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                         "seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
