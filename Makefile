# The two set-up commands of the README. Both create .venv from scratch if it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test clean

# llama-cpp-python (test extra) compiles its vendored llama.cpp: only the libraries the bindings load
# (no multimodal mtmd, tools, server, examples or tests), on every core.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

# The demo needs only the runtime dependencies; the tests add the test extra (transformers, openai, and
# llama-cpp-python, which compiles llama.cpp: minutes), so `make demo` does not wait for that build.
$(BIN)/stepflash: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build, so nothing else can pull a CUDA wheel.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(BIN)/stepflash

$(VENV)/.test-deps: $(BIN)/stepflash
	$(BIN)/pip install -q -e ".[test]"
	touch $(VENV)/.test-deps

install: $(BIN)/stepflash

install-test: $(VENV)/.test-deps

demo: install
	$(BIN)/python -m stepflash.demo

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs/demo
