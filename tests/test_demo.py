"""The main job (`make demo`) at its smallest sizes: the report's numbers come from the models it saved."""

import json

import pytest
from conftest import run_python
from transformers import AutoModelForCausalLM

from dense_ft.masks import SparsityMasks
from dense_ft.sparsity import check_sparsity


def test_demo_pipeline_and_its_report(tmp_path, embedded_model_dir, embedded_corpus_dir):
    result = run_python("scripts/demo.py", "--quick", "--out", tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert "| fine-tuned (SparseTrainer) |" in result.stdout and (tmp_path / "report.md").exists()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    pruned = AutoModelForCausalLM.from_pretrained(report["pruned"]["model"])
    finetuned = AutoModelForCausalLM.from_pretrained(report["finetuned"]["model"])
    assert report["pruned"]["sparsity"] == pytest.approx(check_sparsity(pruned))
    assert report["finetuned"]["sparsity"] == pytest.approx(check_sparsity(finetuned))
    assert report["violations"] == sum(SparsityMasks(pruned).violations(finetuned).values()) == 0
    assert report["dense"]["perplexity"] < report["finetuned"]["perplexity"] < report["pruned"]["perplexity"]
    assert set(report["timings"]) >= {"dense perplexity", "prune (Wanda 16x16, 20%)", "fine-tune", "total"}
