"""Shared fixtures: a tiny pruned Llama saved with the embedded tokenizer, and the embedded default prepared by
`make test`."""

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import prepare_embedded  # scripts/, on pytest's pythonpath
import torch
from tiny_models import tiny_llama, zero_random_blocks
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # `pytest -n`: the workers, and the processes they start, share the cores torch would use alone
    threads_per_worker = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads_per_worker)
    os.environ["OMP_NUM_THREADS"] = str(threads_per_worker)


def run_python(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_main(main: Callable[[list[str]], None], *args) -> subprocess.CompletedProcess:
    """A command's ``main`` run in this process, as ``run_python`` runs its script, less the interpreter's start-up
    (seconds of imports). An exception other than SystemExit is not caught: it fails the test, as a traceback would."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as exited:
            code = exited.code or 0
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def file_contents(directory: Path) -> dict[Path, bytes]:
    """Every file under ``directory`` and its bytes: what a refused run must leave as it was."""
    return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def hub_cache(cache_dir: Path, repo_id: str, revisions: dict[str, Path]) -> None:
    """``cache_dir`` holding the model ``repo_id`` as the Hub's downloads leave it: a snapshot per revision (a branch
    or tag name: a copy of its directory), each named by a commit that ``refs/<revision>`` points to."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    for number, (revision, directory) in enumerate(revisions.items()):
        commit = f"{number:040x}"
        shutil.copytree(directory, repo / "snapshots" / commit)
        (repo / "refs" / revision).write_text(commit)


def without_tokenizer(model_dir: Path, directory: Path) -> Path:
    """A copy of the model in ``model_dir`` as SparseGPT's script saves one: weights and config, no tokenizer."""
    directory.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(model_dir / name, directory / name)
    return directory


# An architecture transformers does not hold, as custom models on the Hub come: a Llama under another name.
REMOTE_MODELING_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class TinyConfig(LlamaConfig):
    model_type = "tiny_custom"


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
"""


def with_remote_code(model_dir: Path, directory: Path) -> Path:
    """A copy of the Llama in ``model_dir`` that loads only through its own code, named by ``auto_map``."""
    shutil.copytree(model_dir, directory)
    (directory / "modeling_tiny.py").write_text(REMOTE_MODELING_CODE)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "modeling_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def prepared(path: Path, marker: str) -> Path:
    if not (path / marker).exists():
        pytest.fail(f"the embedded default is not prepared ({path}): run `make test` or scripts/prepare_embedded.py")
    return path


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    return prepared(prepare_embedded.model_dir(), "config.json")


@pytest.fixture(scope="session")
def embedded_corpus_dir() -> Path:
    return prepared(prepare_embedded.corpus_dir(), "wiki.train.raw")


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="session")
def tiny_pruned_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with 20% random 16x16 blocks zeroed, saved with the embedded tokenizer."""
    model = tiny_llama(vocab_size=len(tokenizer))
    zero_random_blocks(model)
    path = tmp_path_factory.mktemp("tiny_pruned")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory, tokenizer) -> Path:
    """The dense original of ``tiny_pruned_dir`` (same seed, nothing zeroed)."""
    path = tmp_path_factory.mktemp("tiny_dense")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory, embedded_corpus_dir) -> Path:
    """A WikiText-layout directory small enough for a few training steps on the CPU."""
    path = tmp_path_factory.mktemp("small_corpus")
    for split, chars in (("train", 60_000), ("valid", 12_000), ("test", 12_000)):
        text = (embedded_corpus_dir / f"wiki.{split}.raw").read_text(encoding="utf-8")
        (path / f"wiki.{split}.raw").write_text(text[:chars], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def embedded_pruned(tmp_path_factory, embedded_model_dir, embedded_corpus_dir) -> Path:
    """The embedded default pruned to 20% by main_block.py: ``results.json`` and ``pruned_model/``."""
    path = tmp_path_factory.mktemp("embedded_pruned")
    result = run_python("main_block.py", "--model", embedded_model_dir, "--calib_dataset", embedded_corpus_dir,
                        "--eval_dataset", embedded_corpus_dir, "--seqlen", 256, "--max_eval_windows", 4,
                        "--sparsity_ratio", 0.2, "--nsamples", 8, "--save", path, "--save_model",
                        path / "pruned_model")
    assert result.returncode == 0, result.stderr[-3000:]
    return path
