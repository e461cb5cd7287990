"""Two processes on the CPU (gloo): DDP through the fine-tuning entry point, the FSDP2 mask path (full and sparse
LoRA), FSDP1 refused."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from safetensors.torch import load_file
from test_finetune import check_sparsity_cli, finetune_args, run_finetune

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """torchrun leaves a torchelastic_* directory of logs in the temporary directory at each start."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def run_torchrun(*args, timeout=600):
    # The fault handler prints where each thread was if a rank aborts: one did at exit, rarely, after saving.
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONFAULTHANDLER": "1"})


METHOD_FLAGS = {"full": [], "lora": ["--lora"], "qlora": ["--lora", "--load_in_4bit"], "streamed": ["--streaming"]}


@pytest.mark.parametrize("method", ["full", "lora", pytest.param("qlora", marks=pytest.mark.slow),  # 40-50 s each
                                    "streamed"])
def test_ddp_on_two_processes_equals_one_process_with_the_same_effective_batch(method, tmp_path, tiny_pruned_dir,
                                                                                small_corpus_dir):
    # Sequential order: shuffling with 1 or 2 processes gives different (equally valid) orders. The
    # accumulation is derived from the effective batch: 2 steps of 4 sequences, or of 2 x 2 processes.
    # A stream is read by the first process, which hands each process its share of every batch.
    common = ["--max_steps", 4, "--save_strategy", "no", "--use_cpu", "true", "--max_eval_samples", 2,
              "--train_sampling_strategy", "sequential", "--effective_batch_size", 8, *METHOD_FLAGS[method]]
    single = run_finetune(tiny_pruned_dir, small_corpus_dir, tmp_path / "single", *common,
                          "--per_device_train_batch_size", 4)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_torchrun(*finetune_args(tiny_pruned_dir, small_corpus_dir, tmp_path / "ddp", *common,
                                      "--per_device_train_batch_size", 2))
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert ddp.stdout.count(f"*** Starting sparse {'LoRA' if 'lora' in method else 'full'} fine-tuning ***") == 1
    assert "Effective batch size: 8 (per-device 4 x 1 process(es) x accumulation 2)" in single.stdout
    assert "Effective batch size: 8 (per-device 2 x 2 process(es) x accumulation 2)" in ddp.stdout

    one, two = (load_file(tmp_path / run / "model.safetensors") for run in ("single", "ddp"))
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-4, name  # unsynchronized replicas: ~5e-3
    moved = load_file(tiny_pruned_dir / "model.safetensors")
    assert any((moved[name] - two[name]).abs().max() > 1e-4 for name in two)
    check = check_sparsity_cli(tmp_path / "ddp", "--reference", tiny_pruned_dir)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout


@pytest.fixture(scope="module")
def fsdp_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    reports = {}
    for phase in ("train", "resume"):
        result = run_torchrun("tests/fsdp_worker.py", out, phase)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        reports[phase] = [json.loads((out / f"rank{rank}.{phase}.json").read_text()) for rank in (0, 1)]
    return reports


def test_fsdp2_each_rank_masks_only_its_rows(fsdp_reports):
    ranks = fsdp_reports["train"]
    for report in ranks:
        assert report["global_q_proj_shape"] == [64, 64] and report["local_q_proj_shape"] == [32, 64]
        assert report["local_mask_bytes"] <= 0.6 * report["full_mask_bytes"]
    assert sum(r["local_mask_bytes"] for r in ranks) <= ranks[0]["full_mask_bytes"] + 2 * 14  # rounding to bytes
    # The two ranks' row shards of each mask are different halves.
    assert ranks[0]["local_masks"] != ranks[1]["local_masks"]


def test_fsdp2_training_and_resume_keep_every_pruned_weight_zero(fsdp_reports):
    for phase in ("train", "resume"):
        for report in fsdp_reports[phase]:
            assert report["violations"] == {}
            assert report["full_weights_respect_masks"]
            assert report["weight_pass_reaches_the_shards"]
            assert 0.1 < report["sparsity"] < 0.3
    for trained, resumed in zip(fsdp_reports["train"], fsdp_reports["resume"], strict=True):
        assert resumed["local_masks"] == trained["local_masks"]  # re-derived from the checkpoint's shards


def test_fsdp2_sparse_lora_trains_sharded_and_merges_with_every_pruned_weight_zero(tmp_path):
    # What SparseTrainingMixin does with a peft_config, without the Trainer (its FSDP2 path needs CUDA): sparse
    # LoRA layers whose base weights and adapters are row shards. Without the masks the merge leaves 15616 non-zero.
    result = run_torchrun("tests/fsdp_worker.py", tmp_path, "lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.lora.json").read_text())
        assert report["base_shard_shape"] == [32, 64]
        assert report["adapters_trained"] and report["sharded_equals_unsharded"]
        assert report["merged_pruned_nonzero"] == 0


def test_fsdp1_flattened_weights_are_refused_in_one_line(tmp_path):
    result = run_torchrun("tests/fsdp_worker.py", tmp_path, "fsdp1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        refusal = json.loads((tmp_path / f"rank{rank}.fsdp1.json").read_text())["refusal"]
        assert refusal.startswith("model.layers.0.self_attn.q_proj is (")
        assert "not FSDP1's flattened parameters (set the FSDP config's version to 2)" in refusal


def test_evaluate_before_train_never_trains_the_replicas_apart(tmp_path):
    # Transformers from 5.24 leaves the model unwrapped by DDP after an evaluate() before train(): the guard then
    # refuses on every rank. Where it wraps the model (5.23), the replicas must have trained synchronized.
    result = run_torchrun("tests/ddp_guard_worker.py", tmp_path)
    refusals = result.stdout.count("refused: the model is not wrapped in DistributedDataParallel")
    if refusals:
        assert refusals == 2 and result.returncode != 0, result.stdout
    else:
        assert result.returncode == 0 and result.stdout.count("replicas equal") == 2, result.stdout + result.stderr


def test_an_effective_batch_the_processes_cannot_make_is_refused_under_torchrun(tmp_path, tiny_pruned_dir,
                                                                                small_corpus_dir):
    # The batch that they can make is derived in the DDP test above.
    refused = run_torchrun(*finetune_args(tiny_pruned_dir, small_corpus_dir, tmp_path / "no", "--max_steps", 1,
                                          "--use_cpu", "true", "--per_device_train_batch_size", 2,
                                          "--effective_batch_size", 6))
    assert refused.returncode != 0 and "UserError" not in refused.stderr  # torchrun adds its own report
    assert "error: --effective_batch_size 6 is not a multiple of per-device batch 2 x 2 process(es)" in refused.stderr
