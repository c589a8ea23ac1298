# Two commands on a fresh machine with Python >= 3.11:
#   make demo   set up .venv and run the pipeline on built-in synthetic sites
#   make test   set up .venv and run the linters and the test-suite
#   make test-fast  the same without the whole-pipeline (slow) tests: a few minutes
#   make docs   build the documentation site into site/ (notebooks executed; warnings are errors)
# setup installs every role and the test and docs tools (.[all,test,docs]); a machine with one
# role installs its extra instead (docs, "Installing").
# TORCH picks the PyTorch build; the default is the CPU build (docs, "Installing").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint docs bench-cube clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[all,test,docs]"
	touch $@

demo: setup
	$(BIN)/agbcube demo --output demo-output

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q --durations=15

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

# The two variables silence banners about MkDocs 2 that Material and a plugin print. The
# notebooks write their demo data under TMPDIR: a folder of the build's, removed after it.
docs: setup
	tmp=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true TMPDIR=$$tmp \
		$(BIN)/mkdocs build --strict --site-dir site; status=$$?; rm -rf "$$tmp"; exit $$status

bench-cube: setup
	$(BIN)/python bench/build_cube.py

clean:
	rm -rf $(VENV) demo-output cubes runs site .pytest_cache .ruff_cache
