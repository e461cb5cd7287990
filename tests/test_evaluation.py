import json
import math

import pytest
import torch
from conftest import run_main
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from dense_ft.evaluation import perplexity
from dense_ft.prune import main as prune_main
from dense_ft.sparsity import check_sparsity

TINY_TASK = """\
task: tiny_obvious_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
QUESTIONS = [
    ("The sky on a clear day is", [" blue", " spoon-shaped"], 0),
    ("One, two, three, four,", [" carpet", " five"], 1),
    ("Paris is the capital of", [" France", " breakfast"], 0),
    ("Monday, Tuesday,", [" Wednesday", " purple"], 0),
]


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = tiny_llama().eval()
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    seqlen = 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(100 // seqlen):  # 6 windows; the last 4 tokens are dropped
            window = ids[i * seqlen:(i + 1) * seqlen]
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            nll -= log_probs[torch.arange(seqlen - 1), window[1:]].sum().item()
            count += seqlen - 1
    assert math.isclose(perplexity(model, ids, seqlen, progress=False), math.exp(nll / count), rel_tol=1e-4)
    assert perplexity(model, ids, seqlen, max_windows=2, progress=False) != perplexity(model, ids, seqlen,
                                                                                         progress=False)


def tiny_task_dir(tmp_path, data):
    """A folder of lm-eval task definitions holding ``tiny_obvious_choice``, whose questions are in ``data``."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TINY_TASK.format(data=data))
    return tasks


def test_zero_shot_with_a_local_task(tmp_path, embedded_model_dir, small_corpus_dir):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tiny_task_dir(tmp_path, data)
    result = run_main(prune_main, "--model", embedded_model_dir, "--eval_dataset", small_corpus_dir, "--seqlen", 128,
                      "--max_eval_windows", 1, "--eval_zero_shot", "--tasks", "tiny_obvious_choice", "--include_path",
                      tasks, "--eval_batch_size", "auto", "--save", tmp_path / "out", "--save_model",
                      tmp_path / "out" / "model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_obvious_choice" in result.stdout and "acc" in result.stdout  # the printed table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["zero_shot"] == {"tiny_obvious_choice": 1.0}
    metrics = results["zero_shot_metrics"]["tiny_obvious_choice"]
    assert metrics["acc"] == 1.0 and {"acc_stderr", "acc_norm", "acc_norm_stderr"} <= metrics.keys()
    lm_eval = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert lm_eval["results"]["tiny_obvious_choice"]["acc_norm,none"] == metrics["acc_norm"]
    assert "samples" not in lm_eval and "tiny_obvious_choice" in lm_eval["configs"]
    # Saved before the evaluation, completed after it.
    assert "| tiny_obvious_choice accuracy (zero-shot) | 1 |" in (tmp_path / "out" / "model" / "README.md").read_text()
    assert "tiny_obvious_choice\t1.0000" in (tmp_path / "out" / "log_wanda_block.txt").read_text()


def prune_and_evaluate(model_dir, corpus_dir, tasks, out, *extra):
    return run_main(prune_main, "--model", model_dir, "--calib_dataset", corpus_dir, "--eval_dataset", corpus_dir,
                    "--seqlen", 32, "--nsamples", 2, "--max_eval_windows", 1, "--sparsity_ratio", 0.2,
                    "--eval_zero_shot", "--include_path", tasks, "--save", out, "--save_model", out / "pruned_model",
                    *extra)


def test_a_failed_zero_shot_evaluation_keeps_the_pruned_model_and_its_results(tmp_path, tiny_pruned_dir,
                                                                              small_corpus_dir):
    # A task whose data cannot be read, as a Hub data set offline: the model and figures were saved before it.
    tasks, out = tiny_task_dir(tmp_path, tmp_path / "missing.jsonl"), tmp_path / "out"
    result = prune_and_evaluate(tiny_pruned_dir, small_corpus_dir, tasks, out, "--tasks", "tiny_obvious_choice")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: zero-shot evaluation failed: ") and "missing.jsonl" in last_line
    assert last_line.endswith(f"(saved before it: {out}, {out / 'pruned_model'})")
    results = json.loads((out / "results.json").read_text())
    assert "zero_shot" not in results and results["perplexity"] > 1 and results["actual_sparsity"] > 0.2
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned_model")
    assert check_sparsity(pruned) == pytest.approx(results["actual_sparsity"])


def test_an_unknown_task_is_refused_before_the_model_loads(tmp_path, tiny_pruned_dir, small_corpus_dir):
    tasks, out = tiny_task_dir(tmp_path, tmp_path / "missing.jsonl"), tmp_path / "out"
    result = prune_and_evaluate(tiny_pruned_dir, small_corpus_dir, tasks, out, "--tasks", "tiny_obvious_choice,nope")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == "error: unknown lm-eval task: 'nope'"
    assert "sparsity sanity check" not in result.stdout and not out.exists()
