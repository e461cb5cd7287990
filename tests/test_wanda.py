import copy
import math
import re

import pytest
import torch
from test_sparse_trainer import token_dataset, training_args
from tiny_models import BLOCK, tiny_llama
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from dense_ft.errors import UserError
from dense_ft.masks import SparsityMasks
from dense_ft.sparse_lora import add_sparse_lora, lora_config
from dense_ft.sparse_trainer import SparseLoraTrainer, SparseTrainer
from dense_ft.sparsity import PATTERN_KEY, prunable_linears
from dense_ft.wanda import InputNormStats, block_scores, lowest_blocks, prune_wanda_blocks


def naive_lowest_blocks(weight, squared_norms, ratio, b=BLOCK):
    """The upstream's way: a Python loop over every block, then the k lowest (first on ties)."""
    metric = weight.abs() * squared_norms.sqrt()
    scores = []
    for i in range(weight.shape[0] // b):
        for j in range(weight.shape[1] // b):
            scores.append((metric[i * b:(i + 1) * b, j * b:(j + 1) * b].mean().item(), i, j))
    k = math.floor(ratio * len(scores))
    pruned = torch.zeros(weight.shape[0] // b, weight.shape[1] // b, dtype=torch.bool)
    for _, i, j in sorted(scores, key=lambda s: s[0])[:k]:
        pruned[i, j] = True
    return pruned


def test_vectorized_selection_equals_a_per_block_loop():
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(96, 160, generator=generator)
        norms = torch.rand(160, generator=generator)
        for ratio in (0.2, 0.5, 0.29):
            fast = lowest_blocks(block_scores(weight, norms, BLOCK), ratio)
            assert torch.equal(fast, naive_lowest_blocks(weight, norms, ratio))


def test_exact_count_and_ties_do_not_over_prune():
    scores = torch.zeros(4, 5)  # all tied: `score <= threshold` would prune everything
    pruned = lowest_blocks(scores, 0.29)
    assert int(pruned.sum()) == math.floor(0.29 * 20)
    assert pruned.flatten()[:5].all() and not pruned.flatten()[5:].any()


def test_input_norm_stats_is_the_running_mean_over_samples():
    stats = InputNormStats(8, "cpu")
    samples = [torch.randn(1, 10, 8) for _ in range(3)]
    for sample in samples:
        stats.add(sample)
    expected = torch.stack([s[0].pow(2).sum(0) for s in samples]).mean(0)
    assert torch.allclose(stats.squared_norms, expected, atol=1e-5)


def test_pruning_a_model(tmp_path):
    model = tiny_llama(layers=3).eval()
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))

    # Record what each layer's linears see, to check scores against the inputs of the pruned model.
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=name: seen.setdefault(n, []).append(args[0]))
             for name, m in prunable_linears(model).items()]
    original = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    prune_wanda_blocks(model, windows, 0.2, BLOCK, "cpu", progress=False)
    for hook in hooks:
        hook.remove()

    assert getattr(model.config, PATTERN_KEY)["block_size"] == BLOCK
    for name, linear in prunable_linears(model).items():
        weight = linear.weight.detach()
        rows, cols = weight.shape
        grid = weight.view(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).eq(0).all(3).all(1)
        assert int(grid.sum()) == math.floor(0.2 * grid.numel())
        # Scores from the inputs this layer saw during calibration (the first pass per layer).
        calibration_inputs = seen[name][:len(windows)]
        norms = torch.stack([x[0].float().pow(2).sum(0) for x in calibration_inputs]).mean(0)
        scores = block_scores(original[name], norms, BLOCK)
        assert scores[grid].max() <= scores[~grid].min()
        assert torch.equal(weight[~grid.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)],
                           original[name][~grid.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)])


def test_each_layer_is_calibrated_on_the_pruned_outputs_of_the_layers_before():
    model = tiny_llama(layers=2).eval()
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    layer1_inputs = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: layer1_inputs.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    prune_wanda_blocks(model, windows, 0.5, BLOCK, "cpu", progress=False)
    hook.remove()

    # What layer 0 of the finished (pruned) model gives is what layer 1 was calibrated on.
    captured = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows[:1])
    hook.remove()
    assert torch.allclose(layer1_inputs[0], captured[0], atol=1e-5)


def test_calibration_hooks_see_only_linear_inputs():
    assert all(isinstance(m, nn.Linear) for m in prunable_linears(tiny_llama()).values())
    assert not any("lm_head" in name or "embed" in name for name in prunable_linears(tiny_llama()))


TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


LLAMA_KIN = [MistralConfig, Qwen2Config, Qwen3Config, GemmaConfig, Phi3Config, Olmo2Config]


@pytest.mark.parametrize("config_class", LLAMA_KIN)
def test_llama_kin_are_pruned_in_every_linear_and_train_keeping_the_pattern(config_class, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**TINY_SHAPE)).eval()
    prune_wanda_blocks(model, torch.randint(0, 256, (2, 32)), 0.2, BLOCK, "cpu", progress=False)
    for linear in prunable_linears(model).values():
        rows, cols = linear.weight.shape
        grid = linear.weight.detach().view(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).eq(0).all(3).all(1)
        assert int(grid.sum()) == math.floor(0.2 * grid.numel())
    pruned = copy.deepcopy(model)
    full = SparseTrainer(model=model, args=training_args(tmp_path / "full"), train_dataset=token_dataset())
    full.train()
    lora = add_sparse_lora(copy.deepcopy(pruned), lora_config(4, 8, 0.0, ["all-linear"]))
    SparseLoraTrainer(model=lora, args=training_args(tmp_path / "lora"), train_dataset=token_dataset()).train()
    masks = SparsityMasks(pruned)
    assert masks.violations(model) == {} and masks.violations(lora.merge_and_unload()) == {}
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), pruned.parameters(), strict=True))


@pytest.mark.parametrize("config, message", [
    (GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1),
     "GPT2LMHeadModel is not a Llama-style decoder"),
    (MixtralConfig(**TINY_SHAPE, num_local_experts=4),
     "model.layers.0.mlp.experts.gate_up_proj (4, 256, 64) and 5 more weight(s) are not in nn.Linear layers"),
])
def test_models_block_pruning_cannot_cover_are_refused_untouched(config, message):
    model = AutoModelForCausalLM.from_config(config).eval()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with pytest.raises(UserError, match=re.escape(message)):
        prune_wanda_blocks(model, torch.randint(0, 256, (2, 32)), 0.2, BLOCK, "cpu", progress=False)
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())


def zero_block_grids(model) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach().view(linear.out_features // BLOCK, BLOCK, -1, BLOCK).eq(0).all(3).all(1)
            for name, linear in prunable_linears(model).items()}


def test_a_pruned_model_prunes_further_keeping_its_blocks_and_is_refused_a_lower_ratio_or_other_blocks():
    model = tiny_llama().eval()
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    prune_wanda_blocks(model, windows, 0.2, BLOCK, "cpu", progress=False)
    first = zero_block_grids(model)
    for ratio, block_size, message in ((0.1, BLOCK, "the model is pruned already, 20% of its blocks: --sparsity_ratio "
                                                    "0.1 would leave those zero and record 10%; give 0.2 or more"),
                                       (0.3, 32, "the model is pruned already, in 16x16 blocks")):
        with pytest.raises(UserError, match=re.escape(message)):
            prune_wanda_blocks(model, windows, ratio, block_size, "cpu", progress=False)
    assert all(torch.equal(grid, first[name]) for name, grid in zero_block_grids(model).items())

    prune_wanda_blocks(model, windows, 0.3, BLOCK, "cpu", progress=False)
    for name, grid in zero_block_grids(model).items():
        assert grid[first[name]].all() and int(grid.sum()) == math.floor(0.3 * grid.numel())
    assert getattr(model.config, PATTERN_KEY)["sparsity_ratio"] == 0.3
