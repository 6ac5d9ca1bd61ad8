# Quick start: `make demo` (install + run the local demo), `make test` (install + lint + all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install install-dev demo serve test lint typecheck unit example-model clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("maas needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-local

install: $(VENV)/.installed-local
install-dev: $(VENV)/.installed-dev

demo: install  ## start the local server, push + deploy the example model, predict, keep serving
	$(BIN)/maas demo $(DEMO_ARGS)

serve: install
	$(BIN)/maas serve

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	for handler in functions/*/handler.py; do $(BIN)/mypy --strict "$$handler" || exit 1; done
	$(BIN)/mypy --strict scripts/build_layers.py

test: lint  ## install, lint, type-check and run every test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install-dev
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

example-model: install-dev  ## regenerate the bundled example model (byte-identical)
	$(BIN)/python scripts/make_example_model.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
