# Quick start: `make demo` (install + run the local demo), `make test` (install + lint + all tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# aws-sam-cli pins an old boto3: it gets a virtual environment of its own (tests use it to generate API
# Gateway events and to lint the synthesized template).
SAM_VENV ?= .venv-sam
SAM_CLI ?= aws-sam-cli==1.170.0
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION = 1
export CDK_DISABLE_VERSION_CHECK = 1
# The Node.js the CDK toolchain runs on (jsii for the Python CDK, the cdk CLI): package.json pins it and
# `npm ci` installs it into node_modules, so the machine's own Node only has to run npm.
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)
STACK_ARGS ?=

.PHONY: install install-dev demo serve test lint audit typecheck unit example-model synth sam stack-local clean

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

node_modules/.installed: package.json package-lock.json  ## the pinned CDK CLI (npx cdk ...)
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(SAM_VENV)/bin/sam:
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --disable-pip-version-check '$(SAM_CLI)'

install: $(VENV)/.installed-local
install-dev: $(VENV)/.installed-dev node_modules/.installed $(SAM_VENV)/bin/sam
sam: $(SAM_VENV)/bin/sam

synth: install-dev  ## synthesize the CDK app with real (Docker-free) layer bundling into cdk.out/
	PATH="$(CURDIR)/$(BIN):$$PATH" npx cdk synth --quiet

# The synthesized stack on 127.0.0.1: moto with IAM enforced, every function from its asset, API Gateway's
# routes and authorizer, the state machine; no AWS account, credentials or Docker. STACK_PORT (4566),
# STACK_STAGE (dev), STACK_POOLS=1 (the image pool too); prints MAAS_URL=... and MAAS_TOKEN=...
stack-local: $(VENV)/.installed-dev node_modules/.installed
	$(BIN)/python -m infra.local $(STACK_ARGS)

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
	$(BIN)/mypy infra app.py

# Known vulnerabilities in the installed dependencies (PyPI's advisory data), maas itself (editable)
# skipped. Any finding fails unless .ci/pip-audit-ignore.txt lists its id with a reason. A package the
# service cannot look up is a warning; AUDIT_STRICT=1 makes it an error too (CI with full PyPI access).
AUDIT_IGNORE ?= .ci/pip-audit-ignore.txt
audit: $(VENV)/.installed-dev
	@awk '!/^[[:space:]]*(#|$$)/ && !/#[[:space:]]*[^[:space:]]/ {print FILENAME ":" FNR ": no reason given: " $$0; bad = 1} END {exit bad}' $(AUDIT_IGNORE)
	$(BIN)/pip-audit --skip-editable --progress-spinner off --desc off $(if $(AUDIT_STRICT),--strict) \
		$$(awk '!/^[[:space:]]*(#|$$)/ {print "--ignore-vuln", $$1}' $(AUDIT_IGNORE))

test: lint audit  ## install, lint, audit the dependencies, type-check and run every test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install-dev
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

example-model: install-dev  ## regenerate the bundled example model (byte-identical)
	$(BIN)/python scripts/make_example_model.py

clean:
	rm -rf $(VENV) $(SAM_VENV) node_modules cdk.out .pytest_cache .mypy_cache .ruff_cache
