# One entry point for developers and CI. `make test` installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install proto proto-check format lint typecheck test test-fast bench check all clean demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	PATH=$(BIN):$$PATH scripts/gen_protos.sh

# Fails when the committed generated code differs from what the .proto files produce.
proto-check: proto
	git diff --exit-code --stat -- src/dist_exec/rpc
	@test -z "$$(git status --porcelain -- src/dist_exec/rpc)" || \
		{ echo "untracked generated files in src/dist_exec/rpc"; exit 1; }

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	$(BIN)/python bench/bench_throughput.py

check: lint typecheck proto-check

all: check test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Install, start the embedded local cluster, run a real job on it, stop it.
demo:
	$(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet .
	$(BIN)/dist-exec up -d --workers 2
	$(BIN)/dist-exec run "echo hello from \$$(hostname); uname -a"; status=$$?; \
		$(BIN)/dist-exec down; exit $$status
