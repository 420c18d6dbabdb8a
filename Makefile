# One-command set-up: `make demo` and `make test` create .venv, install the pinned stack, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast lint clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required, found " + sys.version.split()[0]'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/jaxopt-lab train --config configs/mnist1d_cnn.py --workdir runs/demo

test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10 tests

lint: install
	$(BIN)/ruff check jaxopt_lab tests experiments benchmarks configs

clean:
	rm -rf $(VENV) runs
