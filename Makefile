# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch is pinned and installed first: an unpinned torch pulls GBs of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
EXAMPLE_DIR ?= example

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,integration]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mergekit-like example $(EXAMPLE_DIR) --overwrite
	$(BIN)/mergekit-like inspect $(EXAMPLE_DIR)/finetune-1 --filter layers.0.
	$(BIN)/mergekit-like convert $(EXAMPLE_DIR)/finetune-1 -o $(EXAMPLE_DIR)/finetune-1-fp32 --dtype float32 --overwrite
	$(BIN)/mergekit-like inspect $(EXAMPLE_DIR)/finetune-1-fp32 --totals

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/copy_memory_bench.py

clean:
	rm -rf $(VENV) $(EXAMPLE_DIR) .pytest_cache .hypothesis
