"""Layer-by-layer execution (layer offload): the same pruning and the same perplexity as the whole model."""

import json
import math

import pytest
import torch
from conftest import run_python
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from dense_ft.evaluation import perplexity
from dense_ft.layerwise import layerwise_nll
from dense_ft.masks import SparsityMasks
from dense_ft.wanda import prune_wanda_blocks

BLOCK = 16


def windows(count=4, length=32, seed=0):
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def test_layerwise_nll_is_the_models_loss():
    model = tiny_llama(layers=3).eval()
    ids = windows()
    with torch.no_grad():
        expected = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in ids) / len(ids)
    assert layerwise_nll(model, ids, "cpu", offload=True, progress=False) == pytest.approx(expected, rel=1e-5)
    token_ids = ids.flatten()
    assert perplexity(model, token_ids, 32, progress=False, offload_device="cpu") == pytest.approx(
        math.exp(expected), rel=1e-5)


def test_offloaded_pruning_prunes_the_same_blocks():
    ids = windows(seed=1)
    models = {offload: tiny_llama(layers=3).eval() for offload in (False, True)}
    for offload, model in models.items():
        prune_wanda_blocks(model, ids, 0.3, BLOCK, "cpu", offload=offload, progress=False)
    plain, offloaded = (SparsityMasks(models[offload]).masks for offload in (False, True))
    assert plain.keys() == offloaded.keys() and len(plain) == 21
    for name, mask in plain.items():
        assert torch.equal(mask.pruned_blocks, offloaded[name].pruned_blocks), name
    assert all(p.device.type == "cpu" for p in models[True].parameters())


@pytest.mark.slow  # about 100 s with the embedded default's pruning, which its worker may build a second time
def test_main_block_with_offload_matches_the_whole_model_run(tmp_path, embedded_model_dir, embedded_corpus_dir,
                                                             embedded_pruned):
    """The embedded default pruned with --offload (same seed and calibration as the fixture's run)."""
    result = run_python("main_block.py", "--model", embedded_model_dir, "--calib_dataset", embedded_corpus_dir,
                        "--eval_dataset", embedded_corpus_dir, "--seqlen", 256, "--max_eval_windows", 4,
                        "--sparsity_ratio", 0.2, "--nsamples", 8, "--offload", "--save", tmp_path,
                        "--save_model", tmp_path / "pruned_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Layer offload: the weights stay on the CPU" in result.stdout
    offloaded = SparsityMasks(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned_model")).masks
    whole = SparsityMasks(AutoModelForCausalLM.from_pretrained(embedded_pruned / "pruned_model")).masks
    assert offloaded.keys() == whole.keys() and len(whole) == 210
    for name, mask in whole.items():
        assert torch.equal(mask.pruned_blocks, offloaded[name].pruned_blocks), name
    results = {path: json.loads((path / "results.json").read_text()) for path in (tmp_path, embedded_pruned)}
    assert results[tmp_path]["offload"] is True and results[embedded_pruned]["offload"] is False
    assert results[tmp_path]["perplexity"] == pytest.approx(results[embedded_pruned]["perplexity"], rel=1e-4)
