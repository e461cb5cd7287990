"""Peak memory of ``check_sparsity --reference``: streamed from safetensors against loading both models.

Saves a 1.1 B-parameter Llama (TinyLlama's shape, random weights, bf16, 20% of its 16x16
blocks zeroed) in 2 GB shards, then measures the peak RSS (``/usr/bin/time``) of
``python -m dense_ft.check_sparsity MODEL --reference MODEL`` and of the previous way, which
loaded the two models whole in float32 and compared their masks.

    .venv/bin/python bench/bench_check_sparsity.py [--keep DIR]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dense_ft.masks import prune_random_blocks

REPO_ROOT = Path(__file__).resolve().parent.parent
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
FULL_LOAD = """
import sys
from dense_ft.masks import SparsityMasks
from dense_ft.modeling import load_weights
model, reference = (load_weights(path) for path in sys.argv[1:])
print(sum(SparsityMasks(reference).violations(model).values()))
"""


def peak_rss_gib(command: list) -> tuple[float, float]:
    result = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *map(str, command)], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-2000:])
    seconds, kib = re.findall(r"^TIME (\S+) (\d+)$", result.stderr, re.M)[-1]
    return round(int(kib) / 2**20, 2), float(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="directory for the model (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="check_sparsity_") as scratch:
        measure(args.keep or Path(scratch))


def measure(directory: Path):
    """Save the pruned TinyLlama-shaped model in ``directory`` and print both checks' peak memory and time."""
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA))
    torch.set_default_dtype(torch.float32)
    prune_random_blocks(model, 0.2)
    model.save_pretrained(directory, max_shard_size="2GB")
    parameters = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    streamed = peak_rss_gib([sys.executable, "-m", "dense_ft.check_sparsity", directory, "--reference", directory])
    loaded = peak_rss_gib([sys.executable, "-c", FULL_LOAD, directory, directory])
    print(json.dumps({"parameters": parameters, "shards": len(list(directory.glob("model-*.safetensors"))),
                      "largest_tensor_gib": round(largest / 2**30, 3),
                      "streamed": {"peak_rss_gib": streamed[0], "seconds": streamed[1]},
                      "full_load_float32": {"peak_rss_gib": loaded[0], "seconds": loaded[1]}}))


if __name__ == "__main__":
    main()
