import json
import math

import torch
from conftest import run_python
from tiny_models import tiny_llama

from dense_ft.evaluation import perplexity

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


def test_zero_shot_with_a_local_task(tmp_path, embedded_model_dir, small_corpus_dir):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TINY_TASK.format(data=data))
    result = run_python("main_block.py", "--model", embedded_model_dir, "--eval_dataset", small_corpus_dir,
                        "--seqlen", 128, "--max_eval_windows", 1, "--eval_zero_shot", "--tasks",
                        "tiny_obvious_choice", "--include_path", tasks, "--eval_batch_size", "auto",
                        "--save", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_obvious_choice" in result.stdout and "acc" in result.stdout  # the printed table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["zero_shot"] == {"tiny_obvious_choice": 1.0}
    metrics = results["zero_shot_metrics"]["tiny_obvious_choice"]
    assert metrics["acc"] == 1.0 and {"acc_stderr", "acc_norm", "acc_norm_stderr"} <= metrics.keys()
    lm_eval = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert lm_eval["results"]["tiny_obvious_choice"]["acc_norm,none"] == metrics["acc_norm"]
    assert "samples" not in lm_eval and "tiny_obvious_choice" in lm_eval["configs"]
