# Two commands from a fresh clone: `make demo` and `make test`. Each bootstraps what it needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
IAC_VENV := .venv-iac
IAC_STAMP := $(IAC_VENV)/.installed

.PHONY: demo test lint fmt bench deps browser clean

deps: $(PY_STAMP) $(NODE_STAMP) $(IAC_STAMP)

$(PY_STAMP): pyproject.toml requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (found %s); set PYTHON=/path/to/python3.11" % sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# checkov (Bicep checks) in a venv of its own: it pins packages the app's venv must not be held to.
$(IAC_STAMP): infra/requirements-checks.txt
	test -x $(IAC_VENV)/bin/python || $(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(IAC_VENV)/bin/python -m pip install --quiet -r infra/requirements-checks.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian's Chromium, for the tests that load the report page in a real browser (installed only where missing).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium (the report page is tested in headless Chromium)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }

demo: deps
	$(BIN)/python -m sandbox demo

# Two workers, each with its own Azurite: most tests wait on servers more than they compute (about 5 minutes on 2
# cores instead of 8). `pytest` alone runs them one at a time.
test: deps browser
	$(BIN)/python -m pytest -n 2 --dist worksteal

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: deps
	$(BIN)/python -m bench.dataverse_ceiling --rows 100000
	$(BIN)/python -m bench.dataverse_fleet --rows 300000
	$(BIN)/python -m bench.sync_pipeline --records 20000 --events 20
	$(BIN)/python -m bench.masking
	$(BIN)/python -m bench.reconcile --records 50000 --edits 100

fmt: deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(IAC_VENV) node_modules .local .mypy_cache .ruff_cache .pytest_cache .hypothesis
