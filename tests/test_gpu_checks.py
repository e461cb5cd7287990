"""bench/run_gpu_checks.sh, run for real on the CPU with the tiny config: every stage's benchmark works
against the current code before a GPU is spent on it, and the time budget cuts and skips what it cannot fit.

The run of every stage takes about 3 minutes here, so it is marked ``slow``: `make test-slow` runs it,
and CI runs that after `make test`."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "run_gpu_checks.sh"
STAGES = ["masking", "recipes", "offload", "tests", "lora"]
SMALL = {"CONFIG": "tiny", "DEVICE": "cpu", "MASKING_ARGS": "--repeats 2 --rounds 1",
         "RECIPE_ARGS": "--steps 2 --accumulation 1 --seqlen 32", "OFFLOAD_ARGS": "--nsamples 2 --seqlen 64"}


def run_checks(log_dir, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(log_dir)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, **SMALL, **env}, stdin=subprocess.DEVNULL)


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def stage_outcomes(log_dir) -> dict[str, str]:
    """``stage: outcome`` from stages.log, whose lines read ``NAME  SECONDS s  OUTCOME``."""
    lines = (log_dir / "stages.log").read_text().splitlines()
    return {line.split()[0]: line.split(" s  ", 1)[1] for line in lines}


def load_preflight():
    spec = importlib.util.spec_from_file_location("preflight", REPO_ROOT / "bench" / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_stage_runs_on_the_cpu_and_reports_what_the_goals_are_set_on(tmp_path):
    result = run_checks(tmp_path)
    outcomes = stage_outcomes(tmp_path)
    assert list(outcomes) == STAGES, result.stdout[-3000:] + result.stderr[-3000:]
    [masking] = json_lines(tmp_path / "masking.log")
    assert masking["config"] == "tiny" and masking["pass_ms"] > 0 and masking["floor_ms"] > 0
    *recipes, ratios = json_lines(tmp_path / "recipes.log")
    assert [line["recipe"] for line in recipes] == ["bf16", "bf16-unmasked", "bf16-unmasked", "bf16", "bf16-distill",
                                                    "8bit-sr-distill"]
    trained = [line for line in recipes if "error" not in line]
    assert [line["violations"] > 0 for line in trained[:4]] == [False, True, True, False]  # the plain Trainer's
    assert all(line["violations"] == 0 for line in trained[4:])
    assert set(ratios["ratios"]) == {"sparse_over_plain_trainer", "distill_over_bf16", "masking_share_of_step"}
    assert [line["mode"] for line in json_lines(tmp_path / "offload.log")] == ["offload", "whole"]
    tests = (tmp_path / "tests.log").read_text()
    assert " skipped" in tests and "failed" not in tests and "error" not in tests
    *lora, lora_ratios = json_lines(tmp_path / "lora.log")
    assert [line["recipe"] for line in lora] == ["lora-sparse", "lora-plain", "qlora-sparse"]
    assert lora[1]["violations"] > 0  # plain LoRA's merge fills pruned blocks
    assert lora[0]["violations"] == lora[2]["violations"] == 0  # sparse LoRA's, and sparse QLoRA's unquantized
    assert set(lora_ratios["ratios"]) == {"sparse_over_plain_lora"}
    expected = dict.fromkeys(STAGES, "passed")
    if importlib.util.find_spec("torchao") is None:  # the 8-bit recipe fails alone, and says why
        assert len(trained) == 5 and "torchao" in recipes[5]["error"]
        expected["recipes"] = "failed: exit 1"
    assert outcomes == expected
    assert result.returncode == (0 if set(expected.values()) == {"passed"} else 1)


# A Python whose preflight and masking benchmark pass at once and whose other stages never end: the budget's
# logic alone, whatever the load. (With the real stages and a 25 s budget, a loaded CI machine once spent it all
# in the preflight's imports.)
STALLING_PYTHON = """#!/bin/sh
case "$1" in bench/preflight.py | bench/bench_masking.py) exit 0 ;; esac
exec sleep 300
"""


def test_the_budget_cuts_the_stage_that_runs_past_it_and_skips_the_rest(tmp_path):
    python = tmp_path / "python"
    python.write_text(STALLING_PYTHON)
    python.chmod(0o755)
    started = time.monotonic()
    result = run_checks(tmp_path / "logs", PYTHON=str(python), BUDGET_SECONDS="5", MIN_STAGE_SECONDS="2")
    elapsed = time.monotonic() - started
    outcomes = stage_outcomes(tmp_path / "logs")
    assert list(outcomes.values())[:2] == ["passed", "timed out: the budget ran out"], outcomes
    assert all(outcome.startswith("skipped: ") for outcome in list(outcomes.values())[2:]), outcomes
    assert list(outcomes) == STAGES and result.returncode == 1 and elapsed < 5 + 15  # the grace before a kill


def test_a_missing_package_is_named_before_anything_runs(monkeypatch, capsys):
    preflight = load_preflight()
    assert preflight.main() == 0
    monkeypatch.setattr(preflight, "REQUIRED", (*preflight.REQUIRED, "no-such-package"))
    assert preflight.main() == 1
    assert "the GPU checks need no-such-package" in capsys.readouterr().err
