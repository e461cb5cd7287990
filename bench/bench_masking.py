"""Time of one masking pass (what SparseTrainer does to the weights, and to the gradients, per step).

Builds the model of ``bench_gpu_recipes.py`` (Llama-2-7B shape by default, bf16, random weights,
20% of its 16x16 blocks zeroed) and times ``SparsityMasks.apply_to_weights`` (median of 20).

    python bench/bench_masking.py                                # Llama-2-7B shape, cuda
    python bench/bench_masking.py --config tiny --device cpu
"""

import argparse
import json

from bench_gpu_recipes import CONFIGS, build_model
from step_timer import median_seconds

from dense_ft.masks import SparsityMasks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    masks = SparsityMasks(build_model(args.config, args.device))
    seconds = median_seconds(masks.apply_to_weights, args.repeats)
    weight_bytes = sum(linear.weight.nbytes for linear in masks.linears.values())
    print(json.dumps({"config": args.config, "device": args.device, "matrices": len(masks),
                      "weight_gib": round(weight_bytes / 2**30, 2), "pass_ms": round(seconds * 1e3, 2),
                      "weight_gib_per_s": round(weight_bytes / 2**30 / seconds, 1)}))


if __name__ == "__main__":
    main()
