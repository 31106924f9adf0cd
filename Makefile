# One entry point for people and CI. `make test` and `make bench` work on a fresh machine: they create the
# virtual environment, install the dependencies, build the extension (CUDA sources too when a toolkit is
# found) and then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
EXT_STAMP := $(VENV)/.ext-stamp
ENV_STAMP := $(VENV)/.env-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help env build docs test test-cuda bench gpu-wheels wheel wheel-check lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(ENV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch>=2.4" ninja "setuptools>=69" wheel
	FINETUNE_EXT_SKIP_BUILD=1 $(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

env: $(ENV_STAMP)  ## create .venv with the package (editable, kernels not yet built: see build) and its dependencies

$(EXT_STAMP): $(ENV_STAMP) $(CSRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(EXT_STAMP)  ## (re)build the compiled kernels in place (ninja, incremental)

docs: env  ## the API reference from the docstrings into site/ (mkdocs, warnings are errors)
	$(PY) -m mkdocs build --strict -q

test: build docs  ## the docs build, then the test suite with the import contract (GPU tests skip without a GPU)
	$(PY) -m pytest $(PYTEST_ARGS)

test-cuda: build  ## run only the GPU tests
	$(PY) -m pytest -m cuda $(PYTEST_ARGS)

bench: build  ## op and step benchmarks on the default device: table, CSV and PNG in bench-out/
	$(PY) benchmarks/bench.py --out bench-out $(BENCH_ARGS)

gpu-wheels: env  ## wheels the lent GPU's image lacks (highspy, Python 3.12) and the trainer benchmark's data into .whl/, for benchmarks/gpu_run.sh
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl "highspy==$$($(PY) -c 'import importlib.metadata as m; print(m.version("highspy"))')"
	mkdir -p .whl/data && cp -r ../shared/data/gpt2-tokenizer ../shared/data/SST-2 ../shared/data/wikitext-2 .whl/data/ && chmod -R u+w .whl/data

wheel: env  ## build a wheel (CPU + CUDA kernels, setup.py's arch list) into dist/, against .venv's torch
	rm -f dist/finetune_ext-*.whl
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	@ls dist/finetune_ext-*.whl

WHEEL_VENV := $(abspath build/wheel-check-venv)
wheel-check:  ## install dist/'s wheel into a fresh venv (not editable, outside the tree) and run every op once
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q $(abspath $(firstword $(wildcard dist/finetune_ext-*.whl)))
	cd $$(mktemp -d) && env -u PYTHONPATH $(WHEEL_VENV)/bin/python -c \
		"import finetune_ext; print('imported from', finetune_ext.__file__)"
	cd $$(mktemp -d) && env -u PYTHONPATH $(WHEEL_VENV)/bin/finetune-ext info --check

lint: env  ## ruff and clang-format checks
	$(PY) -m ruff check finetune_ext tests benchmarks setup.py
	$(PY) -m ruff format --check finetune_ext tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

format: env  ## apply ruff and clang-format
	$(PY) -m ruff check --fix finetune_ext tests benchmarks setup.py
	$(PY) -m ruff format finetune_ext tests benchmarks setup.py
	$(VENV)/bin/clang-format -i $(CSRC)

clean:  ## remove build outputs (keeps .venv)
	rm -rf build dist site *.egg-info finetune_ext/_C*.so finetune_ext/_build_meta.py $(EXT_STAMP)
