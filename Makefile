# Two entry points do all the set-up on a fresh machine:
#   make run   - create .venv, install broadcast, start one gateway on 127.0.0.1:12345
#   make test  - also install redis-server if missing, lint, then run the whole test suite
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: run test lint system-deps bench-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/broadcast-server start $(ARGS)

system-deps:
	scripts/install-system-deps

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(BIN)/.installed system-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
