"""Time of one masking pass (what SparseTrainer does to the weights, and to the gradients, per step).

Builds the model of ``bench_gpu_recipes.py`` (Llama-2-7B shape by default, random weights,
20% of its 16x16 blocks zeroed) and times ``SparsityMasks.apply_to_weights`` (median of
``--repeats``; on the CPU that is the native kernel of ``dense_ft/block_zero.c``) and the same
pass through PyTorch's indexed write, against their floor: one ``zero_`` of a contiguous buffer
holding exactly the pruned blocks' bytes, in the same dtype. The three alternate, so that a
noisy machine slows them alike. On a GPU the pass is also replayed from a CUDA graph (one
capture of all its small kernels: the weights never move), which is timed with them; on a CPU
the kernel's call alone, its table built beforehand (the pass less that is its Python part), in the order
this CPU gets (``kernel_cpu``) and in each order forced (``kernel_blocks``, ``kernel_rows``).

    python bench/bench_masking.py                                                  # 7B shape, bf16, cuda
    python bench/bench_masking.py --config smollm2-135m --device cpu --dtype float32  # the embedded default's
"""

import argparse
import json
import statistics

import torch
from bench_gpu_recipes import CONFIGS, build_model
from step_timer import median_seconds, milliseconds

from dense_ft import block_zero
from dense_ft.masks import SparsityMasks, local_tensor
from dense_ft.modeling import DTYPES


def captured_in_cuda_graph(function):
    """``function`` captured once in a CUDA graph (warmed up on a side stream first), as its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return graph.replay


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the timings")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    masks = SparsityMasks(build_model(args.config, args.device, dtype))
    pruned = torch.empty(masks.num_pruned, dtype=dtype, device=args.device)

    def indexed_pass():
        for name, mask in masks.masks.items():
            mask.apply_indexed_(local_tensor(masks.linears[name].weight.data))

    functions = {"pass": masks.apply_to_weights, "indexed": indexed_pass, "floor": pruned.zero_}
    weights = [local_tensor(masks.linears[name].weight.data) for name in masks.masks]
    rows = [mask.native_row(weight) for weight, mask in zip(weights, masks.masks.values(), strict=True)]
    if None not in rows and block_zero.zero_blocks_(weights, rows):  # False: no kernel (nothing written)
        for order in block_zero.ORDERS:
            functions[f"kernel_{order}"] = lambda order=order: block_zero.zero_blocks_(weights, rows, order)
    graph_error = None
    if args.device.startswith("cuda"):
        try:
            functions["cuda_graph"] = captured_in_cuda_graph(masks.apply_to_weights)
        except RuntimeError as error:
            graph_error = str(error).splitlines()[0]
    timings = {key: [] for key in functions}
    for _ in range(args.rounds):
        for key, function in functions.items():
            timings[key].append(median_seconds(function, args.repeats))
    seconds = {key: statistics.median(values) for key, values in timings.items()}
    pass_seconds, indexed_seconds, floor_seconds = seconds["pass"], seconds["indexed"], seconds["floor"]
    weight_bytes = sum(linear.weight.nbytes for linear in masks.linears.values())
    report = {"config": args.config, "device": args.device, "dtype": args.dtype, "matrices": len(masks),
              "weight_gib": round(weight_bytes / 2**30, 3), "pruned_gib": round(pruned.nbytes / 2**30, 3),
              "mask_mib": round(masks.nbytes / 2**20, 2), "pass_ms": milliseconds(pass_seconds),
              "indexed_ms": milliseconds(indexed_seconds), "floor_ms": milliseconds(floor_seconds),
              "pass_over_floor": round(pass_seconds / floor_seconds, 2),
              "indexed_over_floor": round(indexed_seconds / floor_seconds, 2),
              "rounds_ms": {key: [milliseconds(s) for s in values] for key, values in timings.items()},
              "weight_gib_per_s": round(weight_bytes / 2**30 / pass_seconds, 1)}
    report.update({f"{key}_ms": milliseconds(value) for key, value in seconds.items() if key.startswith("kernel_")})
    if "cuda_graph" in seconds:
        report["cuda_graph_ms"] = milliseconds(seconds["cuda_graph"])
        report["cuda_graph_over_floor"] = round(seconds["cuda_graph"] / floor_seconds, 2)
    if graph_error:
        report["cuda_graph_error"] = graph_error
    print(json.dumps(report))


if __name__ == "__main__":
    main()
