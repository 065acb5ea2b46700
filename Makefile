# tripmesh: a new user needs two commands, `make up` and `make test` (see README.md).
# Everything is built here from a clean clone: a virtualenv with the pinned
# dependencies, the generated protobuf code, and the Toxiproxy server.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules --no-print-directory

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after each install: dependencies are reinstalled only when pyproject.toml changes.
INSTALLED := $(VENV)/.installed

TOXIPROXY_VERSION := 2.12.0
TOXIPROXY_MODULE := github.com/Shopify/toxiproxy/v2
# The choreographed saga's broker: NATS with JetStream.
NATS_VERSION := 2.12.1
NATS_MODULE := github.com/nats-io/nats-server/v2
BIN := .bin

# The contract is protos/tripmesh/v1/*.proto; protoc writes the importable
# tripmesh.v1 modules into the shared package's folder (build output, ignored by git).
PROTO_DIR := protos/tripmesh/v1
STUB_DIR := tripmesh/v1
PROTOS := $(wildcard $(PROTO_DIR)/*.proto)
GENERATED := $(foreach p,$(patsubst $(PROTO_DIR)/%.proto,$(STUB_DIR)/%,$(PROTOS)),$(p)_pb2.py $(p)_pb2.pyi $(p)_pb2_grpc.py)

PYTEST_ARGS ?=
ARGS ?=

.PHONY: help up down status logs reset test lint types check proto toxiproxy broker venv chaos chaos-report load bench

help: ## Show the targets
	@echo "tripmesh: flight, hotel and car booked together, by 2PC, 3PC or saga, behind Toxiproxy."
	@echo
	@grep -E '^[a-z][a-z -]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | \
		awk -F'\t' '{ printf "  make %-22s %s\n", $$1, $$2 }'

up: venv proto toxiproxy broker ## Install what is missing, start the mesh, wait until all of it is SERVING (TLS=1: mTLS on every hop; STORE=postgres COORDINATORS=2: the books and trip log on PostgreSQL, two coordinators)
	@$(PY) -m tripmesh.mesh up $(if $(filter 1,$(TLS)),--tls) $(if $(STORE),--store $(STORE)) $(if $(COORDINATORS),--coordinators $(COORDINATORS))

down: ## Stop every process gracefully (SIGTERM, in-flight RPCs finish); none is left
	@if [ -f $(INSTALLED) ]; then $(PY) -m tripmesh.mesh down; else echo "tripmesh is not running (nothing installed yet)"; fi

status: ## Each process (state, pid, gRPC health) and each proxy (enabled, toxics)
	@if [ -f $(INSTALLED) ]; then $(PY) -m tripmesh.mesh status || [ $$? -eq 3 ]; \
	else echo "tripmesh is not running (nothing installed yet)"; fi

logs: ## Last lines of every log; ARGS="-f coordinator" follows one
	@if [ -f $(INSTALLED) ]; then $(PY) -m tripmesh.mesh logs $(ARGS); else echo "no logs yet"; fi

reset: venv proto toxiproxy broker ## Stop, wipe the databases and logs, start again (reseeds the catalog)
	@$(PY) -m tripmesh.mesh reset $(if $(filter 1,$(TLS)),--tls)

test: venv proto toxiproxy broker browser ## The whole suite: unit, integration, end-to-end through Toxiproxy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv ## ruff
	$(PY) -m ruff check .

types: venv proto ## mypy --strict over the source (generated code excluded)
	$(PY) -m mypy services coordinator chaos loadtest tripmesh

check: lint types test ## Lint, types, then the whole suite

venv: $(INSTALLED) ## The virtualenv (.venv) with the pinned dependencies from pyproject.toml

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "error: tripmesh needs Python 3.11 or newer; '$(PYTHON)' is not." >&2; \
		echo "       Install one, or point at it: make up PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

proto: $(GENERATED) ## Generate the tripmesh.v1 protobuf and gRPC code from protos/

# One protoc run writes all three files of a .proto (a multi-target pattern rule).
$(STUB_DIR)/%_pb2.py $(STUB_DIR)/%_pb2.pyi $(STUB_DIR)/%_pb2_grpc.py: $(PROTO_DIR)/%.proto $(INSTALLED)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $<

toxiproxy: ## The Toxiproxy server: toxiproxy-server on PATH, or built into .bin/ with Go
	@if command -v toxiproxy-server >/dev/null 2>&1; then \
		: "on PATH: $$(command -v toxiproxy-server)"; \
	elif $(BIN)/toxiproxy-server -version 2>/dev/null | grep -q '$(TOXIPROXY_VERSION)'; then \
		: "already built"; \
	elif command -v go >/dev/null 2>&1; then \
		echo "Building Toxiproxy $(TOXIPROXY_VERSION) into $(BIN)/toxiproxy-server (go install; a minute the first time)"; \
		mkdir -p $(BIN); \
		GOBIN="$(CURDIR)/$(BIN)" go install \
			-ldflags "-X $(TOXIPROXY_MODULE).Version=$(TOXIPROXY_VERSION)" \
			$(TOXIPROXY_MODULE)/cmd/server@v$(TOXIPROXY_VERSION); \
		mv -f $(BIN)/server $(BIN)/toxiproxy-server; \
	else \
		echo "error: no toxiproxy-server on PATH and no Go to build one." >&2; \
		echo "  Either install Go (https://go.dev/dl/) and run make again," >&2; \
		echo "  or put Toxiproxy $(TOXIPROXY_VERSION)'s server on PATH as toxiproxy-server:" >&2; \
		echo "  https://github.com/Shopify/toxiproxy/releases/tag/v$(TOXIPROXY_VERSION)" >&2; \
		exit 1; \
	fi

broker: ## The NATS server (JetStream) for the choreographed saga: nats-server on PATH, or built into .bin/ with Go
	@if command -v nats-server >/dev/null 2>&1; then \
		: "on PATH: $$(command -v nats-server)"; \
	elif $(BIN)/nats-server --version 2>/dev/null | grep -q 'v$(NATS_VERSION)'; then \
		: "already built"; \
	elif command -v go >/dev/null 2>&1; then \
		echo "Building nats-server $(NATS_VERSION) into $(BIN)/nats-server (go install; a minute or two the first time)"; \
		mkdir -p $(BIN); \
		GOBIN="$(CURDIR)/$(BIN)" go install $(NATS_MODULE)@v$(NATS_VERSION); \
	else \
		echo "error: no nats-server on PATH and no Go to build one." >&2; \
		echo "  Either install Go (https://go.dev/dl/) and run make again," >&2; \
		echo "  or put NATS server $(NATS_VERSION) on PATH as nats-server:" >&2; \
		echo "  https://github.com/nats-io/nats-server/releases/tag/v$(NATS_VERSION)" >&2; \
		exit 1; \
	fi

.PHONY: browser
browser: ## Chromium for the operator page's browser test: chromium on PATH, else apt-get (as root)
	@if command -v chromium >/dev/null 2>&1; then \
		: "on PATH: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium for the browser test (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "error: no chromium on PATH; the operator page's browser test drives it." >&2; \
		echo "  Install it (Debian/Ubuntu): sudo apt-get install chromium" >&2; \
		exit 1; \
	fi

SCENARIO ?= baseline
PROTOCOL ?= saga
SEED ?= 1
DURATION ?= 60

chaos: venv proto toxiproxy broker ## One scenario: SCENARIO=<name> PROTOCOL=2pc|3pc|saga [SEED= DURATION=]; audits, exits 1 on a violation
	$(PY) -m chaos.run $(SCENARIO) --protocol $(PROTOCOL) --seed $(SEED) --duration $(DURATION)

# make chaos-report [RUNS=folder] [SCENARIOS=a,b PROTOCOLS=2pc,saga SEEDS=1,2,3 DURATION=30] [BENCH=file|latest|none]
# RUNS alone: the report from runs already made (seconds); with a plan, only what RUNS lacks is run.
chaos-report: venv proto toxiproxy broker ## The report that decides: matrix, recommendation, HTML [RUNS= SCENARIOS= PROTOCOLS= SEEDS= DURATION=]
	$(PY) -m chaos.compare $(foreach r,$(RUNS),--runs $(r)) \
		$(if $(SCENARIOS),--scenarios $(SCENARIOS)) $(if $(PROTOCOLS),--protocols $(PROTOCOLS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(filter-out 60,$(DURATION)),--duration $(DURATION)) \
		--bench $(or $(BENCH),latest)

# make load PROTOCOL=2pc|saga|mixed USERS=50 DURATION=60s|5m SHAPE=steady|black-friday
# [MESH=auto|running|isolated TARGET=host:port MAX_FAILURES=0.01 LOAD_ARGS="-- --think-time 0.5"]
LOAD_FLAGS = --protocol $(or $(PROTOCOL),saga) --users $(or $(USERS),50) \
	--duration $(or $(DURATION),60) --shape $(or $(SHAPE),steady) --mesh $(or $(MESH),auto) \
	$(if $(TARGET),--target $(TARGET)) $(if $(MAX_FAILURES),--max-failure-ratio $(MAX_FAILURES)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(LOAD_ARGS)

.PHONY: load-ui load-chaos

load: venv proto toxiproxy broker ## Locust, headless: PROTOCOL= USERS= DURATION= SHAPE=steady|black-friday WORKERS=N (distributed: a master, N workers); reports in runs/load-*/
	$(PY) -m loadtest.run $(LOAD_FLAGS)

load-ui: venv proto toxiproxy broker ## Locust's web UI on http://127.0.0.1:8089 against the mesh (same options as load)
	$(PY) -m loadtest.run --ui $(LOAD_FLAGS)

load-chaos: venv proto toxiproxy broker ## Locust during a chaos scenario: SCENARIO= PROTOCOL= USERS= DURATION= (seconds)
	$(PY) -m loadtest.chaosload $(or $(SCENARIO),baseline) --protocol $(or $(PROTOCOL),saga) \
		--users $(or $(USERS),20) --duration $(or $(DURATION),60) --shape $(or $(SHAPE),steady)

bench: venv proto toxiproxy broker ## Echo ceiling, every protocol's trips/s, p50/p99 and CPU per trip, memory, contention; runs/bench-*/ [BENCH_ARGS=--protocols saga,2pc] [STORE=postgres COORDINATORS=2]
	$(PY) -m loadtest.bench $(if $(STORE),--store $(STORE)) $(if $(COORDINATORS),--coordinators $(COORDINATORS)) $(BENCH_ARGS)
