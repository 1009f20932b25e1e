# The two commands of README.md. Each sets up everything it needs from nothing:
#   make bench   the main job: the benchmark suite (CSV + plots under benchmarks/results/),
#                then the end-to-end demo (train a tiny LLaDA on CPU, sample every way)
#   make test    the test suite (C++ CPU kernels, Triton interpreter, ahead-of-time compiles, CMake)
# And CI's other runs:
#   make test-diffusers  the block sampler's parity tests against diffusers >= 0.42 (and the
#                transformers 5.x it needs) in .venv-diffusers, which holds only those two
#                (requirements-diffusers.txt) and sees the rest of .venv through a .pth line
#   make test-oldest   the oldest supported torch and Triton (requirements-oldest.txt) in
#                .venv-oldest: the C++ CPU kernels built against that torch, in a copy of the
#                tree (build-oldest/src, so the in-place build of `make test` stays), then the
#                CPU tests, the Triton interpreter tests and the ahead-of-time compiles
#                (OLDEST_SKIP below)
# Variables: PYTHON (python3.11+), LLADA_CUDA_ARCHS (default "8.0;9.0+PTX"), LLADA_NO_CUDA=1,
# MAX_JOBS (parallel compile jobs, default: the core count), PYTEST_ARGS (extra pytest arguments
# of test-oldest).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OLDEST_VENV ?= .venv-oldest
OLDEST_PY   := $(abspath $(OLDEST_VENV))/bin/python
OLDEST_SRC  := build-oldest/src
DIFFUSERS_VENV ?= .venv-diffusers
DIFFUSERS_PY   := $(DIFFUSERS_VENV)/bin/python
# What the oldest run leaves out (about half the suite's time): the demo (a training run), the
# CMake build (setup.py's build is the one tested against this torch), the CUDA kernels on the
# host emulation (their device code does not depend on torch; the newest run has them): the
# test_cuda_host*.py files and the contract table's "cuda-emu" rows, whose emulation library
# alone takes about 3 minutes to build on 2 cores, and the three statistical sampling tests of
# the Triton kernels under the interpreter (their numerics are the newest run's; the oldest run
# still runs every other Triton test, sampling included). Measured 2026-12-02 on the 2-core
# AMD EPYC (Zen 5, AVX-512) shared with other builds: 2.3 min to build, 12.4 min of tests
# before the cuda-emu rows were left out (7.6 min after), the index's torch install not counted.
OLDEST_SKIP := --ignore=tests/test_demo.py --ignore=tests/test_cuda_host.py \
	--ignore=tests/test_cuda_host_layer.py \
	--deselect tests/test_build.py::test_cmake_build_loads_the_same_ops \
	-k "not (triton and (random_remasking_picks_uniformly or sampling_frequencies_match_softmax)) \
	and not cuda-emu"

.PHONY: test bench install clean test-oldest test-diffusers

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

$(OLDEST_VENV)/.deps: requirements.txt requirements-oldest.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	sed -E '/^torch([<>=!~ ]|$$)/d' requirements.txt > $(OLDEST_VENV)/requirements-rest.txt
	$(OLDEST_VENV)/bin/python -m pip install -q -r requirements-oldest.txt \
		-r $(OLDEST_VENV)/requirements-rest.txt
	touch $@

test-oldest: $(OLDEST_VENV)/.deps
	mkdir -p $(OLDEST_SRC)
	find $(OLDEST_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +  # keep ninja's objects
	tar -cf - --exclude=./.git --exclude='./.venv*' --exclude='./build*' --exclude='*.so' \
		--exclude=./benchmarks/results . | tar -xf - -C $(OLDEST_SRC)
	cd $(OLDEST_SRC) && LLADA_NO_CUDA=1 $(OLDEST_PY) setup.py build_ext --inplace -q
	cd $(OLDEST_SRC) && $(OLDEST_PY) -c "import torch, triton, llada_kernels as lk; \
		print('oldest run: torch', torch.__version__, 'triton', triton.__version__, lk.__file__)"
	cd $(OLDEST_SRC) && LLADA_EXPECT_CUDA=0 $(OLDEST_PY) -m pytest $(OLDEST_SKIP) $(PYTEST_ARGS)

clean:
	rm -rf build build-cmake build-oldest *.egg-info llada_kernels/_C*.so

$(DIFFUSERS_VENV)/.deps: requirements-diffusers.txt $(VENV)/.deps
	$(PYTHON) -m venv $(DIFFUSERS_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(DIFFUSERS_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_llada_venv.pth"
	$(DIFFUSERS_PY) -m pip install -q -r requirements-diffusers.txt
	touch $@

test-diffusers: install $(DIFFUSERS_VENV)/.deps
	$(DIFFUSERS_PY) -c "import diffusers, transformers, torch; print('diffusers run: diffusers', \
		diffusers.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	$(DIFFUSERS_PY) -m pytest -p no:cacheprovider tests/test_block_generate_diffusers.py
