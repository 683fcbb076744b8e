# Makefile of the AI Chat Service: one word for each thing a developer or CI does.
# `make` alone lists the targets. Recipes assume a project path without spaces.

# The interpreter the virtualenv is built from: python3.11 (the version we ship in
# Docker) when installed, else whatever python3 is. Override: make PYTHON=/path/python.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV ?= .venv
PYTEST_ARGS ?=
BENCH_ARGS ?=

# abspath: `run` changes PATH for a script that cds elsewhere, so the venv path must
# not be relative (and VENV may be given as an absolute path).
VENV_BIN := $(abspath $(VENV))/bin
PIP := $(VENV)/bin/python -m pip --disable-pip-version-check -q

# Stamp files record "this venv has these requirements": pip runs again only when
# a requirements file is newer than its stamp, so `make test` stays instant.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.DEFAULT_GOAL := help
.PHONY: help venv run test lint bench clean

help: ## List the targets
	@echo "Targets:"
	@grep -E '^[a-z]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-6s %s\n", $$1, $$2}'
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) PYTEST_ARGS=... BENCH_ARGS=..."

venv: $(RUN_STAMP) ## Create the virtualenv and install the runtime requirements

run: $(RUN_STAMP) ## Apply migrations and serve with gunicorn (reads .env)
	PATH="$(VENV_BIN):$$PATH" exec ./deploy/boot.sh

test: $(DEV_STAMP) ## Run the test suite (PYTEST_ARGS=... passes options to pytest)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(DEV_STAMP) ## Check the code with ruff
	$(VENV)/bin/ruff check .

bench: $(DEV_STAMP) ## Run the load benchmark (BENCH_ARGS=... passes options)
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

clean: ## Remove the virtualenv, caches and var/ (the SQLite database!)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis var
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Order-only: a venv whose python is newer than the stamp must not force a reinstall.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): requirements.txt | $(VENV)/bin/python
	$(PIP) install -r requirements.txt
	touch $@

# requirements-dev.txt includes requirements.txt, so a change to either reinstalls.
$(DEV_STAMP): requirements-dev.txt requirements.txt | $(VENV)/bin/python
	$(PIP) install -r requirements-dev.txt
	touch $@
