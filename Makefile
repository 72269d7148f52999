# Two commands matter: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REPO ?= demo-models
PORT ?= 8000
ADMIN_TOKEN ?= demo-admin-token

.PHONY: setup serve test check lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	test -d $(REPO)/fraud || $(BIN)/turnout demo-repo $(REPO)
	$(BIN)/turnout serve --model-repository $(REPO) --port $(PORT) --admin-token demo=$(ADMIN_TOKEN) --cache-dir .cache/turnout

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Everything: lint, types, and every test (in-process and system tiers) on every core.
test: lint
	$(BIN)/python -m pytest -n auto

# The fast loop while developing: the in-process tier only, no lint (docs/development.md).
check: setup
	$(BIN)/python -m pytest -n auto -m "not system and not slow"

bench: setup
	$(BIN)/python -m loadtests.run
