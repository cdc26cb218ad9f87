# Leadpipe: `make help` lists every target.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.PHONY: help setup system system-test run test bench bench-e2e lint clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

system: ## install what running needs when missing: Redis and PostgreSQL servers, openssl, Python's venv (Debian packages)
	@need=""; \
	command -v redis-server >/dev/null 2>&1 || need="$$need redis-server"; \
	{ command -v postgres >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; } || need="$$need postgresql"; \
	command -v runuser >/dev/null 2>&1 || need="$$need util-linux"; \
	command -v openssl >/dev/null 2>&1 || need="$$need openssl"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || need="$$need python3-venv"; \
	if [ -n "$$need" ]; then echo "installing:$$need"; $(SUDO) apt-get update -qq && $(APT) $$need; fi

system-test: system ## and what the tests and benchmarks need besides: wrk and chromium
	@need=""; \
	command -v wrk >/dev/null 2>&1 || need="$$need wrk"; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	if [ -n "$$need" ]; then echo "installing:$$need"; $(SUDO) apt-get update -qq && $(APT) $$need; fi

$(BIN)/.installed: pyproject.toml tests/sinks/dummy_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' -e tests/sinks/dummy_plugin
	touch $@

setup: system $(BIN)/.installed ## system packages, a virtualenv and Leadpipe in it

run: setup ## set up, then run the whole pipeline (local Redis and Postgres when none is configured; ARGS='--port 8001')
	$(BIN)/leadpipe run $(ARGS)

# The suite in TEST_PROCESSES processes (pytest-xdist), each starting its own Redis and
# PostgreSQL; most tests wait on servers and workers, so two halve the time on two CPUs.
# Tests marked with one xdist_group run in the same process, one after another.
TEST_PROCESSES ?= 2

test: setup system-test ## set up, then run the test suite against real Redis, Postgres and workers (TEST_PROCESSES=2)
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist loadgroup

bench: setup system-test ## run the benchmarks (ingest vs bare endpoint, drain) and print their numbers
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.drain

bench-e2e: setup system-test ## the whole pipeline: sustained rates with every sink, a 10-minute soak, scale-out (~35 min)
	$(BIN)/python -m bench.sustained --rates 300,400,500,600 --duration 60
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.scale

lint: setup ## ruff
	$(BIN)/ruff check .

clean: ## remove the virtualenv and the local data of `make run`
	rm -rf $(VENV) .leadpipe
