# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine must not pull several GB of CUDA wheels, so torch is installed first, pinned.
# On a GPU machine choose the build, e.g. `make train TORCH_SPEC="torch==2.13.0" ARGS="trainer=gpu"`.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
ARGS ?=
# pytest workers (pytest-xdist): auto = one per core (on 2 cores the whole suite took 552 s with 2 workers, 2026-12-07)
TEST_WORKERS ?= auto

.PHONY: train test test-slow test-docs install install-dev clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the runtime package (make train); re-run when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	@touch $@

# the runtime package plus the test and tooling extra (make test), in one pip call: one resolve and one
# editable build instead of two; it also satisfies `make train`
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev]"
	@touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The training deadline (conf/train.yaml `deadline`) counts from when make started, set-up included
MAKE_STARTED := $(shell date +%s)

train: install
	STALE_DEADLINE_FROM=$(MAKE_STARTED) $(BIN)/stale-train $(ARGS)

# ruff first: a lint error or an unformatted file fails in seconds, before the suite's minutes. The heavier
# end-to-end checks (multi-process FSDP2 / sequence parallelism / DDP, inductor, the ablation script: @pytest.mark.slow)
# are `make test-slow`, and every shell command of README.md and docs/ is `make test-docs`; CI runs all three (.ci/run)
test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15 -m "not docs and not slow" $(ARGS)

test-slow: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=10 -m "slow and not docs" $(ARGS)

test-docs: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=5 -m docs $(ARGS)

clean-venv:
	rm -rf $(VENV)
