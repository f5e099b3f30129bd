# `make demo` and `make test` are all the set-up there is: each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := out/demo

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	test -f data/shakespeare/meta.json || $(BIN)/jaxgpt prepare shakespeare
	rm -rf $(DEMO_DIR)
	$(BIN)/jaxgpt train shakespeare-char-cpu --out-dir $(DEMO_DIR)
	$(BIN)/jaxgpt sample --out-dir $(DEMO_DIR) --num-samples 3 --max-new-tokens 400

test: $(VENV)/.dev
	$(BIN)/python -m pytest

bench: $(VENV)/.dev
	$(BIN)/python bench/shakespeare_cpu.py

clean:
	rm -rf $(VENV) out data
