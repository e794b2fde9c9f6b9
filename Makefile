# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine must not pull several GB of CUDA wheels: torch is installed first, pinned.
# Override for a GPU machine, e.g. `make train TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...`.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: train test install clean-venv

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/stale-train $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
