# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make pipeline   set up .venv and run the whole DVC pipeline (dvc repro)
#   make test       set up .venv and run Ruff and the tests
# `make help` lists the rest.

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The stages' commands (mnist-pipeline, ...) live in the virtual environment: put it on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup postgres chromium iproute pipeline test test-slow lint format ui benchmark clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# DVC's plot pages load vega from a CDN, blank offline: make it use a template with the libraries
# inline (git-ignored, machine-local: .dvc/config.local; DVC reads the path from .dvc/).
PLOTS_PAGE := .dvc/tmp/offline-plots.html

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e . --group dev
	$(PY) -m mnist_pipeline.plots_page $(PLOTS_PAGE)
	$(BIN)/dvc config --local plots.html_template $(PLOTS_PAGE:.dvc/%=%)
	touch $(STAMP)

setup: $(STAMP) ## create .venv with the project and its dev tools

# tests/test_team.py starts a PostgreSQL server of its own (initdb in a temporary folder): it needs
# Debian's server programs (/usr/lib/postgresql/<version>/bin); it makes the team server's
# certificate with `openssl` and its accounts with `curl`, as docs/team.md does. Installed as root
# or with password-less sudo; otherwise those tests are skipped (and fail under CI=true).
postgres: ## install Debian's PostgreSQL server programs, openssl and curl if they are missing
	@missing=""; \
	if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then missing="postgresql"; fi; \
	for tool in openssl curl; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  echo "installing Debian's$$missing (for tests/test_team.py)"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	  || echo "could not install$$missing: tests/test_team.py will be skipped"; \
	fi

# tests/test_plots.py opens DVC's plot page in Debian's headless chromium, in a network namespace
# with no network (`unshare --net`), to see it draw every chart offline. Skipped without it.
chromium: ## install Debian's chromium if it is missing (for tests/test_plots.py)
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  echo "installing Debian's chromium (for tests/test_plots.py)"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	  || echo "could not install chromium: the browser checks in tests/test_plots.py will be skipped"; \
	fi

# tests/test_tune.py runs a two-node Ray cluster in a network namespace of its own: `unshare`
# (util-linux), `ip` and `ss` (Debian's iproute2). Installed as root if missing; else skipped.
iproute: ## install Debian's iproute2 (ip, ss) if it is missing
	@if ! command -v ip >/dev/null 2>&1 || ! command -v ss >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  echo "installing Debian's iproute2 (for tests/test_tune.py)"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends iproute2 >/dev/null \
	  || echo "could not install iproute2: the cluster test in tests/test_tune.py will be skipped"; \
	fi

pipeline: $(STAMP) ## run the whole pipeline: download, train and evaluate every variant, report
	$(BIN)/dvc repro

test: $(STAMP) postgres chromium iproute ## Ruff (lint + format check) and the default test run
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

test-slow: $(STAMP) ## the slow tests too (full data: set MNIST_MIRROR)
	$(BIN)/pytest -m "slow or not slow"

lint: $(STAMP) ## Ruff lint
	$(BIN)/ruff check .

format: $(STAMP) ## Ruff: fix and format in place
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# One worker is plenty for one person (MLflow's default, 4, prints every start-up line 4 times), and
# MLflow 3.17's server imports a module Starlette has deprecated: a warning meant for MLflow's
# developers, hidden here. UI_STORE and UI_PORT pick another store or port.
UI_STORE ?= sqlite:///$(CURDIR)/mlflow.db
UI_PORT  ?= 5000
ui: $(STAMP) ## the MLflow UI on the local tracking store, http://127.0.0.1:5000
	PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated" \
	  $(BIN)/mlflow ui --backend-store-uri $(UI_STORE) --registry-store-uri $(UI_STORE) \
	  --host 127.0.0.1 --port $(UI_PORT) --workers 1

clean: ## remove the virtual environment and caches (data, models and runs stay)
	rm -rf $(VENV) .pytest_cache .ruff_cache
