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
.PHONY: help setup test-tools pipeline test test-slow lint format ui benchmark clean

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

# Debian programs the tests run, as their users would (installed as root or with password-less
# sudo, one `apt-get update` for all; a test whose program is missing is skipped, and fails under
# CI=true):
# - postgresql, openssl, curl: tests/test_team.py runs docs/team.md on a PostgreSQL of its own;
# - chromium: tests/test_plots.py opens DVC's plot page offline;
# - iproute2: tests/test_tune.py's two-node Ray cluster in a network namespace of its own;
# - qemu-user: tests/test_export.py runs the int8 model on an emulated CPU without VNNI.
TOOLS := initdb=postgresql openssl=openssl curl=curl chromium=chromium ip=iproute2 ss=iproute2 \
         qemu-x86_64=qemu-user
test-tools: ## install the Debian programs the tests run, where missing
	@missing=""; \
	for pair in $(TOOLS); do tool=$${pair%%=*}; package=$${pair#*=}; \
	  if ! command -v $$tool >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/$$tool >/dev/null 2>&1; then \
	    case " $$missing " in *" $$package "*) ;; *) missing="$$missing $$package";; esac; fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  echo "installing Debian's$$missing (for the tests)"; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	  || echo "could not install$$missing: the tests that need them will be skipped"; \
	fi

pipeline: $(STAMP) ## run the whole pipeline: download, train and evaluate every variant, report
	$(BIN)/dvc repro

test: $(STAMP) test-tools ## Ruff (lint + format check), the default test run, then the team set-up's
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest
	$(BIN)/pytest -m team

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
