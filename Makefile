# The two commands of the README: `make demo` and `make test`. Each does its own set-up first:
# a virtualenv in .venv/ with the pinned lock (torch 2.13.0 CPU, no torchvision), then the project.
# Where pip would fetch PyPI's CUDA build of torch (plain Linux), add TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A pip index for torch alone, e.g. PyTorch's CPU wheels https://download.pytorch.org/whl/cpu. Empty (the
# default): torch comes from pip's own configuration like everything else, so set-up here stays offline.
TORCH_INDEX_URL ?=

# Nothing may reach the network at run time.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export AWS_EC2_METADATA_DISABLED := true

.PHONY: setup demo test test-ui ui bank benchmarks clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --index-url $(TORCH_INDEX_URL) "$$(grep -E '^torch==' requirements.lock)")
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@! $(BIN)/pip show torchvision >/dev/null 2>&1 || { echo "torchvision must not be installed"; exit 1; }
	touch $(STAMP)

setup: $(STAMP)

## The main job on the embedded default, as `dvc repro` (the stages of dvc.yaml, the path users repro):
## pull the demo bank (offline, from the remote committed in dvc-storage/), validate it, roll out its
## teachers, distil them into one LoRA, build the baselines (FM all-in-1, PEFT merges), evaluate every
## method, register the student in MLflow; then print the methods table, the gate and the registry.
## Re-running after an interruption resumes (rollouts are cached, distill --auto-resume continues from
## its last checkpoint); re-running after success is a no-op.
demo: export PATH := $(CURDIR)/$(BIN):$(PATH)
demo: setup
	$(BIN)/dvc pull --quiet data.dvc
	$(BIN)/dvc repro
	@echo; cat artifacts/eval/methods.md; echo
	@$(BIN)/python -c 'import json; g = json.load(open("artifacts/eval/gate.json")); print("gate:", "PASSED" if g["passed"] else "FAILED"); [print("  [ok]  " if c["passed"] else "  [FAIL]", c["detail"]) for c in g["checks"]]'
	@echo; $(BIN)/collectionlora registry show
	@echo; echo "Open the MLflow UI: make ui"

test: setup
	$(BIN)/pytest -q

## The browser test of the registry UI alone, with headless Chromium required (no skip when it is missing).
test-ui: setup
	COLLECTIONLORA_REQUIRE_BROWSER=1 $(BIN)/pytest -q -m ui

## The MLflow UI on the local tracking store (artifacts/mlflow/): 127.0.0.1, port $COLLECTIONLORA_UI_PORT (default 5000).
ui: setup
	$(BIN)/collectionlora ui

## Rebuild the demo bank from scratch (about an hour on 2 cores), then track and push it.
bank: setup
	$(BIN)/collectionlora demo-bank build --out data
	$(BIN)/dvc add data
	$(BIN)/dvc push data.dvc

benchmarks: setup
	for bench in benchmarks/bench_*.py; do $(BIN)/python $$bench || exit 1; done

clean:
	rm -rf artifacts .pytest_cache
