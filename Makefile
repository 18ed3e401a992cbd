# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch is pinned and installed first: an unpinned torch pulls GBs of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
EXAMPLE_DIR ?= example

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,integration,distributed]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mergekit-like example $(EXAMPLE_DIR) --trajectory 5 --overwrite
	$(BIN)/mergekit-like inspect $(EXAMPLE_DIR)/finetune-1 --filter layers.0.
	$(BIN)/mergekit-like merge --method ties --base $(EXAMPLE_DIR)/base $(EXAMPLE_DIR)/finetune-1 $(EXAMPLE_DIR)/finetune-2 $(EXAMPLE_DIR)/finetune-3 \
		-p density=0.5 -p weight=1.0,0.6,0.3 -o $(EXAMPLE_DIR)/merged-ties --dry-run
	$(BIN)/mergekit-like merge --method ties --base $(EXAMPLE_DIR)/base $(EXAMPLE_DIR)/finetune-1 $(EXAMPLE_DIR)/finetune-2 $(EXAMPLE_DIR)/finetune-3 \
		-p density=0.5 -p weight=1.0,0.6,0.3 -o $(EXAMPLE_DIR)/merged-ties --overwrite
	$(BIN)/mergekit-like merge $(EXAMPLE_DIR)/merged-ties/merge_recipe.yml -o $(EXAMPLE_DIR)/merged-ties-rerun --overwrite --quiet
	cmp $(EXAMPLE_DIR)/merged-ties/model.safetensors $(EXAMPLE_DIR)/merged-ties-rerun/model.safetensors && echo "rerun from merge_recipe.yml: identical bytes"
	$(BIN)/mergekit-like merge --method wise_ft --base $(EXAMPLE_DIR)/base $(EXAMPLE_DIR)/finetune-1 -p alpha=0.25,0.5,0.75 -o $(EXAMPLE_DIR)/wise-ft --overwrite
	$(BIN)/mergekit-like soup $(EXAMPLE_DIR)/finetune-1 $(EXAMPLE_DIR)/finetune-2 $(EXAMPLE_DIR)/finetune-3 -o $(EXAMPLE_DIR)/soup --overwrite
	$(BIN)/mergekit-like average $(EXAMPLE_DIR)/run --method lawa --k 3 --list
	$(BIN)/mergekit-like average $(EXAMPLE_DIR)/run --method ema --decay 0.5,0.9 -o $(EXAMPLE_DIR)/run-ema --overwrite
	$(BIN)/mergekit-like inspect $(EXAMPLE_DIR)/merged-ties --totals
	head -20 $(EXAMPLE_DIR)/merged-ties/README.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/ruff check mergekit_like cli
	$(BIN)/mypy mergekit_like cli

bench: $(STAMP)
	$(BIN)/python benchmarks/copy_memory_bench.py

clean:
	rm -rf $(VENV) $(EXAMPLE_DIR) .pytest_cache .hypothesis
