# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-core test-service bench bench-quick browser tools clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker,test]'
	touch $(STAMP)

# Debian packages the tests use: chromium for the dashboard's browser tests (Playwright drives it;
# no browser download), shellcheck for the Slurm script, docker-compose to validate the compose file.
TOOLS := chromium:chromium shellcheck:shellcheck docker-compose:docker-compose
tools:
	@missing=""; for t in $(TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

browser: tools

demo: $(STAMP)
	$(BIN)/lowrank demo

test: $(STAMP) tools
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-core: $(STAMP)
	$(BIN)/python -m pytest -q tests/core

test-service: $(STAMP)
	$(BIN)/python -m pytest -q tests/service

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

clean:
	rm -rf .lowrank .pytest_cache
