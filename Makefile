# ckpt_wrapper: the two commands.
#   make demo   set up, then train a GPT-style model on 2 ranks (torchrun, FSDP2, checkpointing)
#   make test   set up, then run the test suite
#   make wheel-check   build a wheel, install it with torch into a fresh venv, smoke-test it outside the repo
#   make gpu-check   on a CUDA machine: CUDA tests, NCCL parity, benchmarks, planner peak; gpu-results/ summary
# Overrides: PYTHON (interpreter that creates the venv), VENV (an existing venv with your own torch
# is used as is), TORCH_SPEC (what to install when the venv has no torch), ARGS (demo flags),
# PYTEST_ARGS (pytest flags).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: setup demo test bench gpu-check wheel-check clean

$(VENV)/.ckpt_wrapper-ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.ckpt_wrapper-ready

demo: setup
	PYTHON=$(PY) bash scripts/launch/run.sh $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/bench/overhead.py $(ARGS)

gpu-check: setup
	$(PY) scripts/gpu_check.py $(ARGS)

wheel-check:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/check_wheel.sh

clean:
	rm -rf $(VENV) build *.egg-info bench-results gpu-results
