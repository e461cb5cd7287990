"""Tiny Llama models built in the test itself, with random 16x16 blocks zeroed (no embedded default needed)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dense_ft.masks import prune_random_blocks
from dense_ft.sparsity import prunable_linears

BLOCK = 16


def tiny_llama(seed: int = 0, vocab_size: int = 256, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def zero_random_blocks(model, ratio: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Zero a random ``ratio`` of the 16x16 blocks of every prunable weight; the pruned positions by layer."""
    prune_random_blocks(model, ratio, BLOCK, seed)
    # Randomly initialized weights hold no exact zero, so the zeros are exactly the pruned positions:
    # an oracle that does not go through the mask code under test.
    return {name: linear.weight.detach() == 0 for name, linear in prunable_linears(model).items()}
