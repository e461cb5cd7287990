"""Time of one masking pass (what SparseTrainer does to the weights, and to the gradients, per step).

Builds the model of ``bench_gpu_recipes.py`` (Llama-2-7B shape by default, random weights,
20% of its 16x16 blocks zeroed) and times ``SparsityMasks.apply_to_weights`` (median of
``--repeats``; on the CPU that is the native kernel of ``dense_ft/block_zero.c``) and the same
pass through PyTorch's indexed write, against their floor: one ``zero_`` of a contiguous buffer
holding exactly the pruned blocks' bytes, in the same dtype. The three alternate, so that a
noisy machine slows them alike.

    python bench/bench_masking.py                                                  # 7B shape, bf16, cuda
    python bench/bench_masking.py --config smollm2-135m --device cpu --dtype float32  # the embedded default's
"""

import argparse
import json
import statistics

import torch
from bench_gpu_recipes import CONFIGS, build_model
from step_timer import median_seconds

from dense_ft.masks import SparsityMasks, local_tensor
from dense_ft.modeling import DTYPES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the three timings")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    masks = SparsityMasks(build_model(args.config, args.device, dtype))
    pruned = torch.empty(masks.num_pruned, dtype=dtype, device=args.device)

    def indexed_pass():
        for name, mask in masks.masks.items():
            mask.apply_indexed_(local_tensor(masks.linears[name].weight.data))

    timings = {"pass": [], "indexed": [], "floor": []}
    for _ in range(args.rounds):
        for key, function in ("pass", masks.apply_to_weights), ("indexed", indexed_pass), ("floor", pruned.zero_):
            timings[key].append(median_seconds(function, args.repeats))
    pass_seconds, indexed_seconds, floor_seconds = (statistics.median(timings[key]) for key in timings)
    weight_bytes = sum(linear.weight.nbytes for linear in masks.linears.values())
    print(json.dumps({"config": args.config, "device": args.device, "dtype": args.dtype, "matrices": len(masks),
                      "weight_gib": round(weight_bytes / 2**30, 3), "pruned_gib": round(pruned.nbytes / 2**30, 3),
                      "mask_mib": round(masks.nbytes / 2**20, 2), "pass_ms": round(pass_seconds * 1e3, 2),
                      "indexed_ms": round(indexed_seconds * 1e3, 2), "floor_ms": round(floor_seconds * 1e3, 2),
                      "pass_over_floor": round(pass_seconds / floor_seconds, 2),
                      "indexed_over_floor": round(indexed_seconds / floor_seconds, 2),
                      "rounds_ms": {key: [round(s * 1e3, 2) for s in values] for key, values in timings.items()},
                      "weight_gib_per_s": round(weight_bytes / 2**30 / pass_seconds, 1)}))


if __name__ == "__main__":
    main()
