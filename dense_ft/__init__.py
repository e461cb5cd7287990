"""Sparse full fine-tuning of block-pruned Llama models."""
