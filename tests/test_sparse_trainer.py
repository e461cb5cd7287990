"""SparseTrainer keeps every pruned weight at exactly zero, in every configuration it supports."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny_models import tiny_llama, zero_random_blocks
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from dense_ft.errors import UserError
from dense_ft.masks import SparsityMasks
from dense_ft.sparse_lora import add_sparse_lora
from dense_ft.sparse_trainer import SparseTrainer
from dense_ft.sparsity import prunable_linears

STEPS = 12


def token_dataset(samples=48, length=32, seed=0) -> Dataset:
    ids = torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.1,
                    optim="adamw_torch", use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, seed=0, data_seed=0)
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def pruned_tiny_model(dtype=torch.float32):
    model = tiny_llama()
    pruned = zero_random_blocks(model)
    return model.to(dtype), pruned


def assert_pruned_weights_zero(model, pruned):
    for name, linear in prunable_linears(model).items():
        weight = linear.weight.detach()
        assert weight[pruned[name]].eq(0).all(), f"{name}: a pruned weight moved"
        assert weight[~pruned[name]].ne(0).float().mean() > 0.99


def enable_cpu_loss_scaling(trainer):
    """The Trainer makes no GradScaler on the CPU; give it a real one, growing at every finite step."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)


CONFIGS = {
    "fp32": ({}, torch.float32),
    "bf16 autocast": ({"bf16": True}, torch.float32),
    "bf16 weights": ({"bf16": True}, torch.bfloat16),
    "fp16 loss scaling": ({"fp16": True}, torch.float32),
    "gradient accumulation": ({"gradient_accumulation_steps": 4}, torch.float32),
    "gradient checkpointing": ({"activation_checkpointing": True}, torch.float32),
    "torch.compile": ({"torch_compile": True}, torch.float32),
}


class OutOfMemoryOnce(TrainerCallback):
    """The CPU allocator's error, once, after two optimizer steps at the first batch: --auto_find_batch_size then
    begins the loop again with a tenth less, on the weights and optimizer those steps left."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.train_batch_size == 4 and state.global_step == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def test_a_loop_begun_again_by_auto_find_batch_size_keeps_the_pruned_weights_zero(tmp_path):
    model, pruned = pruned_tiny_model()
    args = training_args(tmp_path, per_device_train_batch_size=4, auto_find_batch_size=True)
    trainer = SparseTrainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[OutOfMemoryOnce()])
    trainer.train()

    assert trainer.state.train_batch_size == 3 and trainer.state.global_step == STEPS  # begun again, then finished
    assert_pruned_weights_zero(model, pruned)
    assert trainer.masks.violations() == {}


@pytest.mark.parametrize("config", CONFIGS)
def test_pruned_weights_and_their_moments_stay_zero(config, tmp_path):
    overrides, dtype = CONFIGS[config]
    model, pruned = pruned_tiny_model(dtype)
    before = {name: m.weight.detach().clone() for name, m in prunable_linears(model).items()}
    trainer = SparseTrainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=token_dataset())
    if config == "fp16 loss scaling":
        enable_cpu_loss_scaling(trainer)
    trainer.train()

    assert_pruned_weights_zero(model, pruned)
    assert trainer.masks.violations() == {}
    moved = [not torch.equal(before[name], m.weight.detach()) for name, m in prunable_linears(model).items()]
    assert all(moved), "every prunable weight trains"
    for name, linear in prunable_linears(model).items():
        state = trainer.optimizer.state[linear.weight]
        assert state["exp_avg"][pruned[name]].eq(0).all() and state["exp_avg_sq"][pruned[name]].eq(0).all()
        assert state["exp_avg"][~pruned[name]].ne(0).any()
    if config == "fp16 loss scaling":
        assert trainer.accelerator.scaler.get_scale() > 2.0**16, "the loss was scaled and the steps unscaled"


def test_label_smoothing_smooths_the_training_loss_and_leaves_the_evaluation_the_perplexitys(tmp_path):
    def run(smoothing):
        model, _ = pruned_tiny_model()
        args = training_args(tmp_path, max_steps=1, logging_strategy="steps", logging_steps=1,
                             label_smoothing_factor=smoothing)
        trainer = SparseTrainer(model=model, args=args, train_dataset=token_dataset(),
                                eval_dataset=token_dataset(samples=4, seed=1))
        evaluated = trainer.evaluate()["eval_loss"]
        trainer.train()
        assert trainer.masks.violations() == {}
        return evaluated, trainer.state.log_history[-2]["loss"]

    (plain_eval, plain_train), (smoothed_eval, smoothed_train) = run(0.0), run(0.1)
    assert smoothed_eval == pytest.approx(plain_eval, abs=1e-6)
    assert abs(smoothed_train - plain_train) > 1e-4


def test_masks_act_only_on_real_optimizer_steps(tmp_path):
    model, _ = pruned_tiny_model()
    trainer = SparseTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=3, max_steps=4),
                            train_dataset=token_dataset())
    calls = {"grads": 0, "weights": 0}
    for kind, method in (("grads", "apply_to_grads"), ("weights", "apply_to_weights")):
        original = getattr(trainer.masks, method)

        def counted(*args, original=original, kind=kind, **kwargs):
            calls[kind] += 1
            original(*args, **kwargs)
        setattr(trainer.masks, method, counted)
    trainer.train()
    assert calls == {"grads": 4, "weights": 4}


class ZeroAKeptWeightAt(TrainerCallback):
    def __init__(self, weight, position, step):
        self.weight, self.position, self.step = weight, position, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.weight[self.position] = 0.0


def test_a_kept_weight_that_passes_through_zero_stays_trainable(tmp_path):
    model, pruned = pruned_tiny_model()
    name, linear = next(iter(prunable_linears(model).items()))
    at_start, mid_run = [tuple(p.tolist()) for p in (~pruned[name]).nonzero()[:2]]
    with torch.no_grad():
        linear.weight[at_start] = 0.0  # a stray zero in a kept block: an ordinary weight
    trainer = SparseTrainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(),
                            callbacks=[ZeroAKeptWeightAt(linear.weight, mid_run, step=4)])
    trainer.train()
    assert linear.weight[at_start] != 0 and linear.weight[mid_run] != 0
    assert_pruned_weights_zero(model, pruned)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, pruned = pruned_tiny_model()
    SparseTrainer(model=straight, args=training_args(tmp_path / "straight"), train_dataset=token_dataset()).train()

    interrupted, _ = pruned_tiny_model()
    SparseTrainer(model=interrupted, args=training_args(tmp_path / "resumed"), train_dataset=token_dataset(),
                  callbacks=[StopAt(5)]).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-5"
    assert checkpoint.is_dir()

    resumed, _ = pruned_tiny_model()
    original_masks = SparsityMasks(resumed)
    trainer = SparseTrainer(model=resumed, args=training_args(tmp_path / "resumed"), train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == STEPS

    checkpoint_masks = SparsityMasks(AutoModelForCausalLM.from_pretrained(checkpoint))
    assert checkpoint_masks.masks.keys() == original_masks.masks.keys()
    for name, mask in original_masks.masks.items():
        assert torch.equal(checkpoint_masks.masks[name].pruned_blocks, mask.pruned_blocks)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert_pruned_weights_zero(resumed, pruned)


def test_fp16_weights_with_fp16_training_are_refused(tmp_path):
    model, _ = pruned_tiny_model(torch.float16)
    with pytest.raises(UserError, match="--fp16 needs float32 weights"):
        SparseTrainer(model=model, args=training_args(tmp_path, fp16=True), train_dataset=token_dataset())


def test_fp16_training_of_float32_adapters_on_frozen_fp16_weights_is_not_refused(tmp_path):
    model, pruned = pruned_tiny_model(torch.float16)
    adapted = add_sparse_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert {p.dtype for p in adapted.parameters() if p.requires_grad} == {torch.float32}  # PEFT's autocast
    trainer = SparseTrainer(model=adapted, args=training_args(tmp_path, fp16=True), train_dataset=token_dataset())
    enable_cpu_loss_scaling(trainer)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() > 2.0**16, "the loss was scaled and the steps unscaled"
    assert_pruned_weights_zero(adapted.merge_and_unload(), pruned)


@pytest.mark.parametrize("optim", ["lomo", "apollo_adamw_layerwise"])
def test_optimizers_that_step_inside_backward_are_refused(optim, tmp_path):
    with pytest.raises(UserError, match=f"--optim {optim} steps each weight inside backward"):
        SparseTrainer(model=pruned_tiny_model()[0], args=training_args(tmp_path, optim=optim),
                      train_dataset=token_dataset())


# GaLore steps a weight by a low-rank projection of its masked gradient, bitsandbytes' 8-bit AdamW by quantized
# moments: both fill the pruned blocks (checked) unless the weights are re-masked after each step. APOLLO scales
# the masked gradient itself; Adafactor factors its second moments over rows and columns.
LOW_MEMORY_OPTIMIZERS = {"galore_adamw": "galore_torch", "galore_adafactor": "galore_torch",
                         "apollo_adamw": "apollo_torch", "adamw_8bit": "bitsandbytes", "adafactor": "transformers"}


@pytest.mark.parametrize("optim", LOW_MEMORY_OPTIMIZERS)
def test_low_memory_optimizers_that_step_after_backward_keep_the_pruned_weights_zero(optim, tmp_path):
    model, pruned = pruned_tiny_model()
    targets = ["q_proj", "down_proj"]  # GaLore's and APOLLO's projected weights; the others step as in AdamW
    before = {name: linear.weight.detach().clone() for name, linear in prunable_linears(model).items()}
    trainer = SparseTrainer(model=model, args=training_args(tmp_path, optim=optim, optim_target_modules=targets,
                                                            optim_args="rank=4,update_proj_gap=4"),
                            train_dataset=token_dataset())
    trainer.train()
    assert type(trainer.optimizer.optimizer).__module__.startswith(LOW_MEMORY_OPTIMIZERS[optim])
    assert trainer.masks.violations() == {}
    assert_pruned_weights_zero(model, pruned)
    assert all(not torch.equal(before[name], linear.weight) for name, linear in prunable_linears(model).items())


def test_a_dense_model_trains_without_masks(tmp_path):
    model = tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = SparseTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=token_dataset())
    assert len(trainer.masks) == 0
    trainer.train()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)


class MovesEveryWeight(torch.optim.Optimizer):
    """An optimizer that changes weights whose gradient is zero (as noise, EMA or quantized states can)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-2})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=group["lr"])


def test_weights_are_re_masked_after_every_step(tmp_path):
    model, pruned = pruned_tiny_model()
    trainer = SparseTrainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(),
                            optimizers=(MovesEveryWeight(model.parameters()), None))
    trainer.train()
    assert_pruned_weights_zero(model, pruned)
