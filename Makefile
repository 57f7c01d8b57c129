# Two entry points for a fresh machine; each makes its own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

## FedAvg vs LIPS on MNIST-1D (offline) on a local Ray, printed side by side (5-16 min on 2 CPUs).
demo: $(STAMP)
	$(BIN)/ray-lips compare sweeps/demo.yaml

## The whole test suite, slow end-to-end tests included.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## Without the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## ruff only.
lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
