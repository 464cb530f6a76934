# The commands of the README: `make example`, `make test` and `make test-fast`. All install what they need and
# are idempotent.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU build by default (a local wheel on these machines); on a GPU cluster use e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
EXAMPLE_DIR ?= runs/example

.PHONY: install example test test-fast lint typecheck pytest cluster templates clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## Train the built-in example locally on CPU (a new experiment directory each time).
example: install
	$(VENV)/bin/tsdia-train configs/example.yml training.checkpoint.save_dir=$(EXAMPLE_DIR)-$$(date +%Y%m%d-%H%M%S)

## The local Slurm cluster needs root; without it the Slurm and container tests skip themselves (pytest says so).
cluster:
	@if [ "$$(id -u)" -eq 0 ]; then \
		bash slurm/dev-cluster.sh start; \
	else \
		echo "make cluster: not root, so no local Slurm cluster (slurm/dev-cluster.sh needs root) and no podman: their tests will be skipped"; \
	fi

## slurm/templates/ is the readable copy of the templates shipped in the package (tests/test_packaging.py checks).
templates:
	cp src/tsdia/launch/templates/*.sbatch slurm/templates/

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) tests/shellcheck_scripts.py

typecheck: install
	$(VENV)/bin/mypy

pytest: install cluster
	$(VENV)/bin/pytest -q

## Everything CI runs: lint, types, the whole test suite (starts the local Slurm cluster when root).
test: lint typecheck pytest

## The edit-test loop: no Slurm, no containers, no multi-process runs, no wheel build (tests marked `slow`).
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
