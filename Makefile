# wsgateway: `make run` (live demo) and `make test` (whole suite). Both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# `make run` needs only nats-server; the test tools come with `make test` (buildah and debootstrap: the image)
RUN_APT_DEPS := nats-server=nats-server
APT_DEPS := $(RUN_APT_DEPS) node=nodejs npm=npm promtool=prometheus chromium=chromium gcc=gcc \
	buildah=buildah debootstrap=debootstrap valgrind=valgrind \
	nginx=nginx /usr/lib/nginx/modules/ngx_nchan_module.so=libnginx-mod-nchan \
	/usr/include/zlib.h=zlib1g-dev
PYTEST_ARGS ?=

.PHONY: run test deps venv run-deps system-deps npm-deps lint bench clean dashboards image js schemas

run: venv run-deps
	$(VENV)/bin/wsgateway dev

test: deps k8s centrifugo image js
	$(VENV)/bin/ruff check gateway operator tests bench dashboards
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

deps: venv system-deps npm-deps

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py gateway/core/_fastpath.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

run-deps:
	@scripts/ensure-apt.sh $(RUN_APT_DEPS)

system-deps:
	@scripts/ensure-apt.sh $(APT_DEPS)

# The container image wsgateway/wsgateway:<version> (Containerfile, buildah; docs/operations.md#container-image).
# Skipped when an image built from the same inputs exists; tests/test_image.py runs it.
image: venv
	@PYTHON=$(PY) scripts/build-image.sh >/dev/null

npm-deps: system-deps
	@scripts/ensure-npm.sh

# The TypeScript SDK @wsgateway/client (clients/js -> clients/js/dist, tsc); a no-op when dist is current.
js: npm-deps
	@scripts/build-js.sh

# Regenerate the contract from the models: the SDK's types (clients/js/src/generated) and docs/asyncapi.yaml
# (tests/test_schemas.py fails when they are stale).
schemas: venv npm-deps
	$(PY) scripts/gen_schemas.py

# The operator tests' control plane (etcd, kube-apiserver, kube-controller-manager) and helm, built from
# Go modules (tools/k8s) once per version into a cache outside the clone; checks for the Go toolchain
# (on PATH or /usr/local/go/bin). A no-op when cached.
.PHONY: k8s
k8s:
	@scripts/build-k8s.sh >/dev/null

# Centrifugo, a peer server of the fan-out benchmark (bench/fanout.py --servers ...,centrifugo;
# tests/test_bench_peers.py), built from Go modules (tools/centrifugo) like `k8s`: once per version, cached
# outside the clone, a no-op when cached. Nchan comes from Debian (APT_DEPS).
.PHONY: centrifugo
centrifugo:
	@scripts/build-centrifugo.sh >/dev/null

lint: venv
	$(VENV)/bin/ruff check gateway operator tests bench dashboards

# Regenerate the committed monitoring files (tests fail when they are stale).
dashboards: venv
	$(PY) dashboards/gen_dashboards.py
	$(PY) dashboards/gen_rules.py

bench: deps
	$(PY) bench/fanout.py

clean:
	rm -rf $(VENV) tools/node_modules clients/js/node_modules clients/js/dist .pytest_cache .ruff_cache
