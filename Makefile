# `make test` and `make train` create .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py pyproject.toml MANIFEST.in $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*)
# The CUDA toolkit root, by the rule the GPU check uses too (tools/cuda_home.py).
CUDA_ROOT ?= $(shell $(PYTHON) tools/cuda_home.py)

.PHONY: all install test train train-full docs bench bench-headline bench-micro check-cuda check-triton check-triton-gpu-stack \
	check-install gpu-static clean

all: test

$(VENV)/.torch-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel ninja
	$(PIP) install $(TORCH)
	touch $@

# --no-build-isolation: build against the torch installed above instead of fetching another one.
$(VENV)/.install-stamp: $(VENV)/.torch-stamp $(SOURCES)
	$(PIP) install -e '.[test,bench,train,docs]' --no-build-isolation
	$(PY) -c "import metaug_fast; print('backends:', metaug_fast.available_backends())"
	touch $@

install: $(VENV)/.install-stamp

# Two pytest workers (pytest-xdist): the suite is mostly single-threaded Python and runs in three quarters
# of the time on 2 cores (tests that compare thread counts set them themselves).
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 tests

# MetAug, its controls and baselines on digits with paired statistics: 5 seeds of 2 epochs in about 9 minutes on
# 2 cores (two runs at a time); train-full runs 10 seeds of 4 epochs, four times the training (not timed here).
train: install
	$(PY) -m metaug_fast.cli.compare --out runs/compare

train-full: install
	$(PY) -m metaug_fast.cli.compare --epochs 4 --seeds 0 1 2 3 4 5 6 7 8 9 --out runs/compare-full

# The documentation site into build/site, strictly: a broken link or anchor, or a docstring the API reference
# cannot parse, fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The CPU suite (every op, backend and baseline over a sweep of sizes, about 4 minutes), the drop-in classes
# against the libraries they replace (about 3 minutes), their charts, and docs/benchmarks.md's tables
# regenerated from every CSV in bench/results/.
bench: install
	$(PY) -m bench.sweep
	$(PY) -m bench.sweep --suite drop_ins
	$(PY) -m bench.plot
	$(PY) -m bench.report

# The headline measurements (about 17 minutes): score mode at B=4096, label mode up to N=65536,
# distributed memory per rank, a 1M-row memory bank, large batches with and without gradient caching.
bench-headline: install
	$(PY) -m bench.bench_oucl_score
	$(PY) -m bench.bench_oucl_label
	$(PY) -m bench.bench_distributed
	$(PY) -m bench.bench_bank
	$(PY) -m bench.bench_large_batch
	$(PY) -m bench.plot
	$(PY) -m bench.report

# pytest-benchmark micro-benchmarks of the hot ops; each run is saved in .benchmarks/ for --benchmark-compare.
bench-micro: install
	$(PY) -m pytest bench/micro --benchmark-only --benchmark-autosave -q

# The package as a user installs it (about 6 minutes): a wheel and an sdist built, each installed into a fresh
# environment and smoke-tested from outside the tree, and an editable install under the oldest setuptools
# that pyproject.toml allows (tools/check_install.py).
check-install: install
	$(PY) -m tools.check_install

# Compiles the CUDA extension (sm_90) into build/check-cuda without installing it: catches CUDA build
# breaks on machines without a GPU. Nothing CUDA runs here.
check-cuda: install
	CUDA_HOME=$(CUDA_ROOT) TORCH_CUDA_ARCH_LIST=9.0 METAUG_BUILD_CUDA=1 METAUG_CUDA_ONLY=1 MAX_JOBS=2 \
		$(PY) setup.py build_ext --build-temp build/check-cuda/tmp --build-lib build/check-cuda/lib
	$(PY) -m tools.check_cuda_load

# Compiles every Triton kernel to sm_90 cubins with Triton's own compiler and ptxas (no GPU needed): catches
# what the interpreter used by the tests cannot.
# sm_90 (H100/H200, what the tiles are tuned for), then the A100's sm_80 and the L4/RTX 40's sm_89 budgets.
check-triton: install
	env -u TRITON_INTERPRET $(PY) -m tools.check_triton_compile
	env -u TRITON_INTERPRET $(PY) -m tools.check_triton_compile --arch 80
	env -u TRITON_INTERPRET $(PY) -m tools.check_triton_compile --arch 89

# check-triton again with the GPU machine's compiler: its torch 2.11.0 brings Triton 3.6.0, here in a venv of
# its own (about 2 minutes and 5 GB the first time; the package without its C++ extension). A kernel that
# compiled without spills under this venv's Triton spilled under 3.6 (see metaug_fast/kernels/label.py, cols_meta).
GPU_STACK      := torch==2.11.0
GPU_STACK_VENV := .venv-gpu-stack

$(GPU_STACK_VENV)/.stamp:
	$(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/pip install --no-cache-dir --upgrade pip "setuptools>=77,<82" wheel
	$(GPU_STACK_VENV)/bin/pip install --no-cache-dir $(GPU_STACK) numpy
	METAUG_NO_EXT=1 $(GPU_STACK_VENV)/bin/pip install --no-cache-dir --no-deps --no-build-isolation -e .
	touch $@

check-triton-gpu-stack: $(GPU_STACK_VENV)/.stamp
	env -u TRITON_INTERPRET $(GPU_STACK_VENV)/bin/python -m tools.check_triton_compile

# Static GPU evidence without a GPU: every Triton kernel and (after check-cuda) every CUDA kernel compiled for
# sm_90 and disassembled into bench/results/gpu_static.csv and its chart.
gpu-static: check-cuda
	env -u TRITON_INTERPRET $(PY) -m tools.gpu_static

clean:
	rm -rf build *.egg-info metaug_fast/*.so
