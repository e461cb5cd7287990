"""Wanda block pruning with and without layer offload: time and peak device memory.

Builds a model of ``bench_gpu_recipes.py`` (random weights in float16 on the CPU: no download),
prunes 20% of its 16x16 blocks from random calibration windows, each mode in its own process
so that the peak is its own, and prints one JSON line per mode with the calibration
activations (nsamples x seqlen x hidden x 2 bytes), which offload keeps on the device with one
decoder layer.

    python bench/bench_offload_pruning.py                                   # 7B shape, 128 x 4096, cuda
    python bench/bench_offload_pruning.py --config tiny --nsamples 4 --seqlen 128 --modes offload
"""

import argparse
import json
import subprocess
import sys
import time

import torch
from bench_gpu_recipes import CONFIGS, build_model
from step_timer import synchronize

from dense_ft.wanda import prune_wanda_blocks


def prune_once(args) -> dict:
    model = build_model(args.config, "cpu", torch.float16).eval()
    offload = args.mode == "offload"
    if not offload:
        model.to(args.device)
    windows = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen))
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    prune_wanda_blocks(model, windows, 0.2, 16, args.device, offload=offload, progress=False)
    synchronize()
    return {"config": args.config, "mode": args.mode, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "parameters": sum(p.numel() for p in model.parameters()),
            "activations_gib": round(args.nsamples * args.seqlen * model.config.hidden_size * 2 / 2**30, 2),
            "seconds": round(time.perf_counter() - started, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
            "device": torch.cuda.get_device_name() if on_cuda else args.device}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--modes", default="offload,whole")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(prune_once(args)), flush=True)
        return
    failed = [mode for mode in args.modes.split(",")
              if subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode]).returncode != 0]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)


if __name__ == "__main__":
    main()
