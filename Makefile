# zooaudit — `make demo` and `make test` bootstrap .venv from constraints.txt when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.zooaudit-installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export AWS_REQUEST_CHECKSUM_CALCULATION := WHEN_REQUIRED

.PHONY: demo test test-fast bench bootstrap-ui up down clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zooaudit demo

# The UI test drives Debian's headless Chromium (tests/test_ui.py); installed when missing.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

bootstrap-ui: $(CHROMIUM)

# pytest exits 5 when it collected no tests: that is a failure, not a pass.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cka.py

# The local stack (Prefect server + UI, SeaweedFS S3, Dask, deployment runner) on loopback.
# Options: make up UP_ARGS="--data-dir DIR --prefect-port 4200 --s3-port 8333 ..."
STACK_DIR ?= .zooaudit-stack
up: $(STAMP)
	$(BIN)/zooaudit up --data-dir $(STACK_DIR) $(UP_ARGS)

down:
	$(BIN)/zooaudit down --data-dir $(STACK_DIR)

clean:
	rm -rf $(VENV) zooaudit-store
