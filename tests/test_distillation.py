"""Distillation from a dense teacher: the teacher never trains, the sparsity holds, a mismatched teacher is refused."""

import json
import re
import shutil

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from test_faults import finetune
from test_sparse_lora import load_in_4bit
from tiny_models import tiny_llama, zero_random_blocks
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from dense_ft.distillation import (
    DistillationArguments,
    DistillingSparseLoraTrainer,
    DistillingSparseTrainer,
    check_teacher,
    chunked_kl,
    load_teacher,
)
from dense_ft.errors import UserError
from dense_ft.masks import SparsityMasks
from dense_ft.merge_lora import merge
from dense_ft.sparse_lora import LLAMA_TARGET_MODULES, add_sparse_lora, lora_config
from dense_ft.sparsity import is_4bit, prunable_linears


def test_chunked_kl_is_the_kl_and_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    student = torch.randn(2, 7, 50, requires_grad=True)
    hidden = torch.randn(2, 7, 8)
    valid = torch.ones(2, 7)
    valid[1, 5:] = 0
    chunked = chunked_kl(student, hidden, head, valid, temperature=2.0, chunk_tokens=3)
    teacher_log = F.log_softmax(head(hidden) / 2.0, -1)
    per_position = F.kl_div(F.log_softmax(student / 2.0, -1), teacher_log, log_target=True, reduction="none").sum(-1)
    direct = (per_position * valid).sum() / valid.sum() * 4.0
    assert torch.allclose(chunked, direct, atol=1e-6)
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    (direct_grad,) = torch.autograd.grad(direct, student)
    assert torch.allclose(chunked_grad, direct_grad, atol=1e-6) and chunked_grad[1, 5:].abs().max() == 0


def token_blocks(vocab_size: int, count: int = 8, length: int = 32) -> Dataset:
    ids = torch.randint(vocab_size, (count, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("loss, method", [("kl", "full"), ("kl+ce", "full"), ("squarehead", "full"),
                                          ("squarehead", "full, torch.compile"), ("kl", "lora"), ("kl+ce", "lora"),
                                          ("kl+ce", "qlora")])
def test_the_teacher_never_trains_and_the_sparsity_holds(loss, method, tmp_path, tiny_pruned_dir, tiny_dense_dir):
    pruned = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    student = load_in_4bit(tiny_pruned_dir) if method == "qlora" else pruned
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dense_dir).requires_grad_(False).eval()
    teacher_before = {name: p.detach().clone() for name, p in teacher.state_dict().items()}
    args = TrainingArguments(tmp_path / "out", max_steps=2, save_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none", logging_steps=1,
                             torch_compile=method.endswith("torch.compile"))
    kwargs = dict(args=args, train_dataset=token_blocks(student.config.vocab_size), teacher=teacher,
                  distillation=DistillationArguments(teacher_model=str(tiny_dense_dir), distill_loss=loss,
                                                     distill_chunk_tokens=8))
    reference = SparsityMasks(pruned)
    before = {name: linear.weight.detach().clone() for name, linear in prunable_linears(pruned).items()}
    if method.startswith("full"):
        trainer = DistillingSparseTrainer(model=student, **kwargs)
    else:
        adapted = add_sparse_lora(student, lora_config(4, 8, 0.0, LLAMA_TARGET_MODULES))
        trainer = DistillingSparseLoraTrainer(model=adapted, **kwargs)
    trainer.train()

    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()} and not trainer.optimizer.state.keys() & set(
        teacher.parameters())
    assert all(torch.equal(p, teacher_before[name]) for name, p in teacher.state_dict().items())
    saved = next((tmp_path / "out" / "checkpoint-2").glob("*.safetensors"))
    with safe_open(saved, "pt") as file:
        assert file.keys() and not any("teacher" in key for key in file.keys())
    assert all(f"{term}_loss" in trainer.state.log_history[0] for term in ("ce", "kl"))
    assert ("squarehead_loss" in trainer.state.log_history[0]) == (loss == "squarehead")

    if method == "qlora":  # merged into the unquantized model, as finetune.py does
        trainer.model.save_pretrained(tmp_path / "adapter")
        merge(str(tiny_pruned_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    else:
        model = trainer.model.merge_and_unload() if method == "lora" else student
    assert reference.violations(model) == {}
    assert any(not torch.equal(linear.weight, before[name]) for name, linear in prunable_linears(model).items())


def test_label_smoothing_smooths_the_cross_entropy_term(tmp_path, tiny_pruned_dir, tiny_dense_dir):
    def first_log(smoothing):
        args = TrainingArguments(tmp_path / str(smoothing), max_steps=1, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to="none", logging_steps=1, save_strategy="no",
                                 label_smoothing_factor=smoothing)
        student = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
        trainer = DistillingSparseTrainer(
            model=student, args=args, train_dataset=token_blocks(student.config.vocab_size),
            teacher=AutoModelForCausalLM.from_pretrained(tiny_dense_dir).requires_grad_(False).eval(),
            distillation=DistillationArguments(teacher_model=str(tiny_dense_dir), distill_loss="kl+ce"))
        trainer.train()
        assert trainer.masks.violations() == {}
        return trainer.state.log_history[0]

    plain, smoothed = first_log(0.0), first_log(0.1)
    assert smoothed["kl_loss"] == pytest.approx(plain["kl_loss"], rel=1e-6)
    assert abs(smoothed["ce_loss"] - plain["ce_loss"]) > 1e-4


def test_a_mismatched_teacher_is_refused(tmp_path, tokenizer):
    student = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(UserError, match=r"the teacher's vocabulary \(256 tokens\) differs from the student's"):
        check_teacher(tiny_llama(), tokenizer, student, tokenizer, "kl")
    other_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other_tokenizer.add_tokens(["<not in the student's>"])
    with pytest.raises(UserError, match="the teacher's tokenizer differs from the student's"):
        check_teacher(tiny_llama(vocab_size=len(tokenizer)), other_tokenizer, student, tokenizer, "kl")
    deeper = tiny_llama(vocab_size=len(tokenizer), layers=3)
    check_teacher(deeper, tokenizer, student, tokenizer, "kl+ce")  # logits only: any depth
    with pytest.raises(UserError, match="the teacher has 3 layers of 64, the student 2 of 64"):
        check_teacher(deeper, tokenizer, student, tokenizer, "squarehead")
    pruned = tiny_llama(vocab_size=len(tokenizer))
    zero_random_blocks(pruned)
    with pytest.warns(UserWarning, match="the teacher has a sparsity_pattern: it is pruned itself"):
        check_teacher(pruned, tokenizer, student, tokenizer, "kl")


@pytest.mark.parametrize("teacher", ["{student}", "{student}/", "{link}"])
def test_the_student_as_its_own_teacher_is_refused(teacher, tmp_path, tiny_pruned_dir, small_corpus_dir):
    (tmp_path / "link").symlink_to(tiny_pruned_dir)
    teacher = teacher.format(student=tiny_pruned_dir, link=tmp_path / "link")
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "out", "--max_steps", 2,
                              "--teacher_model", teacher, "--distill_loss", "kl")
    assert status == 2
    assert err.strip().splitlines()[-1] == (f"error: --teacher_model {teacher} is the model being fine-tuned: its KL "
                                            "to itself is 0; give the dense model it was pruned from")
    assert not (tmp_path / "out").exists()


TEACHER_IN_4BIT = '{"quantization_config": {"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}}'


def test_the_teacher_loads_in_4bit_from_its_init_kwargs_frozen_and_near_the_dense_one(tmp_path, tokenizer,
                                                                                      tiny_dense_dir):
    student = tiny_llama(vocab_size=len(tokenizer))
    args = TrainingArguments(tmp_path, report_to="none")
    dense = load_teacher(DistillationArguments(teacher_model=str(tiny_dense_dir)), student, tokenizer, args)
    quantized = load_teacher(DistillationArguments(teacher_model=str(tiny_dense_dir),
                                                   teacher_model_init_kwargs=TEACHER_IN_4BIT), student, tokenizer, args)
    assert not any(map(is_4bit, dense.parameters())) and all(
        is_4bit(linear.weight) for linear in prunable_linears(quantized).values())
    assert not quantized.training and not any(p.requires_grad for p in quantized.parameters())
    ids = token_blocks(len(tokenizer), count=2)["input_ids"]
    with torch.no_grad():
        logits = [teacher(input_ids=torch.tensor(ids)).logits.flatten() for teacher in (dense, quantized)]
    assert 0 < (logits[0] - logits[1]).norm() < 0.2 * logits[0].norm()  # nf4-rounded: 10% off here


@pytest.mark.parametrize("kwargs, message", [
    ('{"device_map": "auto", "dtype": "float16"}', "cannot set device_map, dtype: the teacher runs in the training "
                                                   "precision, on each process's device"),
    ('{"quantization_config": ', "is not valid JSON: Expecting value: line 1 column 25"),
    ('["load_in_4bit"]', 'must be a JSON object, got ["load_in_4bit"]'),
])
def test_teacher_init_kwargs_that_would_place_it_or_are_no_json_object_are_refused(kwargs, message, tiny_pruned_dir):
    arguments = DistillationArguments(teacher_model="dense", teacher_model_init_kwargs=kwargs)
    with pytest.raises(UserError, match=f"^--teacher_model_init_kwargs {re.escape(message)}"):
        arguments.validate(str(tiny_pruned_dir))
    with pytest.raises(UserError, match="^--teacher_model_init_kwargs goes with --teacher_model$"):
        DistillationArguments(teacher_model_init_kwargs=kwargs).validate(str(tiny_pruned_dir))


def test_sparse_qlora_distills_from_a_teacher_in_4bit_and_resumes_only_with_it(tmp_path, tiny_pruned_dir,
                                                                                tiny_dense_dir, small_corpus_dir):
    output = tmp_path / "out"
    flags = ["--lora", "--load_in_4bit", "--teacher_model", tiny_dense_dir, "--save_steps", 1]
    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 1, *flags,
                                "--teacher_model_init_kwargs", TEACHER_IN_4BIT)
    assert status == 0, err[-2000:]
    assert f"loss kl+ce, temperature 1, weight 1; teacher loaded with {TEACHER_IN_4BIT}" in out
    assert f"| teacher loaded with | {TEACHER_IN_4BIT} |" in (output / "README.md").read_text()
    assert "Sparsity maintained: yes" in out and "Step 1: loss=" in out and ", kl=" in out
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, *flags)
    assert status == 2 and "belongs to another run (distillation {'init_kwargs': {'quantization_config'" in err
    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, *flags,
                                "--teacher_model_init_kwargs", TEACHER_IN_4BIT)
    assert status == 0 and f"Resuming from checkpoint {output}/checkpoint-1" in out, err[-2000:]


def test_finetune_with_a_teacher_logs_each_term(tmp_path, tiny_pruned_dir, tiny_dense_dir, small_corpus_dir):
    output = tmp_path / "out"  # no --distill_loss: the default, kl+ce
    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2,
                                "--teacher_model", tiny_dense_dir)
    assert status == 0, err[-2000:]
    assert f"Distilling from {tiny_dense_dir}: loss kl+ce, temperature 1, weight 1" in out
    assert "Step 2: loss=" in out and ", kl=" in out and "(ce=" in out
    assert "Sparsity maintained: yes" in out and "| teacher |" in (output / "README.md").read_text()
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    step = next(record for record in history if "kl_loss" in record)
    assert step["loss"] == pytest.approx(step["ce_loss"] + step["kl_loss"], rel=1e-3)

    deeper = tmp_path / "deeper teacher"
    tiny_llama(vocab_size=len(AutoTokenizer.from_pretrained(tiny_dense_dir)), layers=3).save_pretrained(deeper)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dense_dir / name, deeper)
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "refused", "--max_steps", 2,
                              "--teacher_model", deeper, "--distill_loss", "squarehead")
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: squarehead compares hidden states")

