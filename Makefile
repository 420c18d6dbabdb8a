# One-command set-up: `make demo` and `make test` create .venv, install the pinned stack, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
JAX2ONNX := $(shell sed -n 's/^jax2onnx==//p' constraints.txt)

.PHONY: install notebooks demo test test-fast lint clean

# The library alone (what `make demo` needs), then the test extra (torch, psycopg, pytest ...)
# and the deploy extra (ONNX, ONNX Runtime, OpenVINO, jax2onnx).
BASE_STAMP := $(VENV)/.installed-base-stamp

$(BASE_STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required, found " + sys.version.split()[0]'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	@touch $(BASE_STAMP)

# jax2onnx without its dependency resolution: constraints.txt says why.
$(STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,deploy]'
	$(BIN)/python -m pip install -q --no-deps jax2onnx==$(JAX2ONNX)
	@touch $(STAMP)

install: $(STAMP)

# Runs notebooks/*.ipynb at their full settings and writes the outputs into them (notebooks/execute.py).
notebooks: install
	$(BIN)/python notebooks/execute.py

demo: $(BASE_STAMP)
	$(BIN)/jaxopt-lab train --config configs/mnist1d_cnn.py --workdir runs/demo

test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10 tests

lint: install
	$(BIN)/ruff check jaxopt_lab tests experiments benchmarks configs examples

clean:
	rm -rf $(VENV) runs
