# The two commands of README.md. Each sets up everything it needs from nothing:
#   make bench   the main job: the benchmark suite (CSV + plots under benchmarks/results/),
#                then the end-to-end demo (train a tiny LLaDA on CPU, sample every way)
#   make test    the test suite (C++ CPU kernels, Triton interpreter, ahead-of-time compiles, CMake)
# Variables: PYTHON (python3.11+), LLADA_CUDA_ARCHS (default "8.0;9.0+PTX"), LLADA_NO_CUDA=1,
# MAX_JOBS (parallel compile jobs, default: the core count).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test bench install clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Always re-run: ninja rebuilds only what changed.
install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation -e .

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/run.py
	$(VENV)/bin/llada-kernels demo

clean:
	rm -rf build build-cmake *.egg-info llada_kernels/_C*.so
