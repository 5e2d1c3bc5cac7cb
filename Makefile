# Two commands do everything on a fresh clone: `make export` and `make test`.
# Both set up .venv first (Python 3.11, the CPU build of torch pinned, miaotui editable with [dev]).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel for development and CI; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MODEL ?= lstm-sentiment

.PHONY: setup export train test clean

setup: $(VENV)/.installed

# `miaotui serve` runs a real Triton server: the tritonserver binary of the nvidia-pytriton wheel
# (with --no-deps: its Python package pins numpy<2 and is never imported), and for its Python
# backend a small environment with numpy<2 (the wheel's stub reads numpy 2 arrays wrongly) holding
# miaotui's runtime: onnxruntime, openvino (the engine choice may take it), tokenizers, miaotui itself
# without dependencies.
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0
STUB_ENV := $(VENV)/triton-python

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(PYTRITON_SPEC)"
	test -x $(STUB_ENV)/bin/python || $(BIN)/python -m venv $(STUB_ENV)
	$(STUB_ENV)/bin/python -m pip install --quiet "numpy<2" onnxruntime openvino tokenizers
	$(STUB_ENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# The main job: export -> optimize -> quantize -> build (the onnxruntime engine, and the TensorRT-RTX
# plan where that library is installed, as it is by [dev]) -> the parity gate on the engine that runs
# here; each stage skipped when up to date. Exit 1 when the gate fails.
export: setup
	$(BIN)/miaotui run $(MODEL)

train: setup
	$(BIN)/python -m miaotui.models.$(subst -,_,$(MODEL)).train

test: setup
	$(BIN)/python -m pytest -q --durations=20

clean:
	rm -rf build
