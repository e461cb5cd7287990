"""Faults lose nothing: each test reproduces one way a run used to lose work or report a failure as success."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, file_contents, run_python
from test_finetune import check_sparsity_cli, finetune_args, run_finetune
from test_launcher import LAUNCHER, system_path_without_nvidia_smi, write_executable
from tiny_models import tiny_llama, zero_random_blocks
from transformers import AutoModelForCausalLM, TrainerState, TrainingArguments

from dense_ft import guarded_trainer
from dense_ft.arguments import parse_args as parse_finetune_args
from dense_ft.checkpoints import MARKER, mark_complete
from dense_ft.divergence import NonFiniteGuard, TrainingDiverged
from dense_ft.errors import UserError, out_of_memory_as_user_error
from dense_ft.finetune import PrintProgress, memory_remedies
from dense_ft.interrupt import StopOnSignal
from dense_ft.prune import main as prune_main
from dense_ft.sparsity import prunable_linears


def finetune(*args) -> tuple[int, str, str]:
    """``finetune.py`` in this process: exit status, stdout, stderr."""
    result = run_finetune(*args)
    return result.returncode, result.stdout, result.stderr


def start_finetune(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, finetune_args(*args))], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_until(process: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("".join(lines[-30:]))


# 1. A half-written checkpoint blocked every resume.
def test_a_checkpoint_cut_short_by_kill_9_is_skipped_on_resume(tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "run"
    process = start_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 400, "--save_steps", 3)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint-6").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.kill()  # kill -9 as the save of checkpoint-6 begins
    process.communicate(timeout=60)
    assert (output / "checkpoint-3" / MARKER).exists() and not (output / "checkpoint-6" / MARKER).exists()

    rerun = run_python(*finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 5))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Skipping 1 incomplete checkpoint(s), moved aside as incomplete-*: checkpoint-6" in rerun.stdout
    assert f"Resuming from checkpoint {output / 'checkpoint-3'}" in rerun.stdout and "Step 4:" in rerun.stdout
    assert (output / "incomplete-checkpoint-6").is_dir() and (output / "checkpoint-5" / MARKER).exists()


def test_the_old_checkpoint_is_rotated_out_only_once_the_new_one_is_complete(tmp_path, tiny_pruned_dir,
                                                                             small_corpus_dir, monkeypatch):
    output = tmp_path / "run"
    complete_as_each_is_marked = []

    def observed_mark_complete(checkpoint, run_identity):
        complete_as_each_is_marked.append(sorted(path.parent.name for path in output.glob(f"checkpoint-*/{MARKER}")))
        mark_complete(checkpoint, run_identity)

    monkeypatch.setattr(guarded_trainer, "mark_complete", observed_mark_complete)
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 3, "--save_steps", 1,
                              "--save_total_limit", 1)
    assert status == 0, err[-2000:]
    assert complete_as_each_is_marked == [[], ["checkpoint-1"], ["checkpoint-2"]]  # a kill here leaves one to resume
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-3"]


# 2. Divergence was reported as success.
# At 1e38 the unfused AdamW (the default before torch 2.8) fails on its step size itself, 1e38 / (1 - beta1) > float32.
@pytest.mark.parametrize("learning_rate, problem", [("1e30", "the loss or gradient norm is not finite"),
                                                    ("1e6", "the gradient norm is zero")])
def test_a_diverging_run_stops_and_saves_nothing_as_final(learning_rate, problem, tmp_path, tiny_pruned_dir,
                                                          small_corpus_dir):
    output = tmp_path / "run"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 20,
                                "--save_steps", 1, "--learning_rate", learning_rate)
    assert status == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert problem in line and "at step 2:" in line and f"this run: {float(learning_rate):g}" in line
    assert "no final model was saved" in line and "Sparsity maintained" not in out
    assert not (output / "model.safetensors").exists()
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1"]  # before the divergence
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # Ctrl+C works again in this process


def test_a_training_loop_begun_again_gives_back_the_handlers_from_before_the_first():
    """--auto_find_batch_size begins the loop again after an out-of-memory error: on_train_begin comes twice."""
    handlers = {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS}
    stop_on_signal = StopOnSignal()
    for _ in range(2):
        stop_on_signal.on_train_begin(None, None, None)
        assert signal.getsignal(signal.SIGINT) == stop_on_signal._handle
    stop_on_signal.on_train_end(None, None, None)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_a_training_loop_begun_again_with_a_lower_batch_says_the_effective_batch_it_trains_with(tmp_path, capsys):
    """--auto_find_batch_size lowers the per-device batch after each out-of-memory error and keeps the accumulation:
    a CPU run capped at 4 GiB went from 448 sequences per step to 123 with nothing said. These are its loop's
    beginnings, without the minute of failed allocations before them."""
    args = TrainingArguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, use_cpu=True)
    progress = PrintProgress()
    progress.on_train_begin(args, TrainerState(train_batch_size=4), None)
    assert capsys.readouterr().out == ""
    progress.on_train_begin(args, TrainerState(train_batch_size=3), None)
    assert capsys.readouterr().out == (
        "--auto_find_batch_size lowered the per-device batch to 3 after running out of memory: effective batch size 6 "
        "(per-device 3 x 1 process(es) x accumulation 2)\n")


def test_a_failed_run_closes_its_progress_bar_so_that_its_error_is_the_last_line(tmp_path, tiny_pruned_dir,
                                                                                 small_corpus_dir):
    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "run", "--max_steps", 20,
                                "--learning_rate", "1e30", "--disable_tqdm", "false")
    assert status == 2 and "1/20" in err, err[-2000:]
    line = err.rstrip("\n").split("\n")[-1]  # not splitlines(): a bar redraws itself after "\r", on its line
    assert line.startswith("error: the loss or gradient norm is not finite"), repr(err[-500:])


def test_nonfinite_steps_are_skipped_up_to_the_patience():
    args = SimpleNamespace(fp16=False, learning_rate=1.0, device=torch.device("cpu"))
    guard = NonFiniteGuard(patience=1)
    guard.record_loss(torch.tensor(float("nan")))
    assert guard.step_is_sound(torch.tensor(1.0), args, step=1) is False  # skipped: no update
    assert guard.step_is_sound(torch.tensor(1.0), args, step=2) is True  # a sound step resets the count
    assert guard.step_is_sound(torch.tensor(float("inf")), args, step=3) is False
    with pytest.raises(TrainingDiverged, match="not finite at step 4"):
        guard.step_is_sound(torch.tensor(float("nan")), args, step=4)
    fp16 = SimpleNamespace(fp16=True, learning_rate=1.0, device=torch.device("cpu"))
    assert NonFiniteGuard().step_is_sound(torch.tensor(float("inf")), fp16, step=1)  # the loss scaler's business


# 3. Any checkpoint in the output directory was resumed, whoever wrote it.
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "run"
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, "--save_steps", 2)
    assert status == 0, err[-2000:]
    checkpoint = output / "checkpoint-2"
    (output / "model.safetensors").unlink()  # as if stopped after its last checkpoint

    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2,
                              "--learning_rate", 5e-4)
    assert status == 2
    assert err.strip().splitlines()[-1] == (f"error: {checkpoint} belongs to another run (learning_rate 0.001 there, "
                                            "0.0005 here): pass --overwrite_output_dir to start over, or choose "
                                            "another --output_dir")

    other = tmp_path / "other model"
    dense = tiny_llama(seed=1)
    zero_random_blocks(dense)
    dense.save_pretrained(other)
    shutil.copy(tiny_pruned_dir / "tokenizer.json", other)
    shutil.copy(tiny_pruned_dir / "tokenizer_config.json", other)
    status, _, err = finetune(other, small_corpus_dir, output, "--max_steps", 2)
    assert status == 2 and "belongs to another run (model " in err and "; weights " in err

    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2,
                                "--learning_rate", 5e-4, "--overwrite_output_dir", "true")
    assert status == 0 and "Resuming" not in out, err[-2000:]


def test_a_checkpoint_given_by_hand_may_change_the_hyperparameters_not_the_method_or_optimizer(
        tmp_path, tiny_pruned_dir, small_corpus_dir):
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "run", "--max_steps", 2,
                              "--save_steps", 2)
    assert status == 0, err[-2000:]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    default_optim = TrainingArguments(tmp_path / "defaults").optim.value  # fused from torch 2.8
    for change, difference in ((["--lora", "true"], "lora None there, {'r': 8, "),
                               (["--optim", "sgd"], f"optim '{default_optim}' there, 'sgd' here")):
        status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "again", "--max_steps", 3,
                                  "--resume_from_checkpoint", checkpoint, *change)
        line = err.strip().splitlines()[-1]  # it had been a traceback from the Trainer's loading
        assert status == 2 and line.startswith(f"error: --resume_from_checkpoint {checkpoint} holds another kind of "
                                               f"run ({difference}"), err[-2000:]
    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "again", "--max_steps", 3,
                                "--resume_from_checkpoint", checkpoint, "--learning_rate", 5e-4)
    assert status == 0 and f"Resuming from checkpoint {checkpoint}" in out, err[-2000:]


def test_a_model_only_checkpoint_is_refused_rather_than_resumed_with_a_new_optimizer_and_schedule(
        tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "run"
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, "--save_steps", 2,
                              "--save_only_model", "true")
    assert status == 0, err[-2000:]
    checkpoint = output / "checkpoint-2"
    (output / "model.safetensors").unlink()  # as if stopped after its last checkpoint
    refusal = (f"error: {checkpoint} holds the model only (--save_only_model), not the optimizer's state and the "
               "learning-rate schedule: it cannot resume a run.")
    for by_hand in ([], ["--resume_from_checkpoint", checkpoint, "--output_dir", tmp_path / "again"]):
        before = file_contents(output)
        status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 4,
                                  "--save_only_model", "true", *by_hand)
        assert status == 2 and err.strip().splitlines()[-1].startswith(refusal), err[-2000:]
        assert file_contents(output) == before


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "run"
    first = start_finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 400, "--save_steps", 1000)
    try:
        read_until(first, "Step 1:")
        status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2)
        assert status == 2 and err.strip().splitlines()[-1] == (
            f"error: another run is writing to --output_dir {output}: wait for it to finish, or choose another "
            "--output_dir")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130  # the first run was not disturbed: it stopped on its signal, with a checkpoint
    assert list(output.glob(f"checkpoint-*/{MARKER}"))


# 4. SIGTERM to the launcher orphaned the training.
FAKE_TORCHRUN = """#!/usr/bin/env bash
# torchrun's own options dropped, the rest run by the real python: one process, in torchrun's place.
while [[ $1 == --* ]]; do shift; done
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("runner", ["python", "torchrun"])
def test_sigterm_to_the_launcher_reaches_the_training_and_waits_for_its_checkpoint(runner, tmp_path, tiny_pruned_dir,
                                                                                 small_corpus_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher_args = []
    if runner == "torchrun":  # two fake GPUs make the launcher start torchrun
        write_executable(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho '0, 81920'\necho '1, 81920'\n")
        write_executable(bin_dir / "torchrun", FAKE_TORCHRUN)
        launcher_args = ["--num_gpus", "2", "--gpu_ids", "0,1"]
    output = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
           f"{system_path_without_nvidia_smi()}", "REAL_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
           "PRUNED_MODEL": str(tiny_pruned_dir), "OUTPUT_DIR": str(output), "DATASET_DIR": str(small_corpus_dir),
           "BLOCK_SIZE": "32", "EFFECTIVE_BATCH_SIZE": "2", "LOGGING_STEPS": "1", "SAVE_STEPS": "1000"}
    launcher = subprocess.Popen(["bash", str(LAUNCHER), *launcher_args, "--", "--disable_tqdm", "true",
                                 "--bf16", "false", "--torch_dtype", "float32"], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    read_until(launcher, "Step 2:")
    trainer_pid = int(subprocess.check_output(["pgrep", "-P", str(launcher.pid)], text=True).split()[0])
    os.kill(launcher.pid, signal.SIGTERM)  # what Slurm or Kubernetes does
    rest = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 130, rest[-3000:]
    assert "checkpoint saved to" in rest and "run the same command again to resume" in rest
    assert not Path(f"/proc/{trainer_pid}").exists()  # no orphan training on
    assert list(output.glob(f"checkpoint-*/{MARKER}")) and not (output / "model.safetensors").exists()


# 5. Output problems surfaced after the work; a full disk said "unexpected pos".
def test_main_block_checks_its_output_paths_before_pruning(tmp_path, tiny_pruned_dir, small_corpus_dir, capsys):
    (tmp_path / "a file").write_text("")
    for flag in ("--save", "--save_model"):
        with pytest.raises(SystemExit) as exited:
            prune_main(["--model", str(tiny_pruned_dir), "--calib_dataset", str(small_corpus_dir), "--eval_dataset",
                        str(small_corpus_dir), "--seqlen", "32", "--nsamples", "2", "--sparsity_ratio", "0.2",
                        flag, str(tmp_path / "a file" / "out")])
        out, err = capsys.readouterr()
        assert exited.value.code == 2 and "sparsity sanity check" not in out
        assert err.strip() == f"error: {flag} {tmp_path / 'a file' / 'out'} cannot be created: {tmp_path / 'a file'} " \
                              "is a file"


def can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not can_mount_tmpfs(),
                    reason="needs a user namespace to mount a small tmpfs")
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_pruned_dir, small_corpus_dir):
    """Real full disks: tmpfs mounts of a chosen size, in a user namespace of their own."""
    one_checkpoint = sum(f.stat().st_size for f in Path(tiny_pruned_dir).iterdir()) + 2 * (
        tiny_pruned_dir / "model.safetensors").stat().st_size
    model_bytes = (tiny_pruned_dir / "model.safetensors").stat().st_size
    cases = {"too_small": one_checkpoint // 2, "second_save": one_checkpoint * 3 // 2,
             "final_save": one_checkpoint + one_checkpoint // 4, "qlora_merge": model_bytes // 2,
             "data_cache": 64 * 2**10}
    args = {"too_small": ["--max_steps", 4, "--save_steps", 1], "second_save": ["--max_steps", 4, "--save_steps", 1],
            "final_save": ["--max_steps", 1, "--save_steps", 1],
            "qlora_merge": ["--max_steps", 1, "--save_steps", 1, "--lora", "--load_in_4bit"],  # adapters fit
            "data_cache": ["--max_steps", 1, "--cache_dir", tmp_path / "data_cache" / "cache"]}
    script = []
    for case, size in cases.items():
        mount = tmp_path / case
        mount.mkdir()
        command = " ".join(f"'{arg}'" for arg in [sys.executable, *finetune_args(
            tiny_pruned_dir, small_corpus_dir, mount / "run", "--max_eval_samples", 1, *args[case])])
        script.append(f"mount -t tmpfs -o size={size} tmpfs '{mount}' && cd '{REPO_ROOT}' && "
                      f"{command} > '{tmp_path}/{case}.log' 2>&1; echo $? > '{tmp_path}/{case}.status'; "
                      f"find '{mount}' -type f | sort > '{tmp_path}/{case}.files'")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "; ".join(script)], timeout=600)

    def outcome(case):
        lines = (tmp_path / f"{case}.log").read_text().strip().splitlines()
        files = (tmp_path / f"{case}.files").read_text().split()
        return int((tmp_path / f"{case}.status").read_text()), lines[-1], [f[len(str(tmp_path / case)) + 1:]
                                                                            for f in files]

    status, last, files = outcome("too_small")
    assert status == 2 and last.startswith("error: not enough space for a checkpoint in") and files == []

    status, last, files = outcome("second_save")
    assert status == 2, last
    assert last.startswith(f"error: no space left on the device while saving {tmp_path}/second_save/run/checkpoint-2")
    assert "the incomplete checkpoint was removed and the previous one kept" in last
    assert f"run/checkpoint-1/{MARKER}" in files and not any("checkpoint-2" in f for f in files)

    for case in ("final_save", "qlora_merge"):  # the merged model of QLoRA is its final model
        status, last, files = outcome(case)
        assert status == 2, last
        assert last.startswith(f"error: no space left on the device while saving the final model to "
                               f"{tmp_path}/{case}/run (")
        assert last.endswith(f" free): {tmp_path}/{case}/run/checkpoint-1 is kept; free some space and run the "
                             "same command again to resume from it and save the model")
        assert f"run/checkpoint-1/{MARKER}" in files
    assert "run/adapter/adapter_model.safetensors" in outcome("qlora_merge")[2]  # the merge is what did not fit

    status, last, files = outcome("data_cache")  # --cache_dir on a full disk, before any work to lose
    assert status == 2 and last == (f"error: no space left on the device for the data sets' cache in {tmp_path}/"
                                    "data_cache/cache: free some space there, or give a --cache_dir on another disk")
    assert not any(f.startswith("run/") for f in files)


# 6. Running out of memory was a traceback.
MEMORY_CAP = 4 * 2**30


def run_in_capped_memory(args) -> subprocess.CompletedProcess:
    """Real allocation failures: the process's data (RLIMIT_DATA: what malloc and torch's allocator map) capped well
    under what ``args`` ask for, with few malloc arenas and threads, which take memory whatever the run, and on the
    CPU. RLIMIT_AS would also count the libraries' mapped code: torch 2.7's CUDA build alone maps more than the cap."""
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_CAP, MEMORY_CAP))

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=cap)


def test_a_batch_that_does_not_fit_is_one_line_keeps_the_checkpoint_and_the_advice_resumes(
        tmp_path, tiny_pruned_dir, small_corpus_dir):
    output = tmp_path / "run"
    batch = ["--effective_batch_size", 448, "--save_steps", 1, "--max_eval_samples", 1]
    status, _, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 1, *batch)
    assert status == 0, err[-2000:]
    checkpoint = file_contents(output / "checkpoint-1")

    # 448 sequences at once: their logits alone (448 x 32 x 49,152 float32) are 2.6 GiB.
    capped = run_in_capped_memory(finetune_args(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, *batch,
                                                "--per_device_train_batch_size", 448))
    assert capped.returncode == 2 and "Traceback" not in capped.stderr, capped.stderr[-3000:]
    last = capped.stderr.strip().splitlines()[-1]  # (after a progress bar's last state, on the same line)
    assert ("error: out of memory: lower --per_device_train_batch_size, keeping the batch with --effective_batch_size "
            "(the run then resumes from its last checkpoint), add --activation_checkpointing true or train sparse "
            "LoRA (--lora) ([enforce fail") in last and "DefaultCPUAllocator: can't allocate memory" in last, last
    assert file_contents(output / "checkpoint-1") == checkpoint and not (output / "checkpoint-2").exists()

    status, out, err = finetune(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2, *batch)
    assert status == 0 and "Resuming from" in out, err[-2000:]
    assert (output / "checkpoint-2").exists()


def test_calibration_that_does_not_fit_is_one_line_naming_what_to_lower(embedded_model_dir, embedded_corpus_dir):
    """2,000 windows of 2,048 tokens: 9 GiB of hidden states for SmolLM2's 576 dimensions."""
    capped = run_in_capped_memory(["main_block.py", "--model", embedded_model_dir, "--sparsity_ratio", 0.2,
                                   "--nsamples", 2000, "--seqlen", 2048, "--calib_dataset", embedded_corpus_dir,
                                   "--eval_dataset", embedded_corpus_dir])
    assert capped.returncode == 2 and "Traceback" not in capped.stderr, capped.stderr[-3000:]
    last = capped.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of memory: lower --nsamples or --seqlen ([enforce fail") and (
        "DefaultCPUAllocator: can't allocate memory" in last), last


@pytest.mark.parametrize("flags, remedies", [
    ([], ["batch", "--activation_checkpointing", "--lora"]),
    (["--activation_checkpointing", "true", "--lora"], ["batch", "--load_in_4bit"]),
    (["--lora", "--load_in_4bit"], ["batch", "--activation_checkpointing"]),
    (["--teacher_model", "dense"], ["batch", "--activation_checkpointing", "teacher", "--lora"]),
    (["--teacher_model", "dense", "--teacher_model_init_kwargs", '{"quantization_config": {"load_in_4bit": true}}',
      "--lora", "--load_in_4bit", "--activation_checkpointing", "true"], ["batch"]),
])
def test_what_finetune_advises_when_memory_runs_out_is_what_this_run_does_not_do_yet(flags, remedies):
    words = {"batch": "--per_device_train_batch_size", "teacher": "load the teacher in 4-bit"}
    parsed = parse_finetune_args(["--model_name_or_path", "pruned", "--output_dir", "out", *flags])
    model_args, _, lora_args, distill_args, training_args = parsed
    advice = memory_remedies(model_args, lora_args, distill_args, training_args)
    assert len(advice) == len(remedies) and all(words.get(word, word) in line
                                                for word, line in zip(remedies, advice, strict=True)), advice


CUDA_OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
                      "which 1.06 GiB is free.")  # (torch's message goes on, on the same line)


@pytest.mark.parametrize("error, line", [
    (torch.OutOfMemoryError(CUDA_OUT_OF_MEMORY), f"out of memory: a, b or c ({CUDA_OUT_OF_MEMORY})"),
    (MemoryError(), "out of memory: a, b or c (MemoryError)"),
])
def test_a_device_or_python_out_of_memory_is_one_line_too(error, line):
    with pytest.raises(UserError) as refused, out_of_memory_as_user_error(lambda: ["a", "b", "c"]):
        raise error
    assert str(refused.value) == line


def test_other_runtime_errors_pass_as_they_are():
    with pytest.raises(NotImplementedError), out_of_memory_as_user_error(lambda: ["a"]):
        raise NotImplementedError("not an allocation")


# 7. Silent assumptions.
def test_a_dense_model_trains_as_dense_with_a_warning(tmp_path, tiny_pruned_dir, small_corpus_dir):
    dense = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    with torch.no_grad():
        for linear in prunable_linears(dense).values():
            linear.weight.copy_(torch.randn_like(linear.weight))
            linear.weight[0, :3] = 0.0  # a few stray zeros
    del dense.config.sparsity_pattern
    dense.save_pretrained(tmp_path / "dense")
    shutil.copy(tiny_pruned_dir / "tokenizer.json", tmp_path / "dense")
    shutil.copy(tiny_pruned_dir / "tokenizer_config.json", tmp_path / "dense")
    status, out, err = finetune(tmp_path / "dense", small_corpus_dir, tmp_path / "out", "--max_steps", 1,
                                "--save_strategy", "no")
    assert status == 0, err[-2000:]
    stray = 3 * len(prunable_linears(dense))
    assert (f"Warning: the model is not pruned (its {stray:,} zero weights are scattered, not pruned: they train) "
            "and has no sparsity_pattern: training it as a dense model.") in out
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(linear.weight[0, :3].ne(0).all() for linear in prunable_linears(trained).values())

    refused = check_sparsity_cli(tmp_path / "out", "--reference", tmp_path / "dense")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: the reference {tmp_path / 'dense'} is not pruned (no pruned blocks and no sparsity_pattern): there "
        "is nothing to check against; give the pruned model the run started from")


def test_main_block_with_sparsity_ratio_0_does_not_say_pruned(tmp_path, tiny_pruned_dir, small_corpus_dir, capsys):
    prune_main(["--model", str(tiny_pruned_dir), "--eval_dataset", str(small_corpus_dir), "--seqlen", "32",
                "--max_eval_windows", "1", "--sparsity_ratio", "0", "--save_model", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert f"Model saved to {tmp_path / 'model'} (not pruned: --sparsity_ratio 0)" in out and "Pruned" not in out
