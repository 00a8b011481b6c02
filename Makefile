# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-random test-core test-service bench bench-quick browser tools clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker,test]'
	touch $(STAMP)

# Debian packages the tests use (command:package): chromium for the dashboard's browser tests
# (Playwright drives it; no browser download), shellcheck for the Slurm script, docker-compose to
# validate the compose file, and Slurm 22.05 with munge for the single-node cluster that runs the
# Slurm script for real (tests/deploy/slurm). The daemons live in /usr/sbin, not on every PATH.
TOOLS := chromium:chromium shellcheck:shellcheck docker-compose:docker-compose \
         slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge
tools:
	@missing=""; for t in $(TOOLS); do c=$${t%%:*}; command -v $$c >/dev/null 2>&1 || test -x /usr/sbin/$$c \
	  || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

browser: tools

demo: $(STAMP)
	$(BIN)/lowrank demo

# Test files run in TEST_PROCS processes (pytest-xdist, a file's tests together in one process: module
# fixtures are built once). The suite mostly waits on real services, so 2 processes on 2 cores halve its
# time; every session fixture is private to its process (its own database, queue prefix, ports, private
# Postgres/Redis for the fault tests). TEST_PROCS=0 runs everything in this one process, in file order.
TEST_PROCS ?= 2
test: $(STAMP) tools
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCS) --dist loadfile tests

# The same suite in a random order (modules shuffled, tests shuffled within each): every test must
# pass alone and after any other. The seed is printed; SEED=<n> replays an order. `make test` keeps the
# files' order within each of its processes; `make test TEST_PROCS=0` replays it in one.
test-random: $(STAMP) tools
	$(BIN)/python -m pytest -p no:cacheprovider $(if $(SEED),--random-order-seed=$(SEED),--random-order) tests

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
