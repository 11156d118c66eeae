# One command each to set up and run the pipeline or the tests (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint browser

$(BIN)/dvc: requirements.txt requirements-dev.txt requirements-remote.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11, 4) else "error: $(PYTHON) is Python " + sys.version.split()[0] + "; imageclf needs 3.11.4 or later (safe archive extraction, tarfile filter=\"data\"). Run make PYTHON=/path/to/python3.12 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# the package itself, editable, for its console command `imageclf`
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/dvc

# the whole pipeline with the committed params.yaml
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" TF_CPP_MIN_LOG_LEVEL=2 python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Headless Chromium, and a local copy of the Vega scripts that `dvc plots show` pages load from
# a CDN, for the browser tests (tests/test_report.py skips without them; tests/test_serve.py
# needs Chromium only, driven by Playwright from requirements-dev.txt). Versions: those of the
# installed dvc-render.
VEGA_DIR := .cache/vega
browser: setup
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	mkdir -p $(VEGA_DIR)
	cd $(VEGA_DIR) && for package in $$($(CURDIR)/$(BIN)/python -c "import inspect, re, \
	    dvc_render.vega as v; print(*re.findall(r'npm/([a-z-]+@[0-9.]+)', inspect.getsource(v)))"); do \
	  name=$${package%@*}; \
	  [ -f $$name.min.js ] && continue; \
	  tarball=$$(npm pack --silent $$package) && \
	  tar -xzf $$tarball package/build/$$name.min.js -O > $$name.min.js && rm $$tarball; \
	done
