# One entry point for everything: the same targets run on a laptop and in CI (.ci/run).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF    := $(VENV)/node/node_modules/.bin/buf
CERBOS_VERSION := 0.55.0
# Only x86-64 Linux has the Cerbos package the bench uses; elsewhere its row is left out.
ifeq ($(shell uname -sm),Linux x86_64)
CERBOS := $(VENV)/node/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64
endif
export PYTHONPATH := $(CURDIR):$(CURDIR)/generated

PROTO_FILES := $(shell find protos -name '*.proto' | sort)
TEST_PROTO_FILES := $(shell find tests/protos -name '*.proto' 2>/dev/null | sort)

.PHONY: install run test check lint typecheck protos protos-check buf-lint bench migrate clean

## install: create .venv and install the server with its development tools
install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node @bufbuild/buf@$(BUF_VERSION)

# The Cerbos PDP the bench compares PolicyService/Check with (x86-64 Linux binary).
ifneq ($(CERBOS),)
$(CERBOS):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node @cerbos/cerbos-linux-x64@$(CERBOS_VERSION)
endif

## run: start the server (embedded PostgreSQL, in-process cache) on 127.0.0.1:50051
run: $(STAMP)
	$(BIN)/python -m server serve

## migrate: apply pending migrations to $$DATABASE_URL (or the embedded database)
migrate: $(STAMP)
	$(BIN)/python -m server migrate

## test: unit and integration tests against real PostgreSQL, Redis and the real server
test: $(STAMP)
	$(BIN)/python -m pytest -q

## check: lint, types, proto lint and generated-code freshness
check: lint typecheck buf-lint protos-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy server interceptors tests bench

buf-lint: $(BUF)
	cd protos && ../$(BUF) lint

## protos: regenerate generated/ (and the test-only service in tests/generated/)
protos: $(STAMP)
	$(BIN)/python protos/generate.py --out generated --root protos $(PROTO_FILES)
	$(BIN)/python protos/generate.py --out tests/generated --root tests/protos --include protos $(TEST_PROTO_FILES)

protos-check: $(STAMP)
	$(BIN)/python protos/generate.py --check --out generated --root protos $(PROTO_FILES)
	$(BIN)/python protos/generate.py --check --out tests/generated --root tests/protos --include protos $(TEST_PROTO_FILES)

## bench: h2load against the server, a bare grpc.aio echo server and a Cerbos PDP in one run
bench: $(STAMP) $(CERBOS)
	$(if $(CERBOS),CERBOS_BIN=$(CERBOS)) PYTHONPATH=$(PYTHONPATH):$(CURDIR)/tests/generated $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
