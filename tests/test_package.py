"""The package installs with pip and its tools run from anywhere, with no path set by hand."""

import importlib
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from itertools import chain
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dense_ft.errors import UserError
from dense_ft.versions import check_installed_versions, check_optimizer_steps_on, installed_requirements

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
TOOLS = {"dense-ft-prune": "Prune a causal LM", "dense-ft-finetune": "--model_name_or_path",
         "dense-ft-check-sparsity": "Sparsity report", "dense-ft-merge-lora": "Merge a PEFT LoRA adapter"}


@pytest.mark.slow  # about 45 s; `make test` itself installs the package the same way first
def test_pip_install_in_a_fresh_venv_gives_the_package_and_its_console_scripts(tmp_path):
    """A new virtual environment that sees this one's dependencies (a .pth file), so that pip resolves
    them without downloading; ``pip install .`` itself runs as a user would run it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation",
                              str(project_sources(tmp_path / "project"))],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (site / "dense_ft" / "sparse_lora.py").exists()
    assert (site / "dense_ft" / "block_zero.c").exists()  # the masking kernel's source, built on first use
    scripts = PROJECT["scripts"]
    assert scripts.keys() == TOOLS.keys()
    for tool, expected in TOOLS.items():
        result = subprocess.run([str(venv / "bin" / tool), "--help"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and expected in result.stdout, (tool, result.stderr[-2000:])


def project_sources(destination: Path) -> Path:
    """What ``pip install .`` builds from, copied: a build in the checkout would rewrite its dense_ft.egg-info,
    where other tests meanwhile read the package's ranges (``dense_ft.versions``)."""
    shutil.copytree(REPO_ROOT / "dense_ft", destination / "dense_ft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, destination)
    return destination


def test_the_pinned_versions_lie_in_the_package_ranges():
    """What CI installs (requirements.txt) is one of the sets that ``pip install .`` may resolve to."""
    ranges = {canonicalize_name(requirement.name): requirement.specifier
              for requirement in map(Requirement, chain(PROJECT["dependencies"],
                                                        *PROJECT["optional-dependencies"].values()))}
    pins = {canonicalize_name(requirement.name): next(iter(requirement.specifier)).version
            for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()
            for requirement in [Requirement(line.split("#")[0])]}
    assert {name: pins[name] for name in ranges.keys() & pins.keys() if pins[name] not in ranges[name]} == {}
    assert ranges.keys() - pins.keys() == {"torchao"}  # the 8-bit optimizers' extra, which only GPU checks install


def test_the_tools_check_the_ranges_of_pyproject_and_this_environment_meets_them():
    checked = [Requirement(line) for line in installed_requirements()]
    assert {str(r) for r in checked if r.marker is None} == {str(Requirement(line)) for line in PROJECT["dependencies"]}
    check_installed_versions()


@pytest.mark.parametrize("requirements, refusal", [
    (["peft>=0.20,<1", "torch>=99"],
     "torch {torch} is installed, but dense-ft needs torch>=99: pip install 'torch>=99'"),
    (["no-such-package>=1"], "no-such-package is not installed: pip install 'no-such-package>=1'"),
])
def test_a_release_out_of_range_or_missing_is_refused_in_one_line(requirements, refusal):
    with pytest.raises(UserError) as refused:
        check_installed_versions(requirements)
    assert str(refused.value) == refusal.format(torch=metadata.version("torch"))


def test_an_extra_is_not_checked():
    check_installed_versions(['no-such-package>=1; extra == "qlora"'])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("device, optimizer, release, refused", [
    ("cpu", "bitsandbytes.optim:AdamW8bit", "0.49.0", True),
    ("cpu", "bitsandbytes.optim:PagedAdamW32bit", "0.46.1", True),
    ("cpu", "galore_torch:GaLoreAdamW8bit", "0.49.0", True),  # a bitsandbytes optimizer underneath
    ("cpu", "bitsandbytes.optim:AdamW8bit", "0.50.0", False),
    ("cpu", "bitsandbytes.optim:AdamW8bit", None, False),  # the installed release: the tests need 0.50 or later
    ("cuda", "bitsandbytes.optim:AdamW8bit", "0.49.0", False),
    ("cpu", "torch.optim:AdamW", "0.49.0", False),
])
def test_a_bitsandbytes_optimizer_is_refused_on_the_cpu_before_0_50(device, optimizer, release, refused):
    module, name = optimizer.split(":")
    optimizer_cls = getattr(importlib.import_module(module), name)
    if not refused:
        check_optimizer_steps_on(device, optimizer_cls, "some_optim", release)
        return
    with pytest.raises(UserError) as refusal:
        check_optimizer_steps_on(device, optimizer_cls, "some_optim", release)
    assert str(refusal.value) == (f"--optim some_optim on the CPU needs bitsandbytes >= 0.50 ({release} is installed): "
                                  "pip install 'bitsandbytes>=0.50', or train on a GPU")


@pytest.mark.parametrize("tool, args", [
    ("finetune", ["--model_name_or_path", "absent", "--output_dir", "absent-out"]),
    ("prune", ["--model", "absent"]),
    ("merge_lora", ["absent", "absent-adapter", "absent-out"]),
    ("check_sparsity", ["absent"]),
])
def test_each_tool_refuses_a_peft_older_than_its_range_before_any_work(tool, args, tmp_path, monkeypatch, capsys):
    """Metadata of PEFT 0.19.0 first on the path: what ``importlib.metadata`` reads of an environment with that
    release installed."""
    dist_info = tmp_path / "peft-0.19.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.19.0\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"dense_ft.{tool}").main(args)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: peft 0.19.0 is installed, but dense-ft needs peft<1,>=0.20: "
                                               "pip install 'peft<1,>=0.20'")


def test_no_code_edits_the_import_path():
    sources = [REPO_ROOT / "main_block.py", *(path for folder in ("dense_ft", "tests", "bench", "scripts")
                                              for path in REPO_ROOT.glob(f"{folder}/*.py"))]
    assert [path.name for path in sources if path.name != Path(__file__).name and "sys.path" in path.read_text()] == []
