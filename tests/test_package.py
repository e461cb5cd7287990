"""The package installs with pip and its tools run from anywhere, with no path set by hand."""

import subprocess
import sys
import sysconfig
import tomllib
from itertools import chain
from pathlib import Path

from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TOOLS = {"dense-ft-prune": "Prune a causal LM", "dense-ft-finetune": "--model_name_or_path",
         "dense-ft-check-sparsity": "Sparsity report", "dense-ft-merge-lora": "Merge a PEFT LoRA adapter"}


def test_pip_install_in_a_fresh_venv_gives_the_package_and_its_console_scripts(tmp_path):
    """A new virtual environment that sees this one's dependencies (a .pth file), so that pip resolves
    them without downloading; ``pip install .`` itself runs as a user would run it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation", str(REPO_ROOT)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (site / "dense_ft" / "sparse_lora.py").exists()
    assert (site / "dense_ft" / "block_zero.c").exists()  # the masking kernel's source, built on first use
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.keys() == TOOLS.keys()
    for tool, expected in TOOLS.items():
        result = subprocess.run([str(venv / "bin" / tool), "--help"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and expected in result.stdout, (tool, result.stderr[-2000:])


def test_the_pinned_versions_lie_in_the_package_ranges():
    """What CI installs (requirements.txt) is one of the sets that ``pip install .`` may resolve to."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(requirement.name): requirement.specifier
              for requirement in map(Requirement, chain(project["dependencies"],
                                                        *project["optional-dependencies"].values()))}
    pins = {canonicalize_name(requirement.name): next(iter(requirement.specifier)).version
            for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()
            for requirement in [Requirement(line.split("#")[0])]}
    assert {name: pins[name] for name in ranges.keys() & pins.keys() if pins[name] not in ranges[name]} == {}
    assert ranges.keys() - pins.keys() == {"torchao"}  # the 8-bit optimizers' extra, which only GPU checks install


def test_no_code_edits_the_import_path():
    sources = [REPO_ROOT / "main_block.py", *(path for folder in ("dense_ft", "tests", "bench", "scripts")
                                              for path in REPO_ROOT.glob(f"{folder}/*.py"))]
    assert [path.name for path in sources if path.name != Path(__file__).name and "sys.path" in path.read_text()] == []
