import itertools
import re

import pytest
import torch
from accelerate import Accelerator
from conftest import run_main
from peft import LoraConfig, get_peft_model
from tiny_models import BLOCK, tiny_llama, zero_random_blocks
from transformers import MixtralConfig, MixtralForCausalLM

from dense_ft.check_sparsity import main as check_sparsity_main
from dense_ft.errors import UserError
from dense_ft.masks import BlockMask, ElementMask, SparsityMasks, capture_mask
from dense_ft.sparsity import check_sparsity, layer_sparsity, prunable_linears, validate_pattern
from dense_ft.wanda import prune_wanda_blocks


def block_pruned_weight(rows=64, cols=96, ratio=0.25, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    grid = torch.rand(rows // BLOCK, cols // BLOCK, generator=generator) < ratio
    BlockMask(grid, BLOCK).apply_(weight)
    return weight, grid


def test_block_zeros_become_a_block_mask_of_one_int64_per_pruned_block():
    weight, grid = block_pruned_weight()
    mask = capture_mask(weight)
    assert isinstance(mask, BlockMask)
    assert torch.equal(mask.pruned_blocks, grid)
    assert torch.equal(mask.dense(), weight == 0)
    assert mask.nbytes == 8 * int(grid.sum())


def test_scattered_zeros_become_an_element_mask():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) < 0.3] = 0.0
    mask = capture_mask(weight)
    assert isinstance(mask, ElementMask)
    assert torch.equal(mask.dense(), weight == 0)


def test_without_a_pattern_whole_zero_blocks_are_found_and_a_stray_zero_stays_trainable():
    weight, grid = block_pruned_weight()
    weight[3, 5] = 0.0  # inside a kept block
    mask = capture_mask(weight)
    assert isinstance(mask, BlockMask) and torch.equal(mask.pruned_blocks, grid)
    assert not mask.dense()[3, 5]


def scatter_zeros(model, fraction: float, seed: int = 0) -> int:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            linear.weight[torch.rand(linear.weight.shape, generator=generator) < fraction] = 0.0
    return sum(int((linear.weight == 0).sum()) for linear in prunable_linears(model).values())


def test_a_dense_model_with_stray_zeros_and_no_pattern_gets_no_masks():
    model = tiny_llama()
    stray = scatter_zeros(model, 0.0003)
    masks = SparsityMasks(model)
    assert stray > 0 and len(masks) == 0
    assert masks.source == "none" and masks.stray_zeros == stray


def test_unstructured_pruning_without_a_pattern_keeps_every_zero():
    model = tiny_llama()
    zeros = scatter_zeros(model, 0.3)
    masks = SparsityMasks(model)
    assert masks.source == "zeros" and masks.stray_zeros == 0
    assert all(isinstance(mask, ElementMask) for mask in masks.masks.values()) and masks.num_pruned == zeros


def test_blocks_pruned_by_another_tool_are_detected_without_a_pattern():
    model = tiny_llama()
    pruned = zero_random_blocks(model)
    del model.config.sparsity_pattern  # what another tool's pruned model looks like
    scatter_zeros(model, 0.0003, seed=1)  # plus stray zeros, which must stay trainable
    masks = SparsityMasks(model)
    assert masks.source == "zeros" and all(isinstance(mask, BlockMask) for mask in masks.masks.values())
    assert masks.masks.keys() == pruned.keys()
    assert all(torch.equal(masks.masks[name].dense(), pruned[name]) for name in pruned)


def test_recorded_block_size_leaves_stray_zeros_trainable():
    weight, grid = block_pruned_weight()
    kept_row, kept_col = (~grid).nonzero()[0].tolist()
    weight[kept_row * BLOCK, kept_col * BLOCK] = 0.0
    mask = capture_mask(weight, block_size=BLOCK)
    assert isinstance(mask, BlockMask) and torch.equal(mask.pruned_blocks, grid)
    assert not mask.dense()[kept_row * BLOCK, kept_col * BLOCK]


def test_no_zeros_no_mask_and_indivisible_shape_is_refused():
    assert capture_mask(torch.randn(32, 32)) is None
    with pytest.raises(UserError, match="cannot hold 16x16 blocks"):
        capture_mask(torch.zeros(24, 32), block_size=BLOCK)


def test_apply_zeroes_exactly_the_pruned_positions_even_nan():
    weight, grid = block_pruned_weight()
    mask = capture_mask(weight)
    update = torch.randn_like(weight)
    update[0, 0] = float("nan")
    mask.apply_(update)
    dense = mask.dense()
    assert update[dense].eq(0).all()
    assert mask.count_nonzero(update) == 0
    assert update[~dense].ne(0).sum() >= (~dense).sum() - 1


def test_sparsity_masks_over_a_model():
    model = tiny_llama()
    pruned = zero_random_blocks(model, ratio=0.3)
    masks = SparsityMasks(model)
    assert set(masks.masks) == set(prunable_linears(model))
    assert masks.num_pruned == sum(int(p.sum()) for p in pruned.values())
    assert check_sparsity(model) == pytest.approx(masks.num_pruned / sum(p.numel() for p in pruned.values()))
    with torch.no_grad():
        for linear in prunable_linears(model).values():
            linear.weight.add_(1.0)
    assert sum(masks.violations().values()) == masks.num_pruned
    masks.apply_to_weights()
    assert masks.violations() == {}
    zeros = {name: z for name, (z, _) in layer_sparsity(model).items()}
    assert zeros == {name: int(p.sum()) for name, p in pruned.items()}
    assert masks.nbytes == 8 * masks.num_pruned // BLOCK**2


def test_row_shards_of_a_block_mask():
    weight, _ = block_pruned_weight(rows=64)
    mask = capture_mask(weight)
    aligned = mask.rows(16, 48)  # an FSDP shard starting and ending on block rows
    assert isinstance(aligned, BlockMask) and torch.equal(aligned.dense(), mask.dense()[16:48])
    misaligned = mask.rows(8, 40)  # exact still, one bool per weight
    assert isinstance(misaligned, ElementMask) and torch.equal(misaligned.dense(), mask.dense()[8:40])
    shard = weight[8:40].clone() + 1.0
    misaligned.apply_(shard)
    assert misaligned.count_nonzero(shard) == 0 and shard[~misaligned.dense()].ne(0).all()


@pytest.mark.parametrize("change, message", [
    ({"version": 2}, "version 2 is not supported"),
    ({"block_size": "16"}, "needs a positive integer block_size"),
    ({"sparsity_ratio": 1.5}, "does not follow schema version 1"),
    ({"modules": "q_proj"}, "check modules"),
])
def test_a_pattern_off_the_schema_is_refused_in_one_line(change, message, tmp_path):
    model = tiny_llama()
    zero_random_blocks(model)
    assert validate_pattern(model.config.sparsity_pattern, "x") is None
    model.config.sparsity_pattern.update(change)
    with pytest.raises(UserError, match=re.escape(message)):
        SparsityMasks(model)
    model.save_pretrained(tmp_path)
    result = run_main(check_sparsity_main, tmp_path)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("layout", ["contiguous", "storage offset", "transposed"])
def test_the_indexed_write_zeroes_exactly_the_pruned_blocks_whatever_the_layout(layout):
    generator = torch.Generator().manual_seed(0)
    grid = torch.rand(4, 6, generator=generator) < 0.4
    values = torch.rand(64, 96, generator=generator) + 1  # no zeros of its own
    tensor = {"contiguous": values.clone(),
              "storage offset": torch.cat([torch.ones(1), values.flatten()])[1:].view(64, 96),
              "transposed": values.t().contiguous().t()}[layout]
    mask = BlockMask(grid, BLOCK)
    mask.apply_indexed_(tensor)
    pruned = grid.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    assert torch.equal(tensor == 0, pruned) and torch.equal(tensor[~pruned], values[~pruned])
    assert mask.count_nonzero(tensor) == 0 and mask.count_nonzero(values) == int(pruned.sum())


def test_a_block_mask_refuses_a_tensor_of_another_shape():
    mask = BlockMask(torch.ones(2, 2, dtype=torch.bool), BLOCK)
    for shape, apply in itertools.product([(16, 64), (64, 32)], [mask.apply_, mask.apply_indexed_]):
        tensor = torch.ones(shape)
        with pytest.raises(ValueError, match="cannot mask a tensor of shape"):
            apply(tensor)  # the CPU kernel's pass, where it can, and the indexed write
        assert tensor.all()


def test_a_training_loop_of_ones_own_keeps_the_pattern_through_the_optimizer_hooks():
    def train(attach: bool):
        model = tiny_llama()
        pruned = zero_random_blocks(model)
        masks = SparsityMasks(model)
        frozen = model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
        frozen_version = frozen._version
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        if attach:
            masks.attach_to_optimizer(optimizer)
        ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return model, masks, optimizer, pruned, frozen._version - frozen_version

    model, masks, optimizer, pruned, frozen_writes = train(attach=True)
    assert masks.violations() == {}
    assert frozen_writes == 0  # no step changes a frozen weight, so the pass leaves it alone
    for name, linear in prunable_linears(model).items():
        if linear.weight.requires_grad:
            assert linear.weight.detach()[~pruned[name]].ne(0).float().mean() > 0.99
            assert optimizer.state[linear.weight]["exp_avg"][pruned[name]].eq(0).all()
    assert train(attach=False)[1].violations()  # without the hooks AdamW fills the pruned blocks


def test_the_hooks_attach_through_accelerates_optimizer_and_act_only_on_real_steps():
    model = tiny_llama()
    pruned = zero_random_blocks(model)
    masks = SparsityMasks(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    masks.attach_to_optimizer(optimizer)  # after prepare, as trainer.optimizer is
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for micro_step in range(4):
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            if micro_step % 2 == 0:  # an accumulation micro-step: the pruned gradients are still there
                assert q_proj.grad[pruned["model.layers.0.self_attn.q_proj"]].ne(0).any()
            optimizer.step()
            optimizer.zero_grad()
    assert masks.violations() == {}
    assert optimizer.optimizer.state[q_proj]["step"] == 2
    assert optimizer.optimizer.state[q_proj]["exp_avg"][pruned["model.layers.0.self_attn.q_proj"]].eq(0).all()


def test_quantized_weights_are_refused_in_one_line():
    model = tiny_llama()
    zero_random_blocks(model)
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)  # 8-bit, say
    with pytest.raises(UserError, match=r"^model\.layers\.1\.self_attn\.q_proj holds quantized torch\.int8 weights"):
        SparsityMasks(model)


@pytest.mark.parametrize("with_pattern", [True, False])
def test_a_peft_modules_to_save_copy_takes_the_mask_of_the_weight_it_copies(with_pattern):
    model = tiny_llama()
    pruned = zero_random_blocks(model)["model.layers.0.self_attn.q_proj"]
    if not with_pattern:
        del model.config.sparsity_pattern
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["q_proj"]))
    copy = peft_model.base_model.model.model.layers[0].self_attn.q_proj.modules_to_save["default"].weight
    with torch.no_grad():
        copy.normal_()  # trained whole elsewhere, without masks: no zero left to read the pattern from
    masks = SparsityMasks(peft_model)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert masks.masks[f"{name}.modules_to_save.default"] is masks.masks[f"{name}.original_module"]
    masks.apply_to_weights()
    assert copy[pruned].eq(0).all() and copy[~pruned].ne(0).all()


def test_a_wanda_pruned_model_whose_blocks_were_filled_is_refused():
    model = tiny_llama()
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    prune_wanda_blocks(model, windows, 0.2, BLOCK, "cpu", progress=False)
    assert len(SparsityMasks(model)) == 14  # every weight holds exactly its floor(0.2 x blocks) zero blocks
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(input_ids=windows, labels=windows).loss.backward()
    optimizer.step()  # trained without the masks: every pruned block filled
    with pytest.raises(UserError, match=r"^14 of 14 prunable weights lost pruned blocks \(model\.layers\.0\.self_attn"
                                        r"\.q_proj: 3 of the 3 Wanda pruned are not zero\): the model was trained"):
        SparsityMasks(model)


@pytest.mark.parametrize("experts_zeros", [0.0, 0.3])
def test_pruned_fused_moe_experts_are_refused_and_dense_ones_train(experts_zeros):
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    pruned = zero_random_blocks(model)  # the attention projections, the model's only nn.Linear weights
    down_proj = model.model.layers[1].mlp.experts.down_proj  # (experts, hidden, intermediate): no nn.Linear
    with torch.no_grad():
        down_proj[torch.rand(down_proj.shape, generator=torch.Generator().manual_seed(0)) < experts_zeros] = 0.0
    if experts_zeros:
        with pytest.raises(UserError, match=r"^model\.layers\.1\.mlp\.experts\.down_proj \(2, 64, 128\) is 30% exact "
                                            r"zeros, outside the nn\.Linear layers the masks cover"):
            SparsityMasks(model)
    else:
        assert SparsityMasks(model).masks.keys() == pruned.keys()
