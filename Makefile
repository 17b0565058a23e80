# Two entry points for a fresh machine: `make demo` (the tiny offline end-to-end run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test edge-check bench clean

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

# GGUF files run by llama.cpp itself. llama-cpp-python builds llama.cpp from source (7.5 min on two
# cores), too long for every CI run, so the llama.cpp tests in tests/test_gguf.py skip without it.
edge-check: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q llama-cpp-python
	$(BIN)/python -m pytest tests/test_gguf.py

clean:
	rm -rf $(VENV) runs
