# Two commands on a fresh machine with Python >= 3.11:
#   make demo   set up .venv and run the pipeline on built-in synthetic sites
#   make test   set up .venv and run the linters and the test-suite
#   make test-fast  the same without the whole-pipeline (slow) tests: a few minutes
# TORCH picks the PyTorch build; the default is the CPU build (see README, "Installing torch").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench-cube clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/agbcube demo --output demo-output

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

bench-cube: setup
	$(BIN)/python bench/build_cube.py

clean:
	rm -rf $(VENV) demo-output cubes runs .pytest_cache .ruff_cache
