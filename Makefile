# Two commands do all the set-up: `make demo` runs the whole pipeline on the embedded
# default, `make test` runs the test suite (`make test-slow`, the few tests of several minutes,
# is what CI runs after it). Both create .venv from requirements.txt (and the package itself,
# editable) first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-requirements
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test test-slow lint embedded

# pip byte-compiles the dependencies on one core, compileall on all of them (this install: 197 s against
# 162-178 s on two cores). They must be compiled here: where PYTHONDONTWRITEBYTECODE is set, as on
# our machines, no later process writes a .pyc. compileall exits 1 for the few files written for
# another Python version (torch's py312_intrinsics.py), which pip's compilation skips as well.
$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PYTHON) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

embedded: $(INSTALLED)
	$(PYTHON) scripts/prepare_embedded.py

demo: embedded
	$(PYTHON) scripts/demo.py

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck run_dense_finetune_block_20sparsity.sh .ci/run bench/run_gpu_checks.sh

# One worker per core (tests/conftest.py gives each its share of the threads), at most four. Each worker
# builds the session fixtures it needs: `--dist loadgroup` would share them, but xdist 3.8 names the groups
# through Item._nodeid, which pytest 9.2 no longer reads.
test: embedded lint
	$(PYTHON) -m pytest -q -n auto --maxprocesses 4 tests

test-slow: embedded
	$(PYTHON) -m pytest -q -n auto --maxprocesses 4 -m slow tests
