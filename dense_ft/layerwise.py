"""Running a decoder one layer at a time over a set of token windows, as sequential pruners do.

The hidden states of every window stay on the device, and with ``offload`` each decoder
layer is brought there only while it runs: device memory is then the calibration activations
(windows x seqlen x hidden) plus one layer, whatever the size of the model.
"""

from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError

# What running one decoder layer at a time reaches into: the layout of Llama and its kin (Mistral, Qwen, Gemma, Phi-3).
DECODER_PARTS = ("layers", "embed_tokens", "rotary_emb", "norm")


def check_decoder_layout(model: nn.Module) -> None:
    """Refuse, in one line, a model whose decoder is not ``model.model.{layers, embed_tokens, rotary_emb, norm}``."""
    decoder = getattr(model, "model", None)
    missing = [part for part in DECODER_PARTS if not isinstance(getattr(decoder, part, None), nn.Module)]
    if missing or not isinstance(getattr(model, "lm_head", None), nn.Module):
        parts = ", ".join(DECODER_PARTS)
        raise UserError(f"{type(model).__name__} is not a Llama-style decoder (model.model.{{{parts}}} and lm_head), "
                        "which pruning and layer offload run one layer at a time")


@contextmanager
def on_device(modules: list[nn.Module], device, offload: bool):
    """With ``offload``, ``modules`` live on ``device`` for the block and go back to the CPU after it."""
    if offload:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if offload:
            for module in modules:
                module.to("cpu")


class _LayerInputsCaptured(Exception):
    pass


def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, device, offload: bool = False) -> tuple[list, dict]:
    """The hidden states entering the first decoder layer for each window, and its other arguments."""
    first_layer = model.model.layers[0]
    inputs, kwargs = [], {}

    def capture(module, args, layer_kwargs):
        inputs.append(args[0] if args else layer_kwargs.pop("hidden_states"))
        kwargs.update({k: v for k, v in layer_kwargs.items() if k != "hidden_states"})
        raise _LayerInputsCaptured

    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with on_device([model.model.embed_tokens, model.model.rotary_emb], device, offload):
            for window in windows:
                try:
                    model(input_ids=window[None].to(device), use_cache=False)
                except _LayerInputsCaptured:
                    pass
    finally:
        handle.remove()
    return inputs, kwargs


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_layer_by_layer(model: nn.Module, windows: torch.Tensor, device, offload: bool = False,
                       before_layer=None, desc: str = "Layers", progress: bool = True) -> list[torch.Tensor]:
    """The last decoder layer's outputs for every window, computed one layer at a time.

    ``before_layer(layer, hidden_states, kwargs)`` runs first for each layer, on the device
    (pruning calibrates and prunes the layer there); its outputs then replace its inputs in place.
    """
    hidden_states, kwargs = capture_layer_inputs(model, windows, device, offload)
    for layer in tqdm(model.model.layers, desc=desc, disable=not progress):
        with on_device([layer], device, offload):
            if before_layer is not None:
                before_layer(layer, hidden_states, kwargs)
            for i, hidden in enumerate(hidden_states):
                hidden_states[i] = run_layer(layer, hidden, kwargs)
    return hidden_states


@torch.no_grad()
def layerwise_nll(model: nn.Module, windows: torch.Tensor, device, offload: bool = False,
                  progress: bool = True) -> float:
    """Mean next-token negative log-likelihood over ``windows``, computed one layer at a time."""
    hidden_states = run_layer_by_layer(model, windows, device, offload, desc="Perplexity", progress=progress)
    total = 0.0
    with on_device([model.model.norm, model.lm_head], device, offload):
        for window, hidden in zip(windows, hidden_states, strict=True):
            logits = model.lm_head(model.model.norm(hidden))[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, window[1:].to(device), reduction="sum").item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))
