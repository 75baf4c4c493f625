# `make run` and `make test` set everything up on a fresh machine by themselves (see scripts/setup.sh).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdmesh-setup
PYTEST_ARGS ?=

.PHONY: setup run test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh
	@touch $@

run: $(STAMP)
	$(BIN)/pdmesh generate --prompt "Hello from pdmesh" --prompt "The router decides" --max-tokens 32

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix services tests bench
	$(BIN)/ruff format services tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
