# The two set-up commands of the README. Both create .venv from scratch if it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

# llama-cpp-python (test extra) compiles its vendored llama.cpp: only the libraries the bindings load
# (no multimodal mtmd, tools, server, examples or tests), on every core.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

$(BIN)/stepflash: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build, so nothing else can pull a CUDA wheel.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/stepflash

install: $(BIN)/stepflash

demo: install
	$(BIN)/python -m stepflash.demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs/demo
