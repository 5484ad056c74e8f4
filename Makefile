# The two README commands: `make run` (set up, verify, benchmark) and `make test` (set up, test).
# Both are idempotent: set-up steps rerun only when their inputs change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RESULTS ?= results
CUDA_HOME ?= $(shell test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda)
MAX_JOBS ?= 2
PYTEST_ARGS ?=
export CUDA_HOME MAX_JOBS

.PHONY: setup run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(VENV)/.deps: $(BIN)/python requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	mkdir -p $(RESULTS)
	$(BIN)/llm-kernels info
	$(BIN)/llm-kernels verify --json $(RESULTS)/verify.json
	$(BIN)/llm-kernels bench --quick --csv $(RESULTS)/bench.csv --json $(RESULTS)/bench.json --plot $(RESULTS)
	@echo "results: $(RESULTS)/verify.json, $(RESULTS)/bench.csv, $(RESULTS)/bench.json and plots in $(RESULTS)/"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info llm_kernels/_C*.so llm_kernels/_build_info.json $(RESULTS)
