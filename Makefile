# The project's verbs. `make demo` and `make test` work on a fresh clone: they create
# .venv, install what is missing, build the extension and run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only machine installs this version as a CPU build; a GPU machine keeps its own
# torch (the venv sees system site-packages, and torch is only installed when missing).
TORCH_VERSION ?= 2.13.0
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
CU_SOURCES := $(shell find csrc -name '*.cu' 2>/dev/null)
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?=

.PHONY: setup build demo test test-gpu bench lint format cuda-check kernel-check clean

$(INSTALLED): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --upgrade "setuptools>=77" wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	@touch $(INSTALLED) $(BUILT)

setup: $(INSTALLED)

# Rebuild the extension in place when a C++/CUDA source changes.
$(BUILT): $(INSTALLED) $(CSRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	@touch $(BUILT)

build: $(BUILT)

# Compile-check every CUDA source for the GPUs we target, where nvcc exists (CI has it).
# The .cu files include only CUDA headers, so this works without a CUDA torch.
cuda-check:
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	  tmp=$$(mktemp -d); \
	  for f in $(CU_SOURCES); do for a in $(CUDA_ARCHS); do \
	    echo "nvcc -c sm_$$a $$f"; \
	    $(NVCC) -c -std=c++20 -O3 -arch=sm_$$a -Icsrc $$f -o $$tmp/$$(basename $$f).sm$$a.o || exit 1; \
	  done; done; rm -rf $$tmp; \
	else echo "nvcc not found: CUDA sources not compile-checked"; fi

# Compile every Triton kernel configuration the launchers can select, and every CUDA
# kernel (nvcc -Xptxas -v, where nvcc exists), for sm_90 and sm_80 without a GPU; fail on
# a compile error, a register spill, shared memory no config fits, or a GEMM that misses
# the tensor cores. Results are cached in ~/.cache/fastrlhf/ (only changes recompile).
kernel-check: $(INSTALLED)
	$(PY) -m bench.kernel_check

# --overwrite: the demo owns runs/demo and reruns it from scratch (a fresh run otherwise
# refuses a non-empty run dir)
demo: build
	$(PY) -m fastrlhf demo --overwrite

test: build cuda-check kernel-check
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-gpu: build
	$(PY) -m pytest tests -m gpu $(PYTEST_ARGS)

bench: build
	@set -e; for f in bench/bench_*.py; do \
	  echo "== $$f"; $(PY) -m bench.$$(basename $$f .py); done

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(INSTALLED)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build *.egg-info fastrlhf/_C*.so $(BUILT)
