"""SparseTrainingMixin keeps the pruned pattern in any Trainer subclass: TRL's SFT, DPO, GRPO, distillation and reward
trainers, a user's own."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from test_sparse_lora import load_in_4bit
from test_sparse_trainer import assert_pruned_weights_zero, pruned_tiny_model, token_dataset, training_args
from tiny_models import tiny_llama, zero_random_blocks
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer
from trl import (
    DistillationConfig,
    DistillationTrainer,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

from dense_ft.errors import UserError
from dense_ft.masks import SparsityMasks
from dense_ft.merge_lora import merge, update_on_pruned_blocks
from dense_ft.sparse_lora import LLAMA_TARGET_MODULES, MaskedLoraLinear, add_sparse_lora, lora_config
from dense_ft.sparse_trainer import SparseTrainer, SparseTrainingMixin
from dense_ft.sparsity import prunable_linears


class LabelSmoothingTrainer(Trainer):
    """A user's Trainer subclass with its own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=0.1)
        return (loss, logits) if return_outputs else loss


class SparseLabelSmoothingTrainer(SparseTrainingMixin, LabelSmoothingTrainer):
    pass


class SparseSFTTrainer(SparseTrainingMixin, SFTTrainer):
    pass


class SparseDPOTrainer(SparseTrainingMixin, DPOTrainer):
    pass


class SparseGRPOTrainer(SparseTrainingMixin, GRPOTrainer):
    pass


class SparseDistillationTrainer(SparseTrainingMixin, DistillationTrainer):
    pass


class SparseRewardTrainer(SparseTrainingMixin, RewardTrainer):
    pass


def sft_config(output_dir, **overrides) -> SFTConfig:
    settings = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4, max_length=64, use_cpu=True,
                    report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return SFTConfig(str(output_dir), **{**settings, **overrides})


def test_the_mixin_on_a_custom_trainer_subclass(tmp_path):
    model = tiny_llama()
    pruned = zero_random_blocks(model)
    before = {name: m.weight.detach().clone() for name, m in prunable_linears(model).items()}
    trainer = SparseLabelSmoothingTrainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset())
    trainer.train()
    assert_pruned_weights_zero(model, pruned)
    assert all(not torch.equal(before[name], m.weight) for name, m in prunable_linears(model).items())

    unmasked = tiny_llama()  # the same subclass without the mixin loses the pattern: the test can fail
    zero_random_blocks(unmasked)
    LabelSmoothingTrainer(model=unmasked, args=training_args(tmp_path), train_dataset=token_dataset()).train()
    assert SparsityMasks(model).violations(unmasked)


def chat_dataset(corpus_dir, rows=4) -> Dataset:
    lines = [line.strip() for line in (corpus_dir / "wiki.train.raw").read_text(encoding="utf-8").splitlines()
             if len(line.split()) > 30][:rows]
    return Dataset.from_list([{"messages": [
        {"role": "user", "content": "Continue this article: " + " ".join(line.split()[:12])},
        {"role": "assistant", "content": " ".join(line.split()[12:60])},
    ]} for line in lines])


@pytest.mark.slow  # about 2 minutes with the embedded default's pruning; the tiny models' SFT tests stay in the suite
def test_trl_sft_trainer_keeps_the_embedded_defaults_pruned_blocks(tmp_path, embedded_pruned, embedded_corpus_dir,
                                                                    tokenizer):
    pruned_dir = embedded_pruned / "pruned_model"
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    before = {name: m.weight.detach().clone() for name, m in prunable_linears(model).items()}
    trainer = SparseSFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=chat_dataset(embedded_corpus_dir),
                               processing_class=tokenizer)
    assert len(trainer.masks) == 210
    trainer.train()
    assert trainer.state.global_step == 2
    reference = SparsityMasks(AutoModelForCausalLM.from_pretrained(pruned_dir))
    assert reference.violations(model) == {}
    assert sum(not torch.equal(before[name], m.weight) for name, m in prunable_linears(model).items()) == 210


def test_a_peft_config_given_to_sft_trainer_becomes_sparse_lora_whose_merge_keeps_the_pruned_blocks(
        tmp_path, tiny_pruned_dir, embedded_corpus_dir, tokenizer):
    # o_proj as a modules_to_save copy: trained whole, so the per-step masks are what keep its pruned blocks zero.
    adapted_names = [name for name in LLAMA_TARGET_MODULES if name != "o_proj"]
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=adapted_names, modules_to_save=["o_proj"],
                             task_type="CAUSAL_LM")
    trainer = SparseSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_pruned_dir),
                               args=sft_config(tmp_path, learning_rate=1e-2), peft_config=peft_config,
                               train_dataset=chat_dataset(embedded_corpus_dir), processing_class=tokenizer)
    adapted = [module for module in trainer.model.modules() if isinstance(module, MaskedLoraLinear)]
    assert len(adapted) == 12 and all(module.pruned is not None for module in adapted)
    frozen = [linear.weight for linear in trainer.masks.linears.values() if not linear.weight.requires_grad]
    versions = [weight._version for weight in frozen]
    trainer.train()
    assert len(frozen) == 14 and [weight._version for weight in frozen] == versions  # no step rewrites them
    with pytest.warns(UserWarning, match="holds a sparse-LoRA adapter: load it with dense_ft.sparse_lora.load_sparse_"):
        trainer.save_model()  # a plain PEFT adapter, which PeftModel.from_pretrained would apply unmasked
    # What TRL's plain LoRA would have merged into the pruned blocks: the masking is what keeps them zero.
    assert update_on_pruned_blocks(trainer.model, trainer.masks)["pruned_weights_a_plain_merge_would_change"] > 0
    merged = trainer.model.merge_and_unload()
    original = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    assert SparsityMasks(original).violations(merged) == {}
    assert all(not torch.equal(original.get_submodule(name).weight, linear.weight)
               for name, linear in prunable_linears(merged).items())


FULL_AND_LORA = pytest.mark.parametrize(
    "peft_config", [None, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")],
    ids=["full", "lora"])


def trl_args(config_class, output_dir, **overrides):
    settings = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to=[],
                    save_strategy="no", disable_tqdm=True, seed=0)
    return config_class(str(output_dir), **{**settings, **overrides})


def train_and_check_the_policy(trainer, pruned_dir):
    """Train; the policy (merged, for LoRA) keeps every pruned weight zero and has moved."""
    assert len(trainer.masks) == 14
    trainer.train()
    policy = trainer.model.merge_and_unload() if isinstance(trainer.model, PeftModel) else trainer.model
    original = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert SparsityMasks(original).violations(policy) == {}
    assert not torch.equal(original.model.layers[0].mlp.down_proj.weight, policy.model.layers[0].mlp.down_proj.weight)
    return original


def test_qlora_through_sft_trainers_peft_config_is_sparse_lora_that_merges_sparse(tmp_path, tiny_pruned_dir,
                                                                                    embedded_corpus_dir, tokenizer):
    trainer = SparseSFTTrainer(model=load_in_4bit(tiny_pruned_dir),
                               args=sft_config(tmp_path / "run", learning_rate=1e-2),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                               train_dataset=chat_dataset(embedded_corpus_dir), processing_class=tokenizer)
    adapted = [module for module in trainer.model.modules() if isinstance(module, MaskedLoraLinear)]
    assert len(adapted) == 14 and all(module.pruned is not None for module in adapted)
    trainer.train()
    with pytest.warns(UserWarning, match="holds a sparse-LoRA adapter"):
        trainer.save_model()
    report = merge(str(tiny_pruned_dir), str(tmp_path / "run"), str(tmp_path / "merged"))
    assert report["pruned_weights_a_plain_merge_would_change"] > 0 and report["violations"] == 0


@FULL_AND_LORA
def test_trl_dpo_trainer_keeps_the_pruned_blocks_of_the_policy_and_its_reference(tmp_path, tiny_pruned_dir, tokenizer,
                                                                                  peft_config):
    preferences = Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}", "rejected": f" {i}"}
                                     for i in range(8)])
    trainer = SparseDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_pruned_dir),
                               args=trl_args(DPOConfig, tmp_path, max_length=64), train_dataset=preferences,
                               processing_class=tokenizer, peft_config=peft_config)
    original = train_and_check_the_policy(trainer, tiny_pruned_dir)
    if trainer.ref_model is not None:  # full DPO's frozen copy of the pruned model
        assert SparsityMasks(original).violations(trainer.ref_model) == {}


@FULL_AND_LORA
def test_trl_grpo_trainer_keeps_the_pruned_blocks_of_the_policy(tmp_path, tiny_pruned_dir, tokenizer, peft_config):
    prompts = Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(8)])
    trainer = SparseGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_pruned_dir),
                                reward_funcs=lambda completions, **_: [float(len(text)) for text in completions],
                                args=trl_args(GRPOConfig, tmp_path, num_generations=4, max_completion_length=8),
                                train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config)
    train_and_check_the_policy(trainer, tiny_pruned_dir)


@FULL_AND_LORA
def test_trl_distillation_trainer_keeps_the_pruned_blocks_and_leaves_the_dense_teacher_alone(
        tmp_path, tiny_pruned_dir, tokenizer, peft_config):
    teacher = tiny_llama(vocab_size=len(tokenizer))  # the dense model tiny_pruned_dir was pruned from
    teacher_weights = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Count to {i}:"}]} for i in range(8)])
    trainer = SparseDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_pruned_dir),
                                        teacher_model=teacher, train_dataset=prompts, processing_class=tokenizer,
                                        args=trl_args(DistillationConfig, tmp_path, bf16=False,
                                                      max_completion_length=8),
                                        peft_config=peft_config)
    train_and_check_the_policy(trainer, tiny_pruned_dir)
    assert all(torch.equal(teacher_weights[name], tensor) for name, tensor in teacher.state_dict().items())
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_trl_reward_trainer_keeps_the_pruned_blocks_of_a_sequence_classifier(tmp_path, tiny_pruned_dir, tokenizer):
    pairs = Dataset.from_list([{"chosen": f"{i} plus {i} is {2 * i}", "rejected": f"{i} plus {i} is {i}"}
                               for i in range(8)])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pruned_dir, num_labels=1)
    trainer = SparseRewardTrainer(model=model, args=trl_args(RewardConfig, tmp_path), train_dataset=pairs,
                                  processing_class=tokenizer)
    train_and_check_the_policy(trainer, tiny_pruned_dir)


def test_plain_peft_adapters_on_pruned_weights_are_refused_and_sparse_lora_trains_and_merges_sparse(tmp_path):
    plain = get_peft_model(pruned_tiny_model()[0], lora_config(4, 8, 0.0, ["q_proj"]))
    with pytest.raises(UserError, match=r"layers\.0\.self_attn\.q_proj is a peft\.tuners\.lora\.layer\.Linear adapter "
                                        "on a pruned weight"):
        SparseTrainer(model=plain, args=training_args(tmp_path), train_dataset=token_dataset())
    model, pruned = pruned_tiny_model()
    sparse = add_sparse_lora(model, lora_config(4, 8, 0.0, ["q_proj"]))
    trainer = SparseTrainer(model=sparse, args=training_args(tmp_path), train_dataset=token_dataset())
    assert len(trainer.masks) == 14
    trainer.train()
    assert update_on_pruned_blocks(sparse, trainer.masks)["pruned_weights_a_plain_merge_would_change"] > 0
    merged = sparse.merge_and_unload()
    assert_pruned_weights_zero(merged, pruned)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, pruned_tiny_model()[0].model.layers[0]
                           .self_attn.q_proj.weight)


def test_every_model_from_model_init_is_masked_the_one_train_builds_included(tmp_path):
    pruned = pruned_tiny_model()[1]
    trainer = SparseTrainer(model_init=lambda: pruned_tiny_model()[0], args=training_args(tmp_path),
                            train_dataset=token_dataset())
    trainer.train()  # Trainer.train() calls model_init again: the model it trains is not the one __init__ saw
    assert_pruned_weights_zero(trainer.model, pruned)
    assert trainer.masks.linears == prunable_linears(trainer.model)
