# Recipes for working on this project; `make` alone lists them. Every target but setup runs the project's .venv, which
# `make setup` makes. CI (.ci/run -> scripts/test) runs setup, lint, typecheck, check-wheels and test.
#
# ARGS passes extra arguments to the target's command:
#   make unit ARGS="-x -k engine"     make bench-load ARGS="--local --streams 8"     make gpu-check OUT=/tmp/gpu
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
# Browser tests run in a loopback-only network namespace (unshare -n), which needs root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
OUT ?= out/gpu-check
ARGS ?=

.DEFAULT_GOAL := help
# Serve tests bind port 8000 and the benchmarks measure the machine: never run two targets at once.
.NOTPARALLEL:
.PHONY: help setup lint format typecheck check-wheels unit test test-browser serve gpu-check \
	bench-stages bench-throughput bench-flatness bench-precision bench-cpu-profile bench-overhead bench-load bench-soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: ## .venv with the project (editable) and its test, lint and type-check tools
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[dev]"

lint: ## ruff: lint rules and formatting (checks only)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: ## ruff: format the code and apply the safe lint fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: ## mypy over app, deployments, client, bench, tests and scripts (settings: pyproject.toml)
	$(VENV)/bin/mypy $(ARGS)

check-wheels: ## every pinned requirement resolves to Linux x86_64 wheels for each Python requires-python admits
	$(PY) scripts/check_wheels.py $(ARGS)

unit: ## the tests that start no Ray Serve and no browser (tests/serve is skipped whole: importing it loads Ray)
	$(PYTEST) -m "not serve" --ignore=tests/serve $(ARGS)

test: ## everything, as CI runs it: the whole suite, then the browser tests
	$(PYTEST) $(ARGS)
	$(MAKE) --no-print-directory test-browser

test-browser: ## the browser tests (Debian's chromium), alone in a loopback-only network namespace
	$(SUDO) unshare -n sh -c 'ip link set lo up && SEEDVC_BROWSER_TESTS=1 exec $(PYTEST) tests/browser'

serve: ## the service on this machine (SEEDVC_MODEL=tests/fixtures/parity_a/model: the tiny test bundle, offline)
	$(VENV)/bin/serve run serve_config.yaml $(ARGS)

gpu-check: ## the prepared GPU check into OUT (default out/gpu-check); on the GPU machine's own python3 (see the script)
	scripts/gpu-check $(OUT) $(ARGS)

# Benchmarks print figures (README, "Benchmarks"); each module's docstring says what it measures and its options.
bench-stages: ## per-stage time of one real-time block (full-size random weights)
	$(PY) -m bench.stages $(ARGS)

bench-throughput: ## engine throughput, B streams in one batched step
	$(PY) -m bench.engine_throughput $(ARGS)

bench-flatness: ## time and memory over a long engine run
	$(PY) -m bench.flatness $(ARGS)

bench-precision: ## fp32 against bf16: time and deviation
	$(PY) -m bench.precision $(ARGS)

bench-cpu-profile: ## the CPU real-time profile (ARGS: sweep or deviation, then their flags; default sweep)
	$(PY) -m bench.cpu_profile $(or $(ARGS),sweep)

bench-overhead: ## serving-stack overhead per block through a local Serve app (identity converter)
	$(PY) -m bench.serving_overhead $(ARGS)

bench-load: ## N real-time streams through /v1/stream (default: a local app this starts; ARGS="--url ..." for any)
	$(PY) -m bench.load $(or $(ARGS),--local)

bench-soak: ## real-time streams kept live for a long time; flat or not (default: --local)
	$(PY) -m bench.soak $(or $(ARGS),--local)
