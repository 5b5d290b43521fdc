# Two commands matter: `make demo` and `make test`. Both build the virtualenv first if needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHON := $(abspath $(BIN))/python

.PHONY: install demo test lint protos check-protos deploy-tools browser-tools deploy-check images base-images deploy-e2e flower-venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev]'
	touch $(STAMP)

PYTHON_BOOTSTRAP := $(shell command -v python3.11 || command -v python3)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fibemrss demo --rounds 15 --json demo-result.json

test: $(STAMP) lint check-protos deploy-tools browser-tools
	$(BIN)/python -m pytest -q

# Lint and the house rules: ruff, buf, the import contracts (layers, no service imports another,
# no I/O in the domain; pyproject.toml [tool.importlinter]), no import cycle, mypy clean.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/buf lint
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/check_import_cycles.py fibemrss services
	$(BIN)/mypy

protos: $(STAMP)
	bash scripts/gen_protos.sh

check-protos: $(STAMP)
	bash scripts/check_stubs.sh

deploy-tools:
	bash deploy/tools/install.sh var/deploy-tools

# The console's browser tests: Debian's chromium + chromedriver, the test OpenID Connect provider
# and axe-core from npm (tests/browser, docs/console.md).
browser-tools:
	bash scripts/browser_tools.sh

deploy-check: deploy-tools
	bash deploy/check.sh

# The four service images (podman, or docker), from a wheelhouse of the project's constraints;
# BASE_IMAGE=python:3.11-slim-bookworm where a registry is reachable (docs/runbook.md, "Images").
images: $(STAMP)
	bash deploy/images/build.sh

# The local Debian 12 base and PostgreSQL images only (mmdebstrap + podman import).
base-images:
	bash deploy/images/build_base.sh

# The Helm chart (central + four hospitals) as real pods with podman kube play, the demo's job
# against them (docs/runbook.md, "End-to-end deployment test"); writes var/deploy-e2e.json.
deploy-e2e: images deploy-tools
	$(BIN)/python -m fibemrss.tools.deploy_e2e

# The bench extra: Flower in its own virtualenv, for `fibemrss bench round` (not needed by tests).
flower-venv:
	bash scripts/flower_venv.sh var/flower-venv

clean:
	rm -rf $(VENV) var .pytest_cache
