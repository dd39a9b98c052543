# keysvc: `make run` sets everything up and starts the service; `make test` runs the tests.
# Every target installs what it needs (Debian packages, the virtualenv) and is idempotent.

PYTHON ?= python3
VENV := .venv
DATA := $(CURDIR)/data
TOKEN_LABEL := keysvc
LISTEN ?= 127.0.0.1:50051
WORKERS ?= 1
export SOFTHSM2_CONF := $(DATA)/softhsm2.conf

.PHONY: run test bench bench-cache soak fuzz deps venv proto proto-check token pki clean

# The development profile: mutual TLS with the development PKI, one key-admin, so no dual control.
run: venv proto token pki
	KEYSVC_HSM_PIN_FILE=$(DATA)/pin $(VENV)/bin/keysvc serve --listen $(LISTEN) --workers $(WORKERS) \
	  --database sqlite:///$(DATA)/keysvc.db --token-label $(TOKEN_LABEL) \
	  --tls-cert $(DATA)/pki/server.crt --tls-key $(DATA)/pki/server.key --tls-client-ca $(DATA)/pki/ca.crt \
	  --policy $(DATA)/pki/policy.toml --no-dual-control

test: venv proto-check
	$(VENV)/bin/python -m pytest

bench: venv proto
	$(VENV)/bin/python bench/bench.py

# One HSM call's cost with hot and with cold CPU caches (what unary calls pay in a server).
bench-cache: venv proto
	$(VENV)/bin/python bench/cache_cost.py

# MINUTES of mixed traffic: errors, p99 latency and server memory every 10 s.
MINUTES ?= 5
soak: venv proto
	$(VENV)/bin/python bench/bench.py --soak $(MINUTES)

# SECONDS of coverage-guided fuzzing (atheris) of the seal canonicalisation and card number
# parsing; new inputs are kept in fuzz/corpus, a crash's input is written to fuzz/crash-*.
SECONDS ?= 60
fuzz: venv
	mkdir -p fuzz/corpus
	$(VENV)/bin/python fuzz/fuzz_parsers.py -max_total_time=$(SECONDS) -timeout=10 -artifact_prefix=fuzz/ fuzz/corpus

# Debian packages: SoftHSM2 (the HSM), venv support for Python, and a PostgreSQL server
# for the store tests when none is installed (the tests use the one on 127.0.0.1:5432
# where it runs and lets them in, else they start a throwaway one from this package).
deps: .deps-installed
.deps-installed:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml .deps-installed
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

proto: venv
	PYTHON=$(VENV)/bin/python tools/gen_protos.sh

proto-check: venv
	PYTHON=$(VENV)/bin/python tools/gen_protos.sh --check

token: venv
	hsm/softhsm/setup-token.sh $(DATA) $(TOKEN_LABEL)

# A development CA, server and per-role client certificates and a policy, once.
pki: venv
	$(VENV)/bin/keysvc dev-pki $(DATA)/pki

clean:
	rm -rf $(VENV) .deps-installed .pytest_cache
