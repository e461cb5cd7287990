"""The main job (`make demo`) at its smallest sizes: the report's numbers come from the models it saved.

It is also the suite's one fine-tuning of the embedded default (through the launcher, as users run it). About 4
minutes on a 2-core VM without AVX-512: `make test-slow` runs it.
"""

import json
import re
from pathlib import Path

import pytest
from conftest import run_python
from transformers import AutoModelForCausalLM

from dense_ft.masks import SparsityMasks
from dense_ft.sparsity import check_sparsity


@pytest.mark.slow
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
    assert_the_fine_tuning_logged_and_recorded_its_run(result.stdout, report["pruned"]["model"],
                                                       Path(report["finetuned"]["model"]))
    assert set(report["timings"]) >= {"dense perplexity", "prune (Wanda 16x16, 20%)", "fine-tune", "total"}


def assert_the_fine_tuning_logged_and_recorded_its_run(stdout: str, pruned_dir: str, finetuned: Path):
    assert "Initial model sparsity: 0.2001" in stdout
    assert re.search(r"Trainable params: ([\d,]+) \|\| All params: \1 \|\| Trainable%: 100.00", stdout)
    assert re.search(r"Step 2: loss=\d+\.\d{4}$", stdout, re.M)  # after a progress bar on the same line
    before = json.loads((finetuned / "initial_eval_results.json").read_text())["perplexity"]
    after = json.loads((finetuned / "eval_results.json").read_text())["perplexity"]
    assert after < before
    card = (finetuned / "README.md").read_text()
    for line in (f"base_model: {pruned_dir}", "| method | sparse full fine-tuning (SparseTrainer) |",
                 "| optimizer steps run | 4 |", "| effective batch | 8 |", f"| validation perplexity at step 0 | "
                 f"{before:.4g} |", f"| validation perplexity at step 4 | {after:.4g} |",
                 "| pruned weights that are non-zero | 0 |", "| calibration nsamples | 4 |"):
        assert line in card, line
