# agentfense-runc: run everything as root on a Debian machine.
#   make demo   build, install, register with Docker and run the demo
#   make test   lint, unit tests, and the end-to-end suite against Docker, containerd and podman
SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
BIN := target/release/agentfense-runc
PYTEST ?= python3 -m pytest

.PHONY: all build install host lint unit integration test demo bench clean

all: build

build:
	$(CARGO) build --release --locked

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/agentfense-runc

# Debian packages, the Python test runner, and a running dockerd (with its containerd).
host:
	bash integration/host.sh install
	bash integration/host.sh start

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --locked

integration: build
	AGENTFENSE_BIN=$(CURDIR)/$(BIN) $(PYTEST) -v -p no:cacheprovider integration

test: host lint unit integration

demo: host install
	bash integration/demo.sh

# Figures, not assertions: the policy engine's decisions per second, and fenced workloads
# side by side with the native directory (BENCH_ARGS=--quick for a small run).
bench: build
	$(CARGO) bench --bench policy
	AGENTFENSE_BIN=$(CURDIR)/$(BIN) python3 benches/fence_bench.py $(BENCH_ARGS)

clean:
	$(CARGO) clean
