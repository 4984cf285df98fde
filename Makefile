# LatentForge. `make help` lists the targets. Every target creates the virtual environment
# first (once), so `make run` and `make test` work on a fresh clone with only Python 3.11.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PY := $(BIN)/python
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help venv run test test-all lint ui serve bench clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-9s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Create .venv and install LatentForge with its dev tools

# torch first, pinned: on the CPU machines that run CI this takes the CPU wheel kept on the
# local disk; elsewhere the registry's default (CUDA) build. The constraints file pins the
# whole resolved set so installs are fast and reproducible; `pip check` keeps it honest.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	$(PY) -m pip check
	@touch $@

run: venv ## Run the whole pipeline on the embedded digits (DVC skips what is up to date)
	@[ -d .dvc ] || dvc init -q
	latentforge run

test: venv ## Run the fast tests (not slow, not gpu)
	$(PY) -m pytest -q

test-all: venv ## Run every CPU test, slow ones included
	$(PY) -m pytest -q -m "not gpu"

lint: venv ## ruff lint + format check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true
	$(BIN)/mypy latentforge tasks flows models || true

ui: venv ## Start a local Prefect server (UI on http://127.0.0.1:4200); then `make serve`
	prefect server start

serve: venv ## Serve the pipeline and stage deployments to the Prefect server (Run buttons)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} latentforge serve

bench: venv ## Run the benchmarks in bench/ (they print measured numbers)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean: ## Remove run state and tracking stores (not the DVC cache)
	rm -rf .latentforge mlflow.db mlartifacts
