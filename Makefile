# The two commands of the README: `make example` and `make test`. Both install what they need and are idempotent.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU build by default (a local wheel on these machines); on a GPU cluster use e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
EXAMPLE_DIR ?= runs/example

.PHONY: install example test lint typecheck pytest cluster clean

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

cluster:
	bash slurm/dev-cluster.sh start

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: install
	$(VENV)/bin/mypy

pytest: install cluster
	$(VENV)/bin/pytest -q

## Everything CI runs: lint, types, the whole test suite (starts the local Slurm cluster).
test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
