# `make demo` and `make test` are the two commands that do everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One C++ extension cache for every DeepSpeed use (the first JIT build takes ~45 s).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_SILENT ?= true

.PHONY: demo test test-fast bench lint format clean venv gpu-check docs

venv: $(STAMP)

# Rebuilt when missing or when the dependency files change ("stale"); otherwise a no-op.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/roundhouse train configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu and not slow" -q

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# The user guide (mkdocs-material) into site/; --strict: a broken link or anchor fails it. The CLI
# and job-schema references are generated from the code by docs/hooks.py at build time.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# On a CUDA machine, with any python that has torch (no .venv): `make gpu-check PY=python3`.
gpu-check:
	scripts/gpu_check.sh $(or $(PY),$(BIN)/python)

lint: $(STAMP)
	$(BIN)/ruff check roundhouse tests benchmarks
	$(BIN)/ruff format --check roundhouse tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_architecture.py -k "cycle or kind"

format: $(STAMP)
	$(BIN)/ruff format roundhouse tests benchmarks
	$(BIN)/ruff check --fix roundhouse tests benchmarks

clean:
	rm -rf $(VENV) .cache runs .pytest_cache site
