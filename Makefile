# Both targets are idempotent: they create .venv if missing and (re)install flatlab into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PIP) install -q -c constraints.txt -e '.[dev,bench]'

demo: install
	$(VENV)/bin/flatlab demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

.PHONY: install demo test lint
