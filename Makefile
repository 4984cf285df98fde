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
.PHONY: help venv run test test-all test-kernels test-infra lint ui serve bench clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

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

# The tests whose numbers come from CPU kernels. Other CPUs pick other kernels (blocking, and
# with it summation order); forcing other instruction sets here shows whether a test relies
# on one machine's rounding.
KERNEL_TESTS := $(addprefix tests/test_,models_tokenizer.py models_generator.py models_judge.py layers.py \
	metrics.py stages.py flow.py rl.py generator_stage.py cache.py training.py model_folders.py \
	evaluate.py posttrain.py tokens.py intervals.py equal_count.py)

test-kernels: venv ## The model, metric and stage tests under two forced CPU kernel settings
	ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q $(KERNEL_TESTS)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_CBWR=COMPATIBLE \
		$(PY) -m pytest -q $(KERNEL_TESTS)

test-infra: venv ## Slow: 2-node Ray cluster (root), Prefect worker and UI, S3 end to end, experiments, signals, the background Prefect server
	$(PY) -m pytest -q -m "slow and not gpu" tests/test_cluster.py tests/test_prefect_worker.py \
		tests/test_s3_end_to_end.py tests/test_storage_failures.py tests/test_experiment.py \
		tests/test_browser.py tests/test_concurrent_deployments.py tests/test_ui.py \
		tests/test_pipeline.py tests/test_signals.py tests/test_prefect_background.py

# Both can fail the build. (The code keeps its own wrapping, not `ruff format`'s, so there is
# no format check: one that cannot fail says nothing.)
lint: venv ## ruff lint, mypy (both must pass; CI runs them)
	$(BIN)/ruff check .
	$(BIN)/mypy latentforge tasks flows models

ui: venv ## Prefect UI (the background server) + deployments + MLflow UI on 127.0.0.1
	$(PY) -m latentforge ui

serve: venv ## Serve the pipeline and stage deployments to the Prefect server (Run buttons)
	$(PY) -m latentforge serve

bench: venv ## Run the benchmarks in bench/ (they print measured numbers)
	@for b in $(filter-out bench/sampling_quality.py,$(wildcard bench/*.py)); do \
		echo "== $$b"; $(PY) $$b || exit 1; done
	@# sampling_quality.py grades the workspace's own generator: after `make run`.
	@if [ -d artifacts/generator ]; then echo "== bench/sampling_quality.py"; \
		$(PY) bench/sampling_quality.py; \
	else echo "== bench/sampling_quality.py: skipped, no artifacts/generator (make run first)"; fi

clean: ## Remove run state and tracking stores (not the DVC cache)
	rm -rf .latentforge mlflow.db mlartifacts
