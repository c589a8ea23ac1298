# Two commands on a fresh machine with Python >= 3.11:
#   make demo   set up .venv and run the pipeline on built-in synthetic sites
#   make test   set up .venv and run the linters and the test-suite (the notebooks run in
#               make docs, which executes every one of them)
#   make test-fast  the same without the whole-pipeline (slow) tests: a few minutes
#   make test-slow  only the whole-pipeline tests and the notebooks
#   make docs   build the documentation site into site/ (notebooks executed; warnings are errors)
#   make lock   re-resolve requirements.lock after a change to pyproject.toml's dependencies
#   make lock-upgrade  the same with every package at the newest release its bounds allow
#   make test-latest  test-fast in a fresh venv with the newest releases the index serves
# setup installs every package from requirements.lock (every role, the test and docs tools,
# the CPU build of PyTorch), then agbcube itself without resolving anything: no upstream
# release can change what a fresh install gets. A machine with one role installs its extra
# instead (docs, "Installing").
# TORCH picks the PyTorch release, the lock's by default; TORCH_INDEX the index of its build
# (PyTorch's cpu or cuXXX index), installed before the rest (docs, "PyTorch builds").
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements.lock
LOCK_TORCH := $(shell sed -n 's/^\(torch==[^ ;]*\).*/\1/p' $(LOCK))
TORCH ?= $(LOCK_TORCH)
TORCH_INDEX ?=
UV ?= uv==0.13.9
LATEST ?= .venv-latest
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-slow test-latest lint lock lock-upgrade docs bench-cube clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep '^pip==' $(LOCK) | cut -d' ' -f1)"
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX) "$(TORCH)")
	$(BIN)/python -m pip install --quiet "$(TORCH)" -r $(VENV)/lock-without-torch.txt
	$(BIN)/python tools/lock.py --check
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

demo: setup
	$(BIN)/agbcube demo --output demo-output

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest -q -m "not notebook" --durations=15

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow or notebook" --durations=10

# The lock is resolved by uv in a venv of its own (.venv-lock), pinned like everything else.
lock lock-upgrade:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && \
		.venv-lock/bin/python -m pip install --quiet "$(UV)" packaging)
	.venv-lock/bin/python tools/lock.py --uv .venv-lock/bin/uv $(if $(filter lock-upgrade,$@),--upgrade)

# Not part of CI: does agbcube still pass with the newest releases? A failure here is an early
# warning to fix agbcube or bound the release (docs/development.md), never a broken install.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[all,test,docs]"
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	touch $(LATEST)/.installed
	$(MAKE) test-fast VENV=$(LATEST)

# The two variables silence banners about MkDocs 2 that Material and a plugin print. The
# notebooks write their demo data under TMPDIR: a folder of the build's, removed after it.
docs: setup
	tmp=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true TMPDIR=$$tmp \
		$(BIN)/mkdocs build --strict --site-dir site; status=$$?; rm -rf "$$tmp"; exit $$status

bench-cube: setup
	$(BIN)/python bench/build_cube.py

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock demo-output cubes runs site .pytest_cache .ruff_cache
