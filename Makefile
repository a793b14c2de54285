# ckpt_wrapper: the two commands.
#   make demo   set up, then train a GPT-style model on 2 ranks (torchrun, FSDP2, checkpointing)
#   make test   set up, then run the test suite
#   make wheel-check   build a wheel, install it with torch into a fresh venv, smoke-test it outside the repo
#   make gpu-check   on a CUDA machine: CUDA tests, NCCL parity, benchmarks, planner peak; gpu-results/ summary
# Overrides: PYTHON (interpreter that creates the venv), VENV (an existing venv with your own torch
# is used as is), TORCH_SPEC (what to install when the venv has no torch), TORCHTITAN_SPEC and TRITON_SPEC (the
# torchtitan integration's packages, installed with --no-deps), REMAT_SPEC (the bench's torch_remat anchor, --no-deps), ARGS (demo flags),
# PYTEST_ARGS (pytest flags).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# torchtitan is installed without its declared dependencies (pyproject.toml, the integrations extra, says why);
# triton only when torch did not bring one.
TORCHTITAN_SPEC ?= torchtitan==0.3.0
TRITON_SPEC ?= triton==3.9.0
# torch_remat, an anchor of ckpt-wrapper bench (the anchors extra), needs only torch (>= 2.10): --no-deps keeps your torch.
REMAT_SPEC ?= torch_remat==0.2.2
ARGS ?=
PYTEST_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: setup demo test bench gpu-check wheel-check clean

$(VENV)/.ckpt_wrapper-ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,integrations]"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install --no-deps "$(TRITON_SPEC)"
	$(PY) -m pip install --no-deps "$(TORCHTITAN_SPEC)"
	$(PY) -m pip install --no-deps "$(REMAT_SPEC)"
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
