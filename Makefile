# Two commands on a fresh machine: `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test lint typecheck bench bench-500k bench-ws-500k clean system-deps

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Debian packages the tests drive for real (installed only when missing).
system-deps:
	@bash scripts/system-deps.sh

run: $(STAMP)
	$(BIN)/python -m tidegate serve --config config/example.toml

test: $(STAMP) system-deps
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m tidegate bench --connections 20000 --hold 10 --json bench/results/latest.json

bench-500k: $(STAMP)
	$(BIN)/python -m tidegate bench --connections 500000 --hold 60 --server-ping-interval 35 \
		--max-inflight 80 --connect-phase-timeout 480 --json bench/results/$$(date +%F)-raw-500k.json

bench-ws-500k: $(STAMP)
	$(BIN)/python -m tidegate bench --protocol ws --server-config bench/configs/ws-broadcast.toml \
		--connections 500000 --hold 60 --ping-interval 300 --server-ping-interval 300 \
		--max-inflight 80 --connect-retries 2 --connect-phase-timeout 900 \
		--json bench/results/$$(date +%F)-ws-500k.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
