# fer_lightning: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MLFLOW_DB := sqlite:///$(CURDIR)/mlruns/mlflow.db
HOST ?= 127.0.0.1
PORT ?= 5000
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-system train test test-fast lint format ui mlflow-server explore eval report predict export bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  pass options to a command with ARGS='...', e.g. make train ARGS='sampling=upsample loss=focal'"

install: $(STAMP) ## build .venv and install the package (editable) with dev extras

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch first, from the pinned local wheels where they exist; pyproject asks only for ranges
	$(BIN)/pip install "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

train: install ## train the default experiment on the synthetic data, logged to MLflow
	$(BIN)/fer-train $(ARGS)

eval: install ## evaluate a checkpoint on a test split: make eval ARGS='ckpt_path=outputs/train/.../last.ckpt'
	$(BIN)/fer-eval $(ARGS)

report: install ## leaderboard of MLflow runs (markdown, CSV, plot) beside the AffectNet baselines
	$(BIN)/fer-report $(ARGS)

explore: install ## data-exploration report (HTML + PNGs, MLflow run_type=explore): make explore ARGS='data=legend_csv data.root=...'
	$(BIN)/fer-explore $(ARGS)

predict: install ## CSV of expressions + valence/arousal for images: make predict ARGS='ckpt_path=... input=photos/ detect_faces=true'
	$(BIN)/fer-predict $(ARGS)

export: install ## ONNX/TorchScript with normalization inside + parity check: make export ARGS='ckpt_path=... format=onnx'
	$(BIN)/fer-export $(ARGS)

bench: install ## speed vs the naive way, side by side (a few minutes): bench-results/latest.json + .md
	$(BIN)/fer-bench $(ARGS)

install-system: ## system packages for the tests: headless Chromium (renders the explore report); Debian/Ubuntu
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends chromium; }

test: install ## run the whole test suite (about 11 min on 2 cores; gpu-marked tests are left out)
	$(BIN)/pytest $(ARGS)

test-fast: install ## the suite without the tests marked slow (about 8.5 min on 2 cores)
	$(BIN)/pytest -m "not slow and not gpu" $(ARGS)

lint: install ## ruff
	$(BIN)/ruff check fer_lightning tests
	$(BIN)/ruff format --check fer_lightning tests

format: install ## ruff format + autofix
	$(BIN)/ruff check --fix fer_lightning tests
	$(BIN)/ruff format fer_lightning tests

ui: install ## MLflow UI on 127.0.0.1 over this project's store
	@mkdir -p mlruns
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_DB) --default-artifact-root $(CURDIR)/mlruns/artifacts --host $(HOST) --port $(PORT)

mlflow-server: install ## MLflow tracking server on 127.0.0.1:PORT (5000), SQLite + served artifacts in mlruns/; runs go there with MLFLOW_TRACKING_URI=http://127.0.0.1:5000
	@mkdir -p mlruns/served-artifacts
	$(BIN)/mlflow server --host $(HOST) --port $(PORT) --backend-store-uri $(MLFLOW_DB) --artifacts-destination $(CURDIR)/mlruns/served-artifacts

clean: ## remove caches and outputs (keeps mlruns/ and .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
