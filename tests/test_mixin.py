"""SparseTrainingMixin keeps the pruned pattern in any Trainer subclass: TRL's SFTTrainer, a user's own."""

import torch
from datasets import Dataset
from test_sparse_trainer import assert_pruned_weights_zero, token_dataset, training_args
from tiny_models import tiny_llama, zero_random_blocks
from transformers import AutoModelForCausalLM, Trainer
from trl import SFTConfig, SFTTrainer

from dense_ft.masks import SparsityMasks
from dense_ft.sparse_trainer import SparseTrainingMixin
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


def test_trl_sft_trainer_keeps_the_embedded_defaults_pruned_blocks(tmp_path, embedded_pruned, embedded_corpus_dir,
                                                                    tokenizer):
    class SparseSFTTrainer(SparseTrainingMixin, SFTTrainer):
        pass

    pruned_dir = embedded_pruned / "pruned_model"
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    before = {name: m.weight.detach().clone() for name, m in prunable_linears(model).items()}
    config = SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4,
                           max_length=64, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                           disable_tqdm=True, seed=0)
    trainer = SparseSFTTrainer(model=model, args=config, train_dataset=chat_dataset(embedded_corpus_dir),
                               processing_class=tokenizer)
    assert len(trainer.masks) == 210
    trainer.train()
    assert trainer.state.global_step == 2
    reference = SparsityMasks(AutoModelForCausalLM.from_pretrained(pruned_dir))
    assert reference.violations(model) == {}
    assert sum(not torch.equal(before[name], m.weight) for name, m in prunable_linears(model).items()) == 210
