"""What the fault guards add to the happy path, on the embedded default (or a 7B-shaped model on a GPU).

Per optimizer step: the divergence guard (a finiteness flag per micro-batch, kept on the device,
and one check per step before the optimizer). Per checkpoint: the completion marker. Once per
run: the weights fingerprint that identifies it, and the lock on the output directory.

    PYTHONPATH=scripts .venv/bin/python bench/bench_run_guards.py [--accumulation 4] [--config llama-7b --device cuda]
"""

import argparse
import json
import tempfile
from types import SimpleNamespace

import torch
from step_timer import median_seconds
from transformers import AutoConfig, AutoModelForCausalLM

from dense_ft.checkpoints import mark_complete, weights_fingerprint
from dense_ft.divergence import NonFiniteGuard
from dense_ft.output_dir import locked_output_dir

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)


def load(config: str, device: str):
    if config == "llama-7b":
        with torch.device(device):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA_7B), dtype=torch.bfloat16)
    from prepare_embedded import model_dir

    return AutoModelForCausalLM.from_pretrained(model_dir()).to(device)


def guard_step(guard: NonFiniteGuard, args, losses: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
    for loss in losses:
        guard.record_loss(loss)
    assert guard.step_is_sound(grad_norm, args, step=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["embedded", "llama-7b"], default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    settings = parser.parse_args()
    model = load(settings.config, settings.device)
    device = torch.device(settings.device)
    args = SimpleNamespace(fp16=False, learning_rate=5e-5, device=device)
    losses = [torch.rand((), device=device) for _ in range(settings.accumulation)]
    grad_norm = torch.rand((), device=device)
    guard = NonFiniteGuard()
    with tempfile.TemporaryDirectory() as directory:
        def lock_once():
            with locked_output_dir(directory):
                pass

        figures = {
            "config": settings.config, "device": settings.device, "accumulation": settings.accumulation,
            "guard_per_optimizer_step_s": median_seconds(lambda: guard_step(guard, args, losses, grad_norm),
                                                         settings.repeats),
            "completion_marker_s": median_seconds(lambda: mark_complete(directory, {"weights": "x" * 16}), 20),
            "output_dir_lock_s": median_seconds(lock_once, 20),
            "weights_fingerprint_s": median_seconds(lambda: weights_fingerprint(model), 3),
        }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
