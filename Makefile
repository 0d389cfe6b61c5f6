# Two commands do all the set-up on a fresh machine:
#   make demo   - install into .venv and run the main job on the embedded tiny model
#   make test   - install into .venv and run the test suite: tests/ (CPU) and e2e/ (a real kube-apiserver,
#                 built from Go modules on the first run and cached under ~/.cache/coserve)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install local

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test,e2e]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/coserve demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests e2e

# A local control plane to try the operator on (see README): kube-apiserver, operator, two engines.
local: $(BIN)/.installed
	$(BIN)/python e2e/local.py
