import json
import shutil

import pytest
from conftest import file_contents, hub_cache, run_main, run_python, with_remote_code
from transformers import AutoModelForCausalLM

from dense_ft.masks import SparsityMasks
from dense_ft.prune import main as prune_main
from dense_ft.prune import parse_args
from dense_ft.sparsity import PATTERN_KEY, check_sparsity


@pytest.mark.parametrize("extra, message", [
    (["--model", "no/such/model_dir"], "model directory not found"),
    (["--sparsity_ratio", "1.0"], "--sparsity_ratio must be in [0, 1)"),
    (["--sparsity_ratio", "-0.1"], "--sparsity_ratio must be in [0, 1)"),
    (["--block_size", "24", "--sparsity_ratio", "0.2"], "not a whole number of 24x24 blocks"),
    (["--sparsity_ratio", "0.1"], "the model is pruned already, 20% of its blocks: --sparsity_ratio 0.1 would"),
    (["--eval_dataset", "{missing}"], "corpus directory not found"),
    (["--eval_dataset", "{empty}"], "lacks wiki.test.raw"),
    (["--seqlen", "100000"], "exceeds the model's"),
    (["--nsamples", "0"], "--nsamples must be positive"),
    (["--device", "nowhere"], "argument --device: not a device: 'nowhere'"),
    (["--eval_zero_shot", "--tasks", "no_such_task"], "unknown lm-eval task: 'no_such_task'"),
    (["--eval_zero_shot", "--tasks", " , "], "--tasks names no task"),
    (["--eval_zero_shot", "--include_path", "{missing}"], "missing/corpus is not a directory"),
    (["--eval_zero_shot", "--limit", "0"], "--limit must be positive"),
    (["--device", "cuda:99"], "argument --device: cuda:99: this"),  # no usable cuda device, or too few
    (["--model", "{copy}", "--save_model", "{copy}/"], "is the --model directory, which the run would overwrite"),
    (["--model", "{adapter}"], "is a PEFT adapter directory, not a model: merge it into the pruned model"),
    (["--cache_dir", "{copy}/config.json"], "model/config.json is a file"),
])
def test_bad_input_is_one_line_and_non_zero(extra, message, tmp_path, tiny_pruned_dir, small_corpus_dir):
    (tmp_path / "empty").mkdir()
    shutil.copytree(tiny_pruned_dir, tmp_path / "model")
    (tmp_path / "adapter").mkdir()  # transformers loads a directory with both files as the base plus plain LoRA
    for name in ("adapter_config.json", "config.json"):
        shutil.copy(tiny_pruned_dir / "config.json", tmp_path / "adapter" / name)
    args = ["--model", tiny_pruned_dir, "--calib_dataset", small_corpus_dir, "--eval_dataset", small_corpus_dir,
            "--seqlen", 64]
    args += [a.format(missing=tmp_path / "missing/corpus", empty=tmp_path / "empty", copy=tmp_path / "model",
                      adapter=tmp_path / "adapter") for a in extra]
    result = run_main(prune_main, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert file_contents(tmp_path / "model") == file_contents(tiny_pruned_dir)


def test_a_model_from_the_hub_comes_from_cache_dir(tmp_path, tiny_dense_dir, small_corpus_dir):
    """The Hub here: its cache, read offline; the corpora's cache goes there too, as run_clm.py keeps it."""
    hub_cache(tmp_path / "cache", "acme/tiny", {"main": tiny_dense_dir})
    result = run_main(prune_main, "--model", "acme/tiny", "--cache_dir", tmp_path / "cache", "--calib_dataset",
                      small_corpus_dir, "--eval_dataset", small_corpus_dir, "--seqlen", 64, "--nsamples", 4,
                      "--sparsity_ratio", 0.2, "--save_model", tmp_path / "pruned")
    assert result.returncode == 0, result.stderr[-3000:]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert PATTERN_KEY in pruned.config.to_dict() and check_sparsity(pruned) > 0.1  # 0.2 of the blocks, rounded down
    assert any((tmp_path / "cache" / "text").iterdir())


def test_a_model_with_its_own_code_prunes_only_with_trust_remote_code_and_keeps_its_code(tmp_path, tiny_dense_dir,
                                                                                         small_corpus_dir):
    dense = with_remote_code(tiny_dense_dir, tmp_path / "dense")
    args = ["--model", dense, "--calib_dataset", small_corpus_dir, "--eval_dataset", small_corpus_dir, "--seqlen", 64,
            "--nsamples", 4, "--sparsity_ratio", 0.2, "--save_model", tmp_path / "pruned"]
    refused = run_main(prune_main, *args)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        f"error: {dense} holds its own code, which runs only with --trust_remote_code")
    result = run_main(prune_main, *args, "--trust_remote_code")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pruned" / "modeling_tiny.py").is_file()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True)
    assert type(pruned).__name__ == "TinyForCausalLM" and check_sparsity(pruned) > 0.1


def test_main_block_does_not_import_the_trainer():
    # The Trainer and the training integrations it loads take 8 s to import on a 2-core machine: a bad flag would
    # wait for them
    result = run_python("-c", "import sys, dense_ft.prune; print(sorted(m for m in sys.modules if m.startswith("
                        "('transformers.trainer', 'transformers.integrations.integration_utils'))))", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_the_automatic_dtype_is_float32_on_any_cpu_device(device):
    assert parse_args(["--model", "any", "--device", device]).dtype == "float32"


def test_prune_the_embedded_default_end_to_end(embedded_model_dir, embedded_corpus_dir, embedded_pruned):
    # That pruning costs perplexity against the dense model is the demo's test (tests/test_demo.py).
    results = json.loads((embedded_pruned / "results.json").read_text())
    assert (embedded_pruned / "log_wanda_block.txt").exists()

    model = AutoModelForCausalLM.from_pretrained(embedded_pruned / "pruned_model")
    masks = SparsityMasks(model)
    weights = sum(m.weight.numel() for m in masks.linears.values())
    assert len(masks) == 210
    assert f"{masks.num_pruned / weights:.4f}" in ("0.1999", "0.2000")  # floor(0.2 * blocks) per matrix
    assert check_sparsity(model) == pytest.approx(results["actual_sparsity"])
    assert 0.2 < check_sparsity(model) < 0.2005  # plus the stray zeros of the dequantized weights
    assert getattr(model.config, PATTERN_KEY) == {
        "version": 1, "method": "wanda", "structure": "block", "block_size": 16, "sparsity_ratio": 0.2,
        "modules": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                    "self_attn.q_proj", "self_attn.v_proj"],
        "calibration": {"nsamples": 8, "seqlen": 256, "dataset": str(embedded_corpus_dir), "seed": 0}}
    card = (embedded_pruned / "pruned_model" / "README.md").read_text()
    for line in (f"base_model: {embedded_model_dir}", "- wanda-pruning", "| block_size | 16 |",
                 "| calibration nsamples | 8 |", f"| calibration dataset | {embedded_corpus_dir} |",
                 f"| perplexity (seqlen 256) | {results['perplexity']:.4g} |",
                 f"| sparsity of the prunable weights | {results['actual_sparsity']:.4g} |"):
        assert line in card, line
