# wsgateway: `make run` (live demo) and `make test` (whole suite). Both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
APT_DEPS := nats-server=nats-server node=nodejs npm=npm promtool=prometheus chromium=chromium gcc=gcc
PYTEST_ARGS ?=

.PHONY: run test deps venv system-deps npm-deps lint bench clean dashboards

run: deps
	$(VENV)/bin/wsgateway dev

test: deps
	$(VENV)/bin/ruff check gateway operator tests bench dashboards
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

deps: venv system-deps npm-deps

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

system-deps:
	@scripts/ensure-apt.sh $(APT_DEPS)

npm-deps: system-deps
	@scripts/ensure-npm.sh

lint: venv
	$(VENV)/bin/ruff check gateway operator tests bench dashboards

# Regenerate the committed monitoring files (tests fail when they are stale).
dashboards: venv
	$(PY) dashboards/gen_dashboards.py
	$(PY) dashboards/gen_rules.py

bench: deps
	$(PY) bench/fanout.py

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .ruff_cache
