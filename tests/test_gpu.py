"""On a CUDA GPU only (skipped elsewhere): the launcher's bf16 recipes, the Trainer's FSDP2 path, masks
across devices, sparse LoRA's update by blocks, layer offload, and running out of GPU memory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, run_python
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAUNCHER = REPO_ROOT / "run_dense_finetune_block_20sparsity.sh"


def assert_sparsity_kept(output_dir, reference_dir):
    check = run_python("-m", "dense_ft.check_sparsity", output_dir, "--reference", reference_dir, timeout=120)
    assert check.returncode == 0 and "non-zero: 0" in check.stdout, check.stdout + check.stderr


def assert_weights_moved(output_dir, reference_dir):
    before, after = load_file(reference_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    moved = [name for name in before if not torch.equal(before[name].float(), after[name].float())]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors changed"


@pytest.mark.parametrize("method, optim, optim_args", [("full", "", ""),
                                                       ("full", "adamw_torch_8bit", "bf16_stochastic_round=True"),
                                                       ("lora", "", ""), ("qlora", "", "")])
def test_the_launcher_trains_in_bf16_on_one_gpu(tmp_path, tiny_pruned_dir, small_corpus_dir, method, optim,
                                                optim_args):
    output = tmp_path / "fine tuned"
    env = {**os.environ, "PYTHON": sys.executable, "PRUNED_MODEL": str(tiny_pruned_dir), "OUTPUT_DIR": str(output),
           "DATASET_DIR": str(small_corpus_dir), "BLOCK_SIZE": "32", "MAX_TRAIN_SAMPLES": "64", "NUM_EPOCHS": "1",
           "EFFECTIVE_BATCH_SIZE": "4", "LOGGING_STEPS": "4", "LEARNING_RATE": "1e-3", "OPTIM": optim,
           "OPTIM_ARGS": optim_args, "ASSUME_YES": "1", "METHOD": method}
    result = subprocess.run(["bash", str(LAUNCHER), "--num_gpus", "1", "--gpu_ids", "0", "--",
                             "--max_eval_samples", "4", "--disable_tqdm", "true"], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Training mode: Single GPU" in result.stdout and "Sparsity maintained: yes" in result.stdout
    assert_sparsity_kept(output, tiny_pruned_dir)
    assert_weights_moved(output, tiny_pruned_dir)


def finetune_fsdp2(model_dir, corpus_dir, output_dir, *extra):
    return run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 1,
                      "dense_ft/finetune.py", "--model_name_or_path", model_dir, "--dataset_dir", corpus_dir,
                      "--output_dir", output_dir, "--block_size", 32, "--per_device_train_batch_size", 2,
                      "--learning_rate", 1e-3, "--logging_steps", 1, "--max_eval_samples", 4, "--report_to", "none",
                      "--disable_tqdm", "true", "--torch_dtype", "bfloat16", "--bf16", "true", "--fsdp", "full_shard",
                      "--fsdp_config", REPO_ROOT / "configs/fsdp2.json", "--save_steps", 2, *extra)


def test_the_trainers_fsdp2_path_saves_shards_resumes_and_writes_a_normal_model(tmp_path, tiny_pruned_dir,
                                                                                small_corpus_dir):
    output = tmp_path / "fsdp2"
    first = finetune_fsdp2(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert list((output / "checkpoint-2").glob("pytorch_model_fsdp_0/*.distcp")), "no sharded checkpoint"
    assert_sparsity_kept(output, tiny_pruned_dir)

    resumed = finetune_fsdp2(tiny_pruned_dir, small_corpus_dir, output, "--max_steps", 4,
                             "--resume_from_checkpoint", output / "checkpoint-2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Step 3:" in resumed.stdout and "Step 1:" not in resumed.stdout
    assert "Sparsity maintained: yes" in resumed.stdout
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4
    assert_sparsity_kept(output, tiny_pruned_dir)
    assert_weights_moved(output, tiny_pruned_dir)


def test_a_mask_kept_on_the_cpu_zeroes_the_same_blocks_of_a_cuda_tensor():
    from dense_ft.masks import BlockMask

    grid = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    mask = BlockMask(grid, 16)
    on_cpu, on_gpu = torch.ones(64, 96), torch.ones(64, 96, dtype=torch.bfloat16, device="cuda")
    mask.apply_(on_cpu)
    mask.apply_(on_gpu)
    assert torch.equal(on_gpu.float().cpu(), on_cpu) and mask.count_nonzero(on_gpu) == 0
    assert torch.equal(mask.to(torch.device("cuda")).pruned_blocks.cpu(), grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lora_update_by_blocks_on_cuda_is_the_dense_masked_one(dtype):
    from test_sparse_lora import check_the_update_by_blocks

    check_the_update_by_blocks("cuda", dtype)


def test_layer_offload_on_the_gpu_prunes_the_same_blocks_and_leaves_the_weights_on_the_cpu():
    from tiny_models import tiny_llama

    from dense_ft.evaluation import perplexity
    from dense_ft.masks import SparsityMasks
    from dense_ft.wanda import prune_wanda_blocks

    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    whole, offloaded = tiny_llama(layers=3).eval().cuda(), tiny_llama(layers=3).eval()
    prune_wanda_blocks(whole, ids, 0.3, 16, "cuda", progress=False)
    prune_wanda_blocks(offloaded, ids, 0.3, 16, "cuda", offload=True, progress=False)
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
    whole_masks, offloaded_masks = SparsityMasks(whole).masks, SparsityMasks(offloaded).masks
    for name, mask in whole_masks.items():
        assert torch.equal(mask.pruned_blocks.cpu(), offloaded_masks[name].pruned_blocks), name
    expected = perplexity(whole, ids.flatten(), 64, progress=False)
    assert perplexity(offloaded, ids.flatten(), 64, progress=False, offload_device="cuda") == pytest.approx(
        expected, rel=1e-4)


def test_a_batch_the_gpu_cannot_hold_is_one_line_naming_what_to_lower(tmp_path, tiny_pruned_dir, small_corpus_dir,
                                                                       capsys):
    """The caching allocator held to 0.5% of the card raises its own torch.OutOfMemoryError, as a batch too big for
    the whole card would."""
    from dense_ft.finetune import main as finetune_main

    torch.cuda.set_per_process_memory_fraction(0.005)
    try:
        with pytest.raises(SystemExit) as exited:
            finetune_main(["--model_name_or_path", str(tiny_pruned_dir), "--dataset_dir", str(small_corpus_dir),
                           "--output_dir", str(tmp_path / "run"), "--block_size", "256", "--bf16", "true",
                           "--per_device_train_batch_size", "64", "--max_steps", "1", "--save_strategy", "no",
                           "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and last.startswith(
        "error: out of memory: lower --per_device_train_batch_size") and "CUDA out of memory" in last, last
