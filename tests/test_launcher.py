"""The launcher, run for real with fake nvidia-smi / python / torchrun on PATH."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

LAUNCHER = REPO_ROOT / "run_dense_finetune_block_20sparsity.sh"

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
# Lists GPUs 0..N-1 with the free memory (MB) given in FAKE_GPU_FREE_MB, comma-separated.
IFS=, read -r -a free <<< "$FAKE_GPU_FREE_MB"
for i in "${!free[@]}"; do echo "$i, ${free[$i]}"; done
"""
# Records its argv (NUL-separated) and environment, then exits with FAKE_EXIT_CODE; answers the
# launcher's "python -c 'import dense_ft'" probe with FAKE_IMPORT_EXIT, unrecorded.
FAKE_TRAINER = """#!/usr/bin/env bash
[[ "${{1:-}}" == -c ]] && exit "${{FAKE_IMPORT_EXIT:-0}}"
printf '%s\\0' "$@" > "$FAKE_RECORD/{name}.argv"
env > "$FAKE_RECORD/{name}.env"
if [[ -n "${{FAKE_WAIT_FOR_SIGNAL:-}}" ]]; then
    trap 'echo INT > "$FAKE_RECORD/signal"; exit 130' INT
    touch "$FAKE_RECORD/started"
    for _ in $(seq 600); do sleep 0.1; done
fi
exit "${{FAKE_EXIT_CODE:-0}}"
"""


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def system_path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "nvidia-smi")))


@pytest.fixture
def fake(tmp_path):
    """Fake tools, a pruned-model directory, and a function that runs the launcher with them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    for name in ("python", "torchrun"):
        write_executable(bin_dir / name, FAKE_TRAINER.format(name=name))
    record = tmp_path / "record"
    record.mkdir()
    model = tmp_path / "pruned model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    class Fake:
        def __init__(self):
            self.record, self.bin_dir, self.model = record, bin_dir, model

        def env(self, gpus="81920,81920,81920,81920", **extra):
            env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{system_path_without_nvidia_smi()}",
                   "FAKE_RECORD": str(record), "FAKE_GPU_FREE_MB": gpus, "PRUNED_MODEL": str(model),
                   "OUTPUT_DIR": str(tmp_path / "output dir")}
            env.update(extra)
            return env

        def run(self, *args, cwd=tmp_path, timeout=30, **env):
            return subprocess.run(["bash", str(LAUNCHER), *args], cwd=cwd, env=self.env(**env), text=True,
                                  capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)

        def argv(self, name) -> list[str]:
            return (record / f"{name}.argv").read_text().split("\0")[:-1]

        def environ(self, name) -> dict:
            lines = (record / f"{name}.env").read_text().splitlines()
            return dict(line.split("=", 1) for line in lines if "=" in line)

        def called(self) -> set[str]:
            return {p.stem for p in record.glob("*.argv")}

    return Fake()


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("args, gpus, mode, accumulation", [
    ([], "2", "Single GPU", 8),
    (["--num_gpus", "2", "--gpu_ids", "2,3"], "2,3", "Multi-GPU (torchrun)", 4),
    (["--num_gpus", "4", "--gpu_ids", "0,1,2,3"], "0,1,2,3", "Multi-GPU (torchrun)", 2),
    (["--num_gpus", "1", "--gpu_ids", "3"], "3", "Single GPU", 8),
    (["--num_gpus=2", "--gpu_ids=0,1"], "0,1", "Multi-GPU (torchrun)", 4),
])
def test_the_guide_examples(fake, args, gpus, mode, accumulation):
    result = fake.run(*args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"  Number of GPUs: {len(gpus.split(','))}\n  GPU IDs: {gpus}\n  Training mode: {mode}\n" in out
    assert f"  Gradient accumulation: {accumulation}\n  Effective batch size: 8\n" in out
    assert f"Training mode: {len(gpus.split(','))} GPU(s) on device(s): {gpus}" in out
    assert "🚀 Starting dense fine-tuning with SparseTrainer..." in out
    assert out.count("Available GPU memory: 81920 MB (~80 GB)") == len(gpus.split(","))
    launcher = "torchrun" if "torchrun" in mode else "python"
    assert fake.called() == {launcher}
    argv = fake.argv(launcher)
    assert flag_value(argv, "--effective_batch_size") == "8" and "--gradient_accumulation_steps" not in argv
    assert flag_value(argv, "--model_name_or_path") == str(fake.model)
    assert flag_value(argv, "--num_train_epochs") == "3" and flag_value(argv, "--learning_rate") == "5e-5"
    assert flag_value(argv, "--block_size") == "1024" and flag_value(argv, "--max_train_samples") == "30000"
    assert fake.environ(launcher)["CUDA_VISIBLE_DEVICES"] == gpus
    if launcher == "torchrun":
        assert f"--nproc_per_node={len(gpus.split(','))}" in argv and "--standalone" in argv
        assert "--shutdown_timeout=900" in argv  # time for the workers to save after Ctrl+C
        assert argv[argv.index("--standalone") + 1].endswith("dense_ft/finetune.py")
    assert "Next steps:" in out and "--eval_zero_shot" in out


def test_help_is_the_guides(fake):
    result = fake.run("--help")
    assert result.returncode == 0 and not fake.called()
    for line in ('  --num_gpus N        Number of GPUs to use (default: 1)',
                 '  --gpu_ids "X,Y"     Comma-separated GPU IDs (default: "2")',
                 "  -h, --help          Show this help message",
                 '  Dual GPU (GPU 2,3):       ./run_dense_finetune_block_20sparsity.sh --num_gpus 2 --gpu_ids "2,3"',
                 "  2 GPUs: ~14-20 hours (1.7x speedup)", "  EFFECTIVE_BATCH_SIZE"):
        assert line in result.stdout
    assert fake.run("-h").stdout == result.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "unknown option '--gpus'"),
    (["extra"], "unknown option 'extra'"),
    (["--num_gpus"], "--num_gpus needs a value"),
    (["--gpu_ids", "--yes"], "--gpu_ids needs a value"),
    (["--num_gpus", "two"], "--num_gpus must be a positive integer, got 'two'"),
    (["--num_gpus", "0"], "--num_gpus must be a positive integer"),
    (["--num_gpus", "2", "--gpu_ids", "2"], "--num_gpus 2 needs 2 GPU ids, got 1"),
    (["--num_gpus", "2", "--gpu_ids", "2,2"], "--gpu_ids lists GPU 2 twice"),
    (["--num_gpus", "2", "--gpu_ids", "a,b"], "--gpu_ids must be comma-separated integers"),
    (["--gpu_ids", "7"], "GPU 7 not found; nvidia-smi lists GPU(s) 0,1,2,3"),
    (["--num_gpus", "3", "--gpu_ids", "0,1,2"], "GPU counts per node that work: 1, 2, 4, 8"),
    (["--nnodes", "2"], "--nnodes 2 needs --master_addr"),
    (["--engine", "fsdp"], "--engine fsdp shards across processes: it needs --num_gpus 2 or more"),
])
def test_bad_input_is_one_line_exit_2_and_starts_nothing(fake, args, message):
    result = fake.run(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert not fake.called()


@pytest.mark.parametrize("variable, value", [("BATCH_SIZE", "0"), ("LEARNING_RATE", "fast"),
                                              ("LEARNING_RATE", "1e400"), ("LEARNING_RATE", "0e5"),
                                              ("NUM_EPOCHS", "-1"), ("BLOCK_SIZE", "1k")])
def test_bad_environment_values_are_refused(fake, variable, value):
    result = fake.run(**{variable: value})
    assert result.returncode == 2 and f"{variable} must be a positive" in result.stderr
    assert not fake.called()


def test_low_memory_without_a_terminal_stops_at_once(fake):
    started = time.monotonic()
    result = fake.run("--num_gpus", "2", "--gpu_ids", "0,1", gpus="81920,30000", timeout=10)
    assert time.monotonic() - started < 5
    assert result.returncode == 1 and not fake.called()
    assert "GPU 1: Available GPU memory: 30000 MB (~29 GB)" in result.stdout
    assert "⚠️  Warning: GPU memory may be insufficient!\nConsider using LoRA fine-tuning instead." in result.stdout
    assert "--yes" in result.stderr


@pytest.mark.parametrize("how", [["--yes"], {"ASSUME_YES": "1"}])
def test_yes_continues_despite_low_memory(fake, how):
    args, env = (how, {}) if isinstance(how, list) else ([], how)
    result = fake.run(*args, gpus="0,0,30000", **env)
    assert result.returncode == 0, result.stderr
    assert "Warning: GPU memory may be insufficient!" in result.stdout and fake.called() == {"python"}


def test_without_nvidia_smi_it_trains_on_the_cpu(fake):
    (fake.bin_dir / "nvidia-smi").unlink()
    result = fake.run("--num_gpus", "2", "--gpu_ids", "2,3")
    assert result.returncode == 0, result.stderr
    assert "No NVIDIA GPU found" in result.stdout and fake.called() == {"python"}
    assert "  Gradient accumulation: 8\n" in result.stdout
    argv = fake.argv("python")
    assert flag_value(argv, "--effective_batch_size") == "8"
    assert "--bf16" not in argv and "CUDA_VISIBLE_DEVICES" not in fake.environ("python")


def test_extra_arguments_arrive_unchanged_and_settings_come_from_the_environment(fake, tmp_path):
    extra = ["--max_steps", "5", "--run_name", "a name with spaces", "--weird", "$HOME;`x`*"]
    corpus = tmp_path / "my corpus"
    corpus.mkdir()
    result = fake.run("--", *extra, cwd=REPO_ROOT / "tests", BATCH_SIZE="2", EFFECTIVE_BATCH_SIZE="16",
                      NUM_EPOCHS="1", DATASET_DIR=str(corpus), REPORT_TO="tensorboard")
    assert result.returncode == 0, result.stderr
    argv = fake.argv("python")
    assert argv[-len(extra):] == extra
    assert ("  Max train samples: 30000\n  Passed on to finetune.py: --max_steps 5 --run_name a\\ name\\ with\\ spaces "
            "--weird \\$HOME\\;\\`x\\`\\*\n=====") in result.stdout
    assert flag_value(argv, "--report_to") == "tensorboard"
    assert flag_value(argv, "--per_device_train_batch_size") == "2"
    assert flag_value(argv, "--effective_batch_size") == "16" and "  Gradient accumulation: 8\n" in result.stdout
    assert flag_value(argv, "--dataset_dir") == str(corpus) and "--dataset_name" not in argv
    assert flag_value(argv, "--output_dir") == str(tmp_path / "output dir")


@pytest.mark.parametrize("data", [["--train_file", "my data.jsonl"], ["--train_file=my data.jsonl"],
                                  ["--dataset_name", "user/stories"], ["--dataset_dir", "corpus"]])
@pytest.mark.parametrize("dataset_dir", [None, "wiki"], ids=["DATASET", "DATASET_DIR"])
def test_data_passed_on_to_finetune_replaces_the_launchers(fake, tmp_path, data, dataset_dir):
    (tmp_path / "wiki").mkdir()
    settings = {"DATASET_DIR": str(tmp_path / "wiki")} if dataset_dir else {}
    result = fake.run("--", *data, "--max_steps", "5", **settings)
    assert result.returncode == 0, result.stderr
    argv = fake.argv("python")
    given = {flag for flag in ("--dataset_name", "--dataset_config_name", "--dataset_dir", "--train_file")
             if any(arg.split("=")[0] == flag for arg in argv)}
    assert given == {data[0].split("=")[0]} and argv[-len(data) - 2:] == [*data, "--max_steps", "5"]
    assert "\nDataset: as passed on to finetune.py (below)\n" in result.stdout


def test_multi_node_settings_go_to_torchrun(fake):
    result = fake.run("--num_gpus", "2", "--gpu_ids", "0,1", "--nnodes", "2", "--node_rank", "1",
                      "--master_addr", "10.1.2.3", "--master_port", "29600")
    assert result.returncode == 0, result.stderr
    argv = fake.argv("torchrun")
    for arg in ("--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3",
                "--master_port=29600"):
        assert arg in argv
    assert "--standalone" not in argv
    assert "  Gradient accumulation: 2\n" in result.stdout  # 8 / (1 x 2 GPUs x 2 nodes)
    assert flag_value(argv, "--effective_batch_size") == "8"


def test_missing_pruned_model_says_how_to_make_it(fake, tmp_path):
    result = fake.run(PRUNED_MODEL=str(tmp_path / "out/llama/pruned_model"))
    assert result.returncode == 1 and not fake.called()
    assert f"Pruned model not found at {tmp_path / 'out/llama/pruned_model'}" in result.stderr
    assert "main_block.py --model meta-llama/Llama-2-7b-hf --sparsity_ratio 0.2" in result.stderr


def test_dry_run_prints_the_command_and_starts_nothing(fake):
    result = fake.run("--dry_run", "--num_gpus", "2", "--gpu_ids", "0,1")
    assert result.returncode == 0 and not fake.called()
    assert "Command: torchrun --nproc_per_node=2" in result.stdout
    assert "Dense Fine-tuning Configuration" in result.stdout


def test_the_training_exit_status_is_the_launchers(fake):
    result = fake.run(FAKE_EXIT_CODE="3")
    assert result.returncode == 3 and "training failed with exit status 3" in result.stderr


def test_ctrl_c_reaches_the_training_process(fake):
    process = subprocess.Popen(["bash", str(LAUNCHER)], env=fake.env(FAKE_WAIT_FOR_SIGNAL="1"), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 20
    while not (fake.record / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl+C does
    _, stderr = process.communicate(timeout=20)
    assert (fake.record / "signal").read_text().strip() == "INT"
    assert process.returncode == 130 and "run the same command again to resume" in stderr


def test_a_real_cpu_run_on_a_tiny_pruned_model(tmp_path, tiny_pruned_dir, small_corpus_dir):
    venv_bin = os.path.dirname(sys.executable)
    output = tmp_path / "fine tuned"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{system_path_without_nvidia_smi()}",
           "PRUNED_MODEL": str(tiny_pruned_dir), "OUTPUT_DIR": str(output), "DATASET_DIR": str(small_corpus_dir),
           "BLOCK_SIZE": "32", "MAX_TRAIN_SAMPLES": "64", "EFFECTIVE_BATCH_SIZE": "4", "NUM_EPOCHS": "1",
           "LOGGING_STEPS": "4"}
    result = subprocess.run(["bash", str(LAUNCHER), "--", "--max_eval_samples", "4", "--disable_tqdm", "true"],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Step 16: loss=" in result.stdout and "Sparsity maintained: yes" in result.stdout
    assert (output / "model.safetensors").exists() and (output / "trainer_state.json").exists()
    lines = result.stdout.splitlines()
    printed_check = "\n".join(lines[lines.index("2. Verify sparsity is preserved:") + 1:][:2])  # as the user pastes it
    check = subprocess.run(["bash", "-c", printed_check], cwd=tmp_path, env=env, text=True, capture_output=True,
                           timeout=120)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout, printed_check + check.stderr[-2000:]
    assert shutil.which("nvidia-smi", path=env["PATH"]) is None


def test_fsdp_engine_hands_the_trainer_its_fsdp2_config(fake):
    result = fake.run("--engine", "fsdp", "--num_gpus", "2", "--gpu_ids", "0,1")
    assert result.returncode == 0, result.stderr
    assert "Training mode: Multi-GPU (torchrun, FSDP2)" in result.stdout
    argv = fake.argv("torchrun")
    assert flag_value(argv, "--fsdp") == "full_shard"
    config = Path(flag_value(argv, "--fsdp_config"))
    assert config.is_file() and '"version": 2' in config.read_text()
    assert "--activation_checkpointing" not in argv  # FSDP2 checkpoints activations itself (config)
    bad = fake.run("--engine", "deepspeed")
    assert bad.returncode == 2 and "--engine must be ddp or fsdp" in bad.stderr


def test_optimizer_variables_reach_the_trainer(fake):
    result = fake.run(OPTIM="adamw_torch_8bit", OPTIM_ARGS="bf16_stochastic_round=True")
    assert result.returncode == 0, result.stderr
    argv = fake.argv("python")
    assert flag_value(argv, "--optim") == "adamw_torch_8bit"
    assert flag_value(argv, "--optim_args") == "bf16_stochastic_round=True"
    assert fake.run().returncode == 0
    assert "--optim" not in fake.argv("python") and "--optim_args" not in fake.argv("python")


def test_method_lora_trains_sparse_lora_with_its_own_defaults(fake, tmp_path):
    result = fake.run("--method", "lora", "--dry_run", OUTPUT_DIR="")
    assert result.returncode == 0 and not fake.called(), result.stderr
    assert "Method: Sparse LoRA (adapters masked by the pruned blocks, merged at the end)" in result.stdout
    assert "🚀 Starting sparse LoRA fine-tuning..." in result.stdout
    command = result.stdout.split("Command: ", 1)[1]
    assert " --lora" in command and "--learning_rate 2e-4" in command
    assert "--output_dir out/llama2_7b/block_16x16_20sparsity/wanda/lora_finetuned_model" in command

    result = fake.run("--num_gpus", "2", "--gpu_ids", "0,1", METHOD="lora", LEARNING_RATE="1e-4")
    assert result.returncode == 0, result.stderr
    argv = fake.argv("torchrun")
    assert "--lora" in argv and flag_value(argv, "--learning_rate") == "1e-4"
    assert flag_value(argv, "--output_dir") == str(tmp_path / "output dir")
    assert "Sparse LoRA fine-tuning finished. Merged model saved to" in result.stdout


def test_method_qlora_trains_sparse_lora_on_the_model_in_4bit(fake):
    result = fake.run("--method", "qlora", OUTPUT_DIR="")
    assert result.returncode == 0, result.stderr
    assert ("Method: Sparse QLoRA (adapters masked by the pruned blocks on the model in 4-bit, merged into it "
            "unquantized at the end)") in result.stdout
    assert "🚀 Starting sparse QLoRA fine-tuning..." in result.stdout
    assert "✅ Sparse QLoRA fine-tuning finished. Merged model saved to" in result.stdout
    argv = fake.argv("python")
    assert "--lora" in argv and "--load_in_4bit" in argv and flag_value(argv, "--learning_rate") == "2e-4"
    assert flag_value(argv, "--output_dir") == "out/llama2_7b/block_16x16_20sparsity/wanda/qlora_finetuned_model"
    assert flag_value(argv, "--torch_dtype") == "bfloat16"  # the 4-bit weights compute in bf16


@pytest.mark.parametrize("args, message", [
    (["--method", "dora"], "--method must be full, lora or qlora, got 'dora'"),
    (["--method", "lora", "--engine", "fsdp", "--num_gpus", "2", "--gpu_ids", "0,1"],
     "--method lora trains with DDP"),
    (["--method=qlora", "--engine=fsdp", "--num_gpus=2", "--gpu_ids=0,1"], "--method qlora trains with DDP"),
])
def test_bad_method_is_refused(fake, args, message):
    result = fake.run(*args)
    assert result.returncode == 2 and message in result.stderr and not fake.called()


def test_the_low_memory_advice_is_the_lora_command_for_the_same_run(fake, tmp_path):
    settings = {"LEARNING_RATE": "1e-4", "DATASET_DIR": str(tmp_path)}
    args = ["--num_gpus", "1", "--method=full", "--gpu_ids", "1", "--", "--max_steps", "5"]
    full = fake.run(*args, gpus="81920,30000", **settings)  # 29 GB free: under full's 40, over LoRA's 24
    assert full.returncode == 1 and not fake.called()
    lines = full.stdout.splitlines()
    advice = lines[lines.index("Consider using LoRA fine-tuning instead. Sparse LoRA keeps the pruned blocks at "
                               "zero; same settings:") + 1].strip()
    assert "--method lora" in advice

    lora = subprocess.run(["bash", "-c", advice], cwd=tmp_path, env=fake.env(gpus="81920,30000"), text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    assert lora.returncode == 0, lora.stdout + lora.stderr
    assert "Warning" not in lora.stdout
    argv = fake.argv("python")
    assert "--lora" in argv and flag_value(argv, "--learning_rate") == "1e-4"
    assert flag_value(argv, "--dataset_dir") == str(tmp_path) and argv[-2:] == ["--max_steps", "5"]
    assert flag_value(argv, "--output_dir") == str(tmp_path / "output dir_lora")


def test_a_token_passed_on_reaches_finetune_py_and_is_never_printed(fake):
    secret = "hf_not_to_be_printed"
    extra = ["--token", secret, f"--hub_token={secret}", "--hub-token", secret, "--max_steps", "5"]
    hidden = "--token '<hidden>' --hub_token='<hidden>' --hub-token '<hidden>' --max_steps 5"
    ran = fake.run("--", *extra)
    assert ran.returncode == 0, ran.stderr
    assert fake.argv("python")[-len(extra):] == extra
    assert f"  Passed on to finetune.py: {hidden}\n" in ran.stdout
    advised = fake.run("--gpu_ids", "1", "--", *extra, gpus="81920,30000")  # the LoRA command for the same run
    assert advised.returncode == 1 and f" -- {hidden} \n" in advised.stdout
    assert secret not in ran.stdout + ran.stderr + advised.stdout + advised.stderr


def test_an_uninstalled_package_is_one_line_before_training(fake):
    result = fake.run(FAKE_IMPORT_EXIT="1")
    assert result.returncode == 2 and not fake.called()
    assert result.stderr.strip().splitlines() == [f"Error: the dense_ft package is not installed for python: "
                                                  f"pip install -e {REPO_ROOT}"]


def test_teacher_model_turns_on_distillation(fake, tmp_path):
    teacher = tmp_path / "dense model"
    teacher.mkdir()
    result = fake.run(TEACHER_MODEL=str(teacher))
    assert result.returncode == 0, result.stderr
    assert f"Teacher model: {teacher} (distillation)\n" in result.stdout
    assert flag_value(fake.argv("python"), "--teacher_model") == str(teacher)
    missing = fake.run(TEACHER_MODEL=str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"Error: TEACHER_MODEL not found: {tmp_path}/nowhere"
    sharded = fake.run("--engine", "fsdp", "--num_gpus", "2", "--gpu_ids", "0,1", TEACHER_MODEL=str(teacher))
    assert sharded.returncode == 2 and "not --engine fsdp" in sharded.stderr
    assert fake.called() == {"python"}  # only the first run started anything


@pytest.mark.parametrize("method, free_mb", [("full", 50000), ("qlora", 20000)])
def test_a_teacher_raises_the_low_memory_threshold_by_its_own_size(fake, tmp_path, method, free_mb):
    teacher = tmp_path / "dense model"
    teacher.mkdir()
    args = ["--method", method, "--gpu_ids", "1"]
    alone = fake.run(*args, gpus=f"81920,{free_mb}")  # over the method's threshold (40 GB, 12 GB), under it + 14 GB
    assert alone.returncode == 0 and "Warning" not in alone.stdout, alone.stdout + alone.stderr
    distilling = fake.run(*args, gpus=f"81920,{free_mb}", TEACHER_MODEL=str(teacher))
    assert distilling.returncode == 1
    assert ("⚠️  Warning: GPU memory may be insufficient!\nThe teacher (TEACHER_MODEL) needs about 14 GB of it for a "
            "dense 7B in bf16.\n") in distilling.stdout
    assert fake.run(*args, gpus=f"81920,{free_mb}", TEACHER_MODEL=str(teacher), MIN_GPU_MEMORY_GB="12").returncode == 0


def test_the_low_memory_advice_of_lora_is_the_qlora_command_for_the_same_run(fake, tmp_path):
    args = ["--method", "lora", "--gpu_ids", "1", "--", "--max_steps", "5"]
    lora = fake.run(*args, gpus="81920,20000", LEARNING_RATE="1e-4")  # 19 GB free: under LoRA's 24, over QLoRA's 12
    assert lora.returncode == 1 and not fake.called()
    lines = lora.stdout.splitlines()
    advice = lines[lines.index("Consider sparse QLoRA (the pruned model in 4-bit, merged unquantized at the end); "
                               "same settings:") + 1].strip()
    qlora = subprocess.run(["bash", "-c", advice], cwd=tmp_path, env=fake.env(gpus="81920,20000"), text=True,
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    assert qlora.returncode == 0 and "Warning" not in qlora.stdout, qlora.stdout + qlora.stderr
    argv = fake.argv("python")
    assert "--lora" in argv and "--load_in_4bit" in argv and flag_value(argv, "--learning_rate") == "1e-4"
    assert flag_value(argv, "--output_dir") == str(tmp_path / "output dir_qlora") and argv[-2:] == ["--max_steps", "5"]
