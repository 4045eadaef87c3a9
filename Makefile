# Two commands do everything on a fresh machine:
#   make run    set up and start the service on embedded defaults (SQLite, ./data, the local studio)
#   make test   set up and run every test (installs or finds PostgreSQL 15 and PostgREST for the integration tests)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: run test worker lint bench setup setup-dev test-deps clean

$(VENV)/.python-ok:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "Python 3.11 or newer is needed (found: $$($(PYTHON) --version 2>&1)). Set PYTHON=python3.12 or similar."; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create a virtualenv: install python3-venv."; exit 1; }
	@$(PY) -m pip install -q --upgrade pip
	@touch $@

$(VENV)/.runtime: $(VENV)/.python-ok requirements.txt
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

run: setup
	$(VENV)/bin/uvicorn main:create_app --factory --host $(HOST) --port $(PORT)

worker: setup
	$(PY) worker.py

test-deps:
	@bash scripts/test-deps.sh

test: setup-dev test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

bench: setup-dev
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
