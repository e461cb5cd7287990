"""The package installs with pip and its tools run from anywhere, with no path set by hand."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO_ROOT

TOOLS = {"dense-ft-prune": "Prune a causal LM", "dense-ft-finetune": "--model_name_or_path",
         "dense-ft-check-sparsity": "Sparsity report", "dense-ft-merge-lora": "Merge a PEFT LoRA adapter"}


def test_pip_install_gives_the_package_and_its_console_scripts(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (target / "dense_ft" / "sparse_lora.py").exists()
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.keys() == TOOLS.keys()
    env = {**os.environ, "PYTHONPATH": str(target)}
    for tool, expected in TOOLS.items():
        script = target / "bin" / tool
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and expected in result.stdout, (tool, result.stderr[-2000:])
        module = subprocess.run([sys.executable, "-c", f"import {scripts[tool].split(':')[0]} as m; print(m.__file__)"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert module.stdout.startswith(str(target)), module.stderr[-2000:]


def test_neither_the_package_nor_the_tests_edit_the_import_path():
    sources = [*REPO_ROOT.glob("dense_ft/*.py"), REPO_ROOT / "main_block.py", *REPO_ROOT.glob("tests/*.py")]
    assert [path.name for path in sources if path.name != Path(__file__).name and "sys.path" in path.read_text()] == []
