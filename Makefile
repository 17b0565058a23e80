# Two entry points for a fresh machine: `make demo` (the tiny offline end-to-end run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/zagreus: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so no dependency pulls a multi-GB CUDA wheel.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/zagreus

demo: install
	$(BIN)/zagreus run recipes/tiny.yaml

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
