"""The fine-tuning entry point and the sparsity check, run as users run them (their ``main()`` with the
command's arguments, in this process unless the process itself is under test)."""

import copy
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import datasets
import pytest
import torch
from conftest import REPO_ROOT, file_contents, hub_cache, run_main, with_remote_code, without_tokenizer
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dense_ft import text
from dense_ft.check_sparsity import main as check_sparsity_main
from dense_ft.finetune import group_texts
from dense_ft.finetune import main as finetune_main
from dense_ft.masks import SparsityMasks
from dense_ft.sparse_lora import load_sparse_lora
from dense_ft.sparsity import check_sparsity, prunable_linears
from dense_ft.wanda import prune_wanda_blocks

FINETUNE = "dense_ft/finetune.py"


def finetune_args(model_dir, corpus_dir, output_dir, *extra):
    return [FINETUNE, "--model_name_or_path", model_dir, "--dataset_dir", corpus_dir, "--output_dir", output_dir,
            "--block_size", 32, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, "--logging_steps", 1,
            "--max_eval_samples", 4, "--report_to", "none", "--disable_tqdm", "true", "--seed", 0, *extra]


def run_finetune(*args) -> subprocess.CompletedProcess:
    """``finetune.py`` with ``finetune_args(*args)``, run in this process."""
    return run_main(finetune_main, *finetune_args(*args)[1:])


def check_sparsity_cli(*args):
    return run_main(check_sparsity_main, *args)


@pytest.mark.parametrize("method", [[], ["--lora"], ["--lora", "--load_in_4bit"], ["--save_only_model", "true"],
                                    ["--streaming"]],
                         ids=["full", "lora", "qlora", "model-only checkpoints", "streaming"])
def test_sigint_saves_a_checkpoint_and_the_rerun_resumes(method, tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "run"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 400, "--save_steps", 1000, *method)
    process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Step 3:"):
            process.send_signal(signal.SIGINT)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=120) == 130, "".join(lines[-30:])
    stopped = re.search(r"interrupted at step (\d+): checkpoint saved to (\S+)\.", "".join(lines))
    assert stopped, "".join(lines[-30:])
    step = int(stopped.group(1))
    assert 3 <= step < 400 and os.path.isfile(os.path.join(stopped.group(2), "optimizer.pt"))
    assert not (output / "model.safetensors").exists()

    rerun = run_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", step + 2, *method)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"Resuming from checkpoint {stopped.group(2)}" in rerun.stdout
    assert f"Step {step + 1}:" in rerun.stdout and "Step 1:" not in rerun.stdout
    assert "Sparsity maintained: yes" in rerun.stdout
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == step + 2
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (output / name).exists(), name
    check = check_sparsity_cli(output, "--reference", tiny_pruned_dir)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout


@pytest.mark.parametrize("change, message", [
    ({"--model_name_or_path": "missing/pruned/model"}, "model directory not found"),
    ({"--model_name_or_path": "{tmp}/truncated_model"}, "a weights file is truncated or corrupted"),
    ({"--model_name_or_path": "{tmp}/unknown_type"},
     "has model type `llama9` but Transformers does not recognize this architecture (transformers 5."),
    ({"--dataset_dir": "{tmp}/no_corpus"}, "lacks wiki.train.raw"),
    ({"--dataset_dir": "{tmp}/empty_valid"}, "text file is empty: {tmp}/empty_valid/wiki.valid.raw"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/empty.txt"}, "text file is empty: {tmp}/empty.txt"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/latin1.txt"}, "{tmp}/latin1.txt is not UTF-8 text (byte 9)"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/no_text.jsonl"}, "needs a column 'text' of strings to train on"),
    ({"--train_file": "{tmp}/empty.txt"}, "give one source of training data, not --dataset_dir and --train_file"),
    ({"--validation_file": "{tmp}/empty.txt"}, "--validation_file goes with --train_file"),
    ({"--validation_split_percentage": "100"}, "--validation_split_percentage must be in [0, 100), got 100"),
    ({"--block_size": "100000"}, "exceeds the model's 256 positions"),
    ({"--block_size": "0"}, "--block_size must be a positive number of tokens, got 0"),
    ({"--dataset_dir": "{tmp}/tiny_corpus"}, "no training sequence of 32 tokens"),
    ({"--learning_rate": "-1"}, "--learning_rate must be a positive finite number, got -1.0"),
    ({"--learning_rate": "1e400"}, "--learning_rate must be a positive finite number, got inf"),
    ({"--learning_rate": "1e38", "--optim": "adamw_torch"}, "--learning_rate 1e+38 is far too high: the optimizer's"),
    ({"--per_device_train_batch_size": "0"}, "--per_device_train_batch_size must be 1 or more, got 0"),
    ({"--gradient_accumulation_steps": "0"}, "--gradient_accumulation_steps must be 1 or more, got 0"),
    ({"--effective_batch_size": "0"}, "--effective_batch_size must be 1 or more, got 0"),
    ({"--seed": "-1"}, "--seed must be in [0, 2**32), got -1"),
    ({"--dataloader_num_workers": "-1"}, "--dataloader_num_workers must be 0 or more, got -1"),
    ({"--preprocessing_num_workers": "-2"}, "--preprocessing_num_workers must be 0 or more, got -2"),
    ({"--max_steps": "-1", "--num_train_epochs": "0"},
     "--num_train_epochs must be a positive finite number (or give --max_steps), got 0.0"),
    ({"--weight_decay": "nan"}, "--weight_decay must be a finite number >= 0, got nan"),
    ({"--adam_beta1": "1"}, "--adam_beta1 must be in [0, 1), got 1.0"),
    ({"--max_grad_norm": "nan"}, "--max_grad_norm must be a number (0 or less: no clipping), got nan"),
    ({"--lora": "true", "--lora_alpha": "nan"}, "--lora needs --lora_r >= 1, a finite --lora_alpha > 0"),
    ({"--load_in_4bit": "true"}, "--load_in_4bit freezes the weights in 4-bit, where they cannot train: add --lora"),
    ({"--lora": "true", "--use_bnb_nested_quant": "true"}, "--use_bnb_nested_quant goes with --load_in_4bit"),
    ({"--teacher_model": "{tmp}/model", "--distill_temperature": "nan"},
     "distillation needs a finite --distill_temperature > 0"),
    ({"--bogus": "1"}, "Some specified arguments are not used by the HfArgumentParser: ['--bogus', '1']"),
    ({"--resume_from_checkpoint": "{tmp}/nowhere"}, "--resume_from_checkpoint {tmp}/nowhere not found"),
    ({"--resume_from_checkpoint": "{tmp}/no_corpus"}, "is an incomplete checkpoint"),
    ({"--torch_dtype": "float16", "--fp16": "true"}, "--fp16 needs float32 weights"),
    ({"--dtype": "float16", "--fp16": "true"}, "--fp16 needs float32 weights"),  # run_clm.py's name, the same flag
    ({"--model_name_or_path": "{tmp}/model", "--output_dir": "{tmp}/model"},
     "--output_dir {tmp}/model is the --model_name_or_path directory, which the run would overwrite"),
    ({"--teacher_model": "{tmp}/model", "--output_dir": "{tmp}/model"},
     "--output_dir {tmp}/model is the --teacher_model directory"),
    ({"--optim": "galore_adamw_layerwise", "--optim_target_modules": "all-linear"},
     "--optim galore_adamw_layerwise steps each weight inside backward, before the masks can act on its gradient"),
    ({"--report_to": "bogus"}, "--report_to: bogus is not supported, only azure_ml,"),
    ({"--push_to_hub": "true"}, "--push_to_hub: cannot create the Hub repository out: "),  # offline
    ({"--cache_dir": "{tmp}/empty.txt"}, "--cache_dir {tmp}/empty.txt is a file"),
    ({"--streaming": "true", "--max_steps": "-1"}, "--streaming needs --max_steps: a stream has no length"),
    ({"--streaming": "true", "--overwrite_cache": "true"}, "--overwrite_cache does not apply to --streaming"),
    ({"--dataset_dir": "{tmp}/tiny_corpus", "--streaming": "true"}, "no training sequence of 32 tokens"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/latin1.txt", "--streaming": "true"},
     "{tmp}/latin1.txt: not UTF-8 text (invalid continuation byte): convert it"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/broken.jsonl", "--streaming": "true"},
     "cannot read {tmp}/broken.jsonl: JSON parse error"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/no_text.jsonl", "--streaming": "true"},
     "needs a column 'text' of strings to train on"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/no_text.jsonl", "--keep_linebreaks": "false"},
     "--keep_linebreaks applies to plain text files (--train_file, --dataset_dir), not to {tmp}/no_text.jsonl"),
    ({"--dataset_dir": "", "--train_file": "{tmp}/empty_valid/wiki.train.raw", "--eval_strategy": "steps",
      "--validation_split_percentage": "0"},
     "--eval_strategy steps needs validation text of 32 tokens or more (--validation_file, or the validation"),
    pytest.param({"--use_liger_kernel": "true"}, "--use_liger_kernel needs liger-kernel >= 0.3.0",
                 marks=pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                                          reason="liger-kernel is installed")),
    pytest.param({"--report_to": "tensorboard"}, "--report_to: TensorBoardCallback requires tensorboard",
                 marks=pytest.mark.skipif(any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))),
                                          reason="tensorboard is installed")),
    pytest.param({"--lora": "true", "--load_in_4bit": "true"}, "--load_in_4bit needs bitsandbytes",
                 marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                                          reason="bitsandbytes is installed")),
    pytest.param({"--optim": "adamw_torch_8bit"}, "--optim adamw_torch_8bit: You need to have `torchao",
                 marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is not None,
                                          reason="torchao is installed")),
])
def test_bad_input_fails_in_one_line_and_keeps_the_output_dir(change, message, tmp_path, tiny_pruned_dir,
                                                              small_corpus_dir, capsys):
    (tmp_path / "no_corpus").mkdir()
    (tmp_path / "tiny_corpus").mkdir()
    for split in ("train", "valid"):
        (tmp_path / "tiny_corpus" / f"wiki.{split}.raw").write_text(" = A = \n Short . \n")
    shutil.copytree(small_corpus_dir, tmp_path / "empty_valid")
    (tmp_path / "empty_valid" / "wiki.valid.raw").write_text("")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no_text.jsonl").write_text('{"content": "Words."}\n')
    (tmp_path / "unknown_type").mkdir()  # a model newer than this transformers
    config = json.loads((tiny_pruned_dir / "config.json").read_text())
    (tmp_path / "unknown_type" / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
    (tmp_path / "broken.jsonl").write_text('{"text": "Words."}\n{"text": broken\n')
    (tmp_path / "latin1.txt").write_bytes("Text, caf\xe9 au lait".encode("latin-1"))
    shutil.copytree(tiny_pruned_dir, tmp_path / "truncated_model")
    shutil.copytree(tiny_pruned_dir, tmp_path / "model")
    weights = (tmp_path / "truncated_model" / "model.safetensors").read_bytes()
    (tmp_path / "truncated_model" / "model.safetensors").write_bytes(weights[:len(weights) // 3])
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("saved earlier")
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 1)[1:]
    for flag, value in change.items():
        value = value.format(tmp=tmp_path)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert message.format(tmp=tmp_path) in stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(output)) == ["keep.txt"] and (output / "keep.txt").read_text() == "saved earlier"
    assert file_contents(tmp_path / "model") == file_contents(tiny_pruned_dir)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_a_bitsandbytes_optimizer_on_the_cpu_with_a_release_before_0_50_is_refused_before_training(
        tmp_path, tiny_pruned_dir, small_corpus_dir, monkeypatch, capsys):
    """Metadata of bitsandbytes 0.49.0 first on the path, as an environment with that release reads: its optimizers
    fail at their first step on the CPU, with a traceback."""
    dist_info = tmp_path / "bitsandbytes-0.49.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.49.0\n")
    monkeypatch.syspath_prepend(tmp_path)
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, tmp_path / "out", "--max_steps", 1, "--use_cpu", "true",
                         "--optim", "adamw_8bit")[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --optim adamw_8bit on the CPU needs bitsandbytes >= 0.50 (0.49.0 is installed): "
        "pip install 'bitsandbytes>=0.50', or train on a GPU")
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize("config, message", [
    ('{"model_name_or_path": "{model}",', "is not valid JSON: Expecting property name enclosed in double quotes"),
    ('["--learning_rate", "5e-5"]', "must hold a JSON object of flags and values"),
    ('{"output_dir": "{out}"}', "missing 1 required positional argument: 'model_name_or_path'"),
    ('{"model_name_or_path": "{model}", "output_dir": "{out}", "learning_rate": "5e-5"}',
     'learning_rate must be a JSON float, got "5e-5"'),
    ('{"model_name_or_path": "{model}", "output_dir": "{out}", "lora": 1}', "lora must be a JSON bool, got 1"),
    ('{"model_name_or_path": "{model}", "output_dir": "{out}", "max_steps": 2.5}', "max_steps must be a JSON int"),
    (None, "cannot read {config}: No such file or directory"),
])
def test_a_bad_json_config_is_one_line(config, message, tmp_path, tiny_pruned_dir, monkeypatch, capsys):
    path = tmp_path / "args.json"
    if config is not None:
        path.write_text(config.replace("{model}", str(tiny_pruned_dir)).replace("{out}", str(tmp_path / "out")))
    monkeypatch.setattr(sys, "argv", [FINETUNE, str(path)])
    with pytest.raises(SystemExit) as exited:
        finetune_main()
    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message.replace("{config}", str(path)) in last_line
    assert not (tmp_path / "out").exists()


def test_a_json_config_trains_as_the_same_flags_would(tmp_path, tiny_pruned_dir, small_corpus_dir, monkeypatch):
    flags = finetune_args(tiny_pruned_dir, small_corpus_dir, tmp_path / "out", "--max_steps", 2)[1:]
    config = {flag.removeprefix("--"): value if isinstance(value, int | float) else str(value)
              for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    config.update(disable_tqdm=True, num_train_epochs=1, lora=True, lora_target_modules=["q_proj", "v_proj"])
    (tmp_path / "args.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "argv", [FINETUNE, str(tmp_path / "args.json")])
    with pytest.raises(SystemExit) as exited:
        finetune_main()
    assert exited.value.code == 0
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_finished_model_is_not_overwritten_without_asking(tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "out"
    first = run_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, "--save_strategy", "no")
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (output / "model.safetensors").stat().st_mtime_ns
    again = run_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2)
    assert again.returncode == 2 and "--overwrite_output_dir" in again.stderr
    assert (output / "model.safetensors").stat().st_mtime_ns == saved
    overwrite = run_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, "--overwrite_output_dir",
                             "true")
    assert overwrite.returncode == 0, overwrite.stderr[-2000:]


@pytest.mark.parametrize("evaluation", [["--eval_strategy", "steps", "--eval_steps", 3], ["--eval_strategy", "no"]],
                         ids=["steps", "no"])
def test_the_final_evaluation_is_the_last_steps_own_when_the_loop_ran_one_there(evaluation, tmp_path, tiny_pruned_dir,
                                                                                 small_corpus_dir):
    output = tmp_path / "run"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 4, *evaluation)[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    assert exited.value.code == 0
    final = json.loads((output / "eval_results.json").read_text())
    in_loop = [record for record in json.loads((output / "trainer_state.json").read_text())["log_history"]
               if "eval_loss" in record]
    last = {key: value for key, value in in_loop[-1].items() if key != "step"}
    if "steps" in evaluation:  # the loop evaluates the final model at the last step too: its figures are reused
        assert [record["step"] for record in in_loop] == [0, 3, 4]
        assert {key: final[key] for key in last} == last  # the runtime included: no second pass
    else:  # only the evaluation before training: a new one of the final model
        assert [record["step"] for record in in_loop] == [0]
        assert final["eval_loss"] != last["eval_loss"]  # (runtimes, rounded to 0.1 ms, can be equal)
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))


@pytest.mark.parametrize("method", [[], ["--lora"]], ids=["full", "lora"])
def test_the_best_checkpoint_loaded_at_the_end_is_saved_sparse_and_named_by_its_step(method, tmp_path,
                                                                                      tiny_pruned_dir,
                                                                                      small_corpus_dir, capsys):
    output = tmp_path / "run"
    best_is_the_highest_loss = ["--metric_for_best_model", "loss", "--greater_is_better", "true"]  # the first's
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 6, "--learning_rate", 1e-2,
                         "--eval_strategy", "steps", "--eval_steps", 2, "--save_steps", 2,
                         "--load_best_model_at_end", "true", *best_is_the_highest_loss, *method)[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    out = capsys.readouterr().out
    assert exited.value.code == 0
    in_loop = re.search(r"^Evaluation at step 2: (loss=\S+),", out, re.M)
    final = re.search(r"^Evaluation of the best checkpoint \(step 2\): (loss=\S+),", out, re.M)
    assert in_loop and final and final[1] == in_loop[1], out
    assert "validation perplexity of the best checkpoint (step 2)" in (output / "README.md").read_text()
    checked = check_sparsity_cli(output, "--reference", tiny_pruned_dir)
    assert checked.returncode == 0 and "non-zero: 0" in checked.stdout, checked.stdout + checked.stderr


class FakeHub:
    """What the Hub receives: the repositories created and each upload's commit message and files (as the client
    filters them). The Hub cannot be reached from the tests; the rest of the run is real."""

    def __init__(self, monkeypatch, upload_error=None):
        self.created, self.uploads, self.upload_error = [], [], upload_error
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, folder_path, commit_message, ignore_patterns=None, run_as_future=False, **kwargs):
        if self.upload_error:
            raise self.upload_error
        paths = [path.relative_to(folder_path).as_posix() for path in Path(folder_path).rglob("*") if path.is_file()]
        files = {path: (Path(folder_path) / path).read_bytes()
                 for path in filter_repo_objects(paths, ignore_patterns=ignore_patterns)}
        self.uploads.append({"commit_message": commit_message, "files": files})
        done = Future()
        done.set_result(None)
        return done if run_as_future else None


@pytest.mark.parametrize("method", [[], ["--lora"], ["--lora", "--load_in_4bit"]], ids=["full", "lora", "qlora"])
def test_push_to_hub_sends_the_finished_output_dir_with_its_card_and_it_loads_sparse(method, tmp_path, tiny_pruned_dir,
                                                                                   small_corpus_dir, monkeypatch):
    hub = FakeHub(monkeypatch)
    output = tmp_path / "run"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 4, "--save_steps", 2,
                         "--push_to_hub", "true", "--hub_model_id", "me/sparse", *method)[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    assert exited.value.code == 0
    assert hub.created and set(hub.created) == {"me/sparse"}
    final = hub.uploads[-1]
    assert final["commit_message"] == "End of training"
    assert final["files"] == {path.as_posix(): data for path, data in file_contents(output).items()
                              if not path.parts[0].startswith("checkpoint-")}
    assert b"## Sparsity check" in final["files"]["README.md"]
    # A plain adapter at the top would make from_pretrained load the pruned model plus a dense LoRA update.
    assert all("adapter_config.json" not in upload["files"] for upload in hub.uploads)
    pushed = AutoModelForCausalLM.from_pretrained(output)
    assert SparsityMasks(LlamaForCausalLM.from_pretrained(tiny_pruned_dir)).violations(pushed) == {}
    # Full fine-tuning pushes at every save, as the Trainer does; a LoRA checkpoint holds only the adapter.
    assert len(hub.uploads) == (1 if method else 3)


@pytest.mark.parametrize("error, reported", [(ConnectionError("\nConnection reset by peer\nretried 5 times"),
                                               "Connection reset by peer"),
                                              (ConnectionError(), "ConnectionError")])
def test_a_failed_push_keeps_the_model_and_says_how_to_push_it(error, reported, tmp_path, tiny_pruned_dir,
                                                               small_corpus_dir, monkeypatch, capsys):
    FakeHub(monkeypatch, upload_error=error)
    output = tmp_path / "run"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, "--save_strategy", "no",
                         "--push_to_hub", "true", "--hub_model_id", "me/sparse")[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: the model is saved in {output}, but pushing it to me/sparse failed: {reported}; "
        f"push it with: hf upload me/sparse {output} --exclude 'checkpoint-*'")
    assert (output / "model.safetensors").exists() and (output / "README.md").exists()


def test_check_sparsity_reference_catches_a_planted_violation(tmp_path, tiny_pruned_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    name, linear = list(prunable_linears(model).items())[3]
    row, col = (linear.weight == 0).nonzero()[0].tolist()
    with torch.no_grad():
        linear.weight[row, col] = 1e-6
    model.save_pretrained(tmp_path / "violated")

    clean = check_sparsity_cli(tiny_pruned_dir, "--reference", tiny_pruned_dir, "--per_layer")
    assert clean.returncode == 0
    assert re.search(r"^Sparsity: 0\.\d{4}$", clean.stdout, re.M) and f"{name}  " in clean.stdout

    violated = check_sparsity_cli(tmp_path / "violated", "--reference", tiny_pruned_dir, "--json")
    assert violated.returncode == 1
    report = json.loads(violated.stdout)
    assert report["violations"] == 1 and report["violating_layers"] == {name: 1}
    text = check_sparsity_cli(tmp_path / "violated", "--reference", tiny_pruned_dir)
    assert text.returncode == 1 and "non-zero: 1" in text.stdout and f"  {name}: 1" in text.stdout

    missing = check_sparsity_cli(tmp_path / "nowhere/at/all")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: model directory")


def test_check_sparsity_counts_the_blocks_a_wanda_pruned_model_lost_without_a_reference(tmp_path, capsys):
    model = tiny_llama()
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    prune_wanda_blocks(model, windows, 0.2, 16, "cpu", progress=False)
    model.save_pretrained(tmp_path / "pruned")
    down_proj = model.model.layers[1].mlp.down_proj.weight  # 64 x 128: 32 blocks, 6 of them pruned
    row, col = (down_proj == 0).nonzero()[0].tolist()
    with torch.no_grad():
        down_proj[row, col] = 1e-6  # one weight of one pruned block
    model.save_pretrained(tmp_path / "filled")

    def check(directory):
        with pytest.raises(SystemExit) as exited:
            check_sparsity_main([str(tmp_path / directory), "--json"])
        return exited.value.code, json.loads(capsys.readouterr().out)

    code, report = check("pruned")
    assert code == 0 and report["pruned_blocks_lost"] == 0 and report["layers_that_lost_blocks"] == {}
    code, report = check("filled")
    assert code == 1 and report["pruned_blocks_lost"] == 1
    assert report["layers_that_lost_blocks"] == {"model.layers.1.mlp.down_proj": 1}


def check_resumes_exactly_after_step_2(args, output, first):
    """A 4-step run that saved every 2 steps, run again as if it had stopped after step 2: it resumes there and
    logs the losses of steps 3 and 4 that ``first`` logged."""
    shutil.rmtree(output / "checkpoint-4")
    rerun = run_main(finetune_main, *args[1:])
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"Resuming from checkpoint {output / 'checkpoint-2'}" in rerun.stdout
    losses = [re.findall(r"^Step [34]: loss=\S+$", run.stdout, re.M) for run in (first, rerun)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_a_lora_run_resumes_exactly_and_saves_adapter_and_sparse_merged_model(tmp_path, tiny_pruned_dir,
                                                                              small_corpus_dir):
    output = tmp_path / "lora"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 4, "--save_steps", 2, "--lora",
                         "--lora_r", 4, "--lora_target_modules", "q_proj", "v_proj", "down_proj")
    first = run_main(finetune_main, *args[1:])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "*** Starting sparse LoRA fine-tuning ***" in first.stdout
    trainable = int(re.search(r"Trainable params: ([\d,]+)", first.stdout).group(1).replace(",", ""))
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))  # two layers, rank 4: q, v (2 KV heads), down
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt"):
        assert (output / "checkpoint-2" / name).exists(), name
    assert (output / "adapter" / "adapter_model.safetensors").exists() and (output / "model.safetensors").exists()
    assert json.loads((output / "config.json").read_text())["sparsity_pattern"]["block_size"] == 16
    check = check_sparsity_cli(output, "--reference", tiny_pruned_dir)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout
    card = (output / "README.md").read_text()
    assert "| LoRA rank | 4 |" in card and "| pruned weights that are non-zero | 0 |" in card

    check_resumes_exactly_after_step_2(args, output, first)


def test_a_qlora_run_trains_on_4bit_weights_resumes_and_saves_its_adapter_merged_unquantized(tmp_path,
                                                                                             tiny_pruned_dir,
                                                                                             small_corpus_dir):
    output = tmp_path / "qlora"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 4, "--save_steps", 2, "--lora",
                         "--lora_r", 4, "--load_in_4bit")
    first = run_main(finetune_main, *args[1:])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    pruned = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    initial = re.search(r"^Initial model sparsity: (\S+) in 4-bit, .*; pruned: (\S+)$", first.stdout, re.M)
    assert float(initial[2]) == round(check_sparsity(pruned), 4) < float(initial[1])  # nf4 makes zeros too
    assert "Base weights: 4-bit nf4 (QLoRA)" in first.stdout
    assert "Evaluated: the model as trained (4-bit nf4, with the adapter)" in first.stdout

    merged = AutoModelForCausalLM.from_pretrained(output)
    assert getattr(merged.config, "quantization_config", None) is None
    expected = load_sparse_lora(copy.deepcopy(pruned), output / "adapter").merge_and_unload()
    assert all(torch.equal(weight, expected.state_dict()[name]) for name, weight in merged.state_dict().items())
    assert SparsityMasks(pruned).violations(merged) == {}
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], pruned.state_dict()[q_proj])
    assert f"Final model sparsity: {check_sparsity(merged):.4f}" in first.stdout
    check = check_sparsity_cli(output, "--reference", tiny_pruned_dir)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout
    assert "| weights | 4-bit nf4 in training, evaluated so; merged into the model in float32 |" in (
        output / "README.md").read_text()

    check_resumes_exactly_after_step_2(args, output, first)
    shutil.rmtree(output / "checkpoint-4")
    unquantized = run_main(finetune_main, *args[1:-1])  # the same run on unquantized weights: another run
    assert unquantized.returncode == 2 and "belongs to another run" in unquantized.stderr.strip().splitlines()[-1]


def test_lora_bad_settings_are_one_line(tmp_path, tiny_pruned_dir, small_corpus_dir):
    for extra, message in ((["--lora_r", 0], "--lora needs --lora_r >= 1"),
                           (["--lora_target_modules", "nowhere_proj"], "--lora_target_modules")):
        result = run_finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "out", "--lora", *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1]


def test_check_sparsity_streams_sharded_checkpoints(tmp_path, tiny_pruned_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 3
    name, linear = list(prunable_linears(model).items())[5]
    row, col = (linear.weight == 0).nonzero()[-1].tolist()
    with torch.no_grad():
        linear.weight[row, col] = 0.5
    model.save_pretrained(tmp_path / "violated", max_shard_size="100KB")

    whole = json.loads(check_sparsity_cli(tiny_pruned_dir, "--per_layer", "--json").stdout)
    sharded = check_sparsity_cli(tmp_path / "sharded", "--reference", tiny_pruned_dir, "--per_layer", "--json")
    assert sharded.returncode == 0 and json.loads(sharded.stdout)["layers"] == whole["layers"]
    assert set(whole["layers"]) == set(prunable_linears(model))
    layer_numbers = [int(name.split(".")[2]) for name in whole["layers"]]
    assert layer_numbers == sorted(layer_numbers)  # layer order, not string order
    violated = check_sparsity_cli(tmp_path / "violated", "--reference", tmp_path / "sharded", "--json")
    assert violated.returncode == 1 and json.loads(violated.stdout)["violating_layers"] == {name: 1}

    config = tiny_llama().config  # same layer names, other shapes: one line, not a traceback
    config.intermediate_size = 256
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    mismatch = check_sparsity_cli(tmp_path / "other", "--reference", tiny_pruned_dir)
    assert mismatch.returncode == 2 and "Traceback" not in mismatch.stderr
    assert mismatch.stderr.strip().splitlines()[-1].startswith("error: model.layers.0.mlp.down_proj is (64, 256)")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_pruned_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    broken = check_sparsity_cli(truncated, "--reference", tiny_pruned_dir)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith(f"error: cannot read {truncated / 'model.safetensors'}")


@pytest.mark.parametrize("streaming", [False, True], ids=["read whole", "streamed"])
def test_data_without_a_validation_split_holds_out_rows_as_run_clm_does(streaming, tmp_path, tiny_pruned_dir,
                                                                        small_corpus_dir, monkeypatch):
    """A Hub data set with a train split alone (the Hub here: a JSON lines file with the columns such sets have).
    Read whole, its first 5% rows are held out; streamed, the first 5 rows of every 100."""
    lines = (small_corpus_dir / "wiki.train.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = tmp_path / "stories.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": line}) + "\n" for i, line in enumerate(lines)))
    monkeypatch.setattr(text, "load_dataset", lambda name, config=None, **options: datasets.load_dataset(
        "json", data_files={"train": str(rows)}, **options))
    output = tmp_path / "out"
    args = finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 1, "--dataset_dir", "",
                         "--dataset_name", "user/stories", "--max_eval_samples", 1000,
                         *(["--streaming"] if streaming else []))[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    assert exited.value.code == 0
    if streaming:
        held_out = [line for i, line in enumerate(lines) if i % 100 < 5]
    else:
        held_out = lines[:round(len(lines) * 5 / 100)]
    blocks = torch.tensor(group_texts(AutoTokenizer.from_pretrained(tiny_pruned_dir)(held_out), 32)["input_ids"])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(output)(input_ids=blocks, labels=blocks).loss.item()
    assert json.loads((output / "eval_results.json").read_text())["eval_loss"] == pytest.approx(expected, rel=1e-5)
    marker = json.loads((output / "checkpoint-1" / "dense_ft_checkpoint.json").read_text())
    assert marker["run"]["validation_split_percentage"] == 5
    assert marker["run"].get("streaming", False) == streaming


def test_a_stream_trains_on_the_blocks_the_data_set_gives_in_order_and_keeps_the_pruned_blocks(
        tmp_path, tiny_pruned_dir, small_corpus_dir):
    common = ["--max_steps", 3, "--save_strategy", "no"]
    in_order = run_finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "in_order", *common,
                            "--train_sampling_strategy", "sequential")
    streamed = run_finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "streamed", *common, "--streaming")
    assert in_order.returncode == 0 and streamed.returncode == 0, streamed.stderr[-3000:]
    assert "Sparsity maintained: yes" in streamed.stdout
    for name in ("initial_eval_results.json", "eval_results.json"):
        perplexities = [json.loads((tmp_path / run / name).read_text())["perplexity"]
                        for run in ("in_order", "streamed")]
        assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-6), name
    one, other = (load_file(tmp_path / run / "model.safetensors") for run in ("in_order", "streamed"))
    pruned = load_file(tiny_pruned_dir / "model.safetensors")
    assert any((one[name] - pruned[name]).abs().max() > 1e-4 for name in one)
    for name in one:
        assert torch.allclose(one[name], other[name], atol=1e-6), name
    check = check_sparsity_cli(tmp_path / "streamed", "--reference", tiny_pruned_dir)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout


def test_a_stream_that_turns_unreadable_mid_run_stops_in_one_line_and_keeps_its_checkpoints(
        tmp_path, tiny_pruned_dir, monkeypatch, capsys):
    """Tokenized 1,000 rows at a time (about 35 steps here), a stream reads the bad byte after its first 2,000 rows
    only once it has trained on most of them."""
    train = tmp_path / "train.txt"
    train.write_bytes(b"".join(f"Line {i} of plain words .\n".encode() for i in range(2000)) + b"caf\xe9\n")
    monkeypatch.setattr(text, "load_dataset", functools.partial(datasets.load_dataset, chunksize=4096))
    output = tmp_path / "out"
    args = finetune_args(tiny_pruned_dir, tmp_path, output, "--dataset_dir", "", "--train_file", train,
                         "--validation_split_percentage", 0, "--per_device_train_batch_size", 8, "--max_steps", 100,
                         "--save_steps", 20, "--streaming")[1:]
    with pytest.raises(SystemExit) as exited:
        finetune_main(list(map(str, args)))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"error: {train}: not UTF-8 text (invalid continuation byte): "
                                               "convert it, e.g. with iconv -t utf-8")
    assert (output / "checkpoint-20").is_dir()


@pytest.mark.parametrize("method", [[], ["--lora", "--load_in_4bit"]], ids=["full", "qlora"])
def test_a_model_saved_without_its_tokenizer_trains_with_tokenizer_name_and_saves_that_one(
        method, tmp_path, tiny_pruned_dir, small_corpus_dir, tokenizer):
    """As SparseGPT's script saves a pruned model: weights and config alone. QLoRA's merge loads the model again."""
    bare = without_tokenizer(tiny_pruned_dir, tmp_path / "bare")
    missing = run_finetune(bare, small_corpus_dir, tmp_path / "out", "--max_steps", 2, *method)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot load a tokenizer from '{bare}'")

    named = run_finetune(bare, small_corpus_dir, tmp_path / "out", "--max_steps", 2, "--tokenizer_name",
                         tiny_pruned_dir, *method)
    assert named.returncode == 0, named.stderr[-3000:]
    assert "Sparsity maintained: yes" in named.stdout
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == tokenizer.get_vocab()
    check = check_sparsity_cli(tmp_path / "out", "--reference", tiny_pruned_dir)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout
    marker = json.loads(next((tmp_path / "out").glob("checkpoint-*/dense_ft_checkpoint.json")).read_text())
    assert marker["run"]["tokenizer"] == str(tiny_pruned_dir.resolve())


@pytest.mark.parametrize("method", [["--teacher_model", "{dense}", "--distill_loss", "kl"],
                                    ["--lora", "--load_in_4bit"]], ids=["full, distilled", "qlora"])
def test_a_model_with_its_own_code_trains_sparse_only_with_trust_remote_code(method, tmp_path, tiny_pruned_dir,
                                                                             tiny_dense_dir, small_corpus_dir):
    """The teacher (its dense original) runs the same code; QLoRA's merge loads the model a second time."""
    pruned = with_remote_code(tiny_pruned_dir, tmp_path / "pruned")
    dense = with_remote_code(tiny_dense_dir, tmp_path / "dense")
    method = [flag.format(dense=dense) for flag in method]
    output = tmp_path / "out"
    refused = run_finetune(pruned, small_corpus_dir, output, "--max_steps", 2, *method)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: {pruned} holds its own code, which runs only with --trust_remote_code: read it, then pass that flag")
    trained = run_finetune(pruned, small_corpus_dir, output, "--max_steps", 2, "--trust_remote_code", "true",
                           *method)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Sparsity maintained: yes" in trained.stdout
    assert (output / "modeling_tiny.py").is_file()
    assert json.loads((output / "config.json").read_text())["model_type"] == "tiny_custom"
    check = check_sparsity_cli(output, "--reference", pruned)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout


def test_a_tokenizer_with_more_tokens_than_the_models_embeddings_is_refused(tmp_path, tiny_pruned_dir,
                                                                             small_corpus_dir, tokenizer):
    larger = copy.deepcopy(tokenizer)
    larger.add_tokens(["<extra_0>", "<extra_1>"])
    larger.save_pretrained(tmp_path / "larger")
    result = run_finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "out", "--max_steps", 1, "--tokenizer_name",
                          tmp_path / "larger")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: the tokenizer of {tmp_path / 'larger'} has {len(tokenizer) + 2} tokens, more than the model's "
        f"{len(tokenizer)} embeddings: give the tokenizer the model was trained with")


def test_overwrite_cache_tokenizes_again_where_a_rerun_reuses_the_cache(tmp_path, tiny_pruned_dir, small_corpus_dir):
    cache = tmp_path / "cache"

    def blocks_cached_by(*flags):
        output = tmp_path / "out"
        result = run_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 1, "--save_strategy", "no",
                              "--cache_dir", cache, "--overwrite_output_dir", "true", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        return {path: path.stat().st_mtime_ns for path in cache.rglob("cache-*.arrow")}

    first = blocks_cached_by()
    assert first
    assert blocks_cached_by() == first
    rewritten = blocks_cached_by("--overwrite_cache", "true")
    assert rewritten.keys() == first.keys()
    # tokenized and grouped, training and validation text; the text as read stays cached, as in run_clm.py
    assert sum(rewritten[path] > first[path] for path in first) == 4


@pytest.mark.parametrize("method", [["--teacher_model", "acme/tiny", "--distill_loss", "kl",
                                     "--teacher_model_init_kwargs", '{"revision": "dense"}'],
                                    ["--lora", "--load_in_4bit"]], ids=["full, distilled", "qlora"])
def test_models_from_the_hub_come_from_cache_dir_at_model_revision_and_train_sparse(method, tmp_path, tiny_dense_dir,
                                                                                    tiny_pruned_dir, small_corpus_dir):
    """The Hub here: its cache, read offline. ``acme/tiny-pruned`` has the pruned model at revision v2 and its dense
    original on main; the teacher ``acme/tiny`` is that dense original too, at its revision ``dense``. QLoRA loads
    the pruned model twice: in 4-bit to train, unquantized to merge."""
    cache, output, token = tmp_path / "cache", tmp_path / "out", "hf_not_to_be_written_anywhere"
    hub_cache(cache, "acme/tiny-pruned", {"main": tiny_dense_dir, "v2": tiny_pruned_dir})
    hub_cache(cache, "acme/tiny", {"dense": tiny_dense_dir})
    args = finetune_args("acme/tiny-pruned", small_corpus_dir, output, "--max_steps", 2, "--cache_dir", cache,
                         "--model_revision", "v2", "--token", token, *method)[1:]
    result = run_main(finetune_main, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sparsity maintained: yes" in result.stdout
    assert check_sparsity_cli(output, "--reference", tiny_pruned_dir).returncode == 0
    assert any((cache / "text").iterdir())  # the data sets' cache too, as run_clm.py keeps it
    written = b"".join(file_contents(output).values()) + (result.stdout + result.stderr).encode()
    assert token.encode() not in written
