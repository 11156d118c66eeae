# One command each to set up and run the pipeline or the tests (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint

$(BIN)/dvc: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(BIN)/dvc

# the whole pipeline with the committed params.yaml
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" TF_CPP_MIN_LOG_LEVEL=2 python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
