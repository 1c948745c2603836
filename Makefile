# `make test` and `make train` create .venv from nothing when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)

.PHONY: all install test train bench clean

all: test

$(VENV)/.torch-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel ninja
	$(PIP) install $(TORCH)
	touch $@

# --no-build-isolation: build against the torch installed above instead of fetching another one.
$(VENV)/.install-stamp: $(VENV)/.torch-stamp $(SOURCES)
	$(PIP) install -e '.[test,bench,train]' --no-build-isolation
	$(PY) -c "import metaug_fast; print('backends:', metaug_fast.available_backends())"
	touch $@

install: $(VENV)/.install-stamp

test: install
	$(PY) -m pytest -q tests

train: install
	$(PY) -m metaug_fast.compare --quiet

bench: install
	$(PY) -m bench.bench_oucl_score

clean:
	rm -rf build *.egg-info metaug_fast/*.so
