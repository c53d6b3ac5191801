# Two entry points do all the set-up on a fresh machine:
#   make run   - create .venv, install broadcast (what running needs, nothing more), start one
#                gateway on 127.0.0.1:12345; pass flags with ARGS="--port 8000 --log-level debug"
#   make test  - also install the test tools (.[test]) and, with apt as root or through sudo,
#                redis-server, haproxy and chromium when missing; lint, then run the whole suite
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: run test lint system-deps bench-smoke clean

# One virtualenv, two stamps: `make run` installs the package alone, `make test` adds the extra.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(BIN)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/broadcast-server start $(ARGS)

system-deps:
	scripts/install-system-deps

lint: $(BIN)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p broadcast

test: $(BIN)/.installed-test system-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench-smoke: $(BIN)/.installed
	$(BIN)/broadcast-bench smoke

clean:
	rm -rf $(VENV) .pytest_cache
