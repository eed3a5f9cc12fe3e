# Every target installs what it needs into .venv first: torch==2.13.0 (the CPU wheel) BEFORE the
# package, so pip never resolves an open torch requirement to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .[dev,hf]
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dattri_fn.app.cli demo

test: $(STAMP)
	$(PY) -m ruff check dattri_fn tests benchmarks notebooks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.primitives

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis out
