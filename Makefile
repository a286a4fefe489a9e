# agentfense-runc: run everything as root on a Debian machine.
#   make demo   build, install, register with Docker and run the demo
#   make test   lint, unit tests, fuzzing (FUZZ_SECONDS per target, 20 by default), and the
#               end-to-end suite against Docker, containerd and podman
#   make fuzz   every fuzz target for longer (FUZZ_SECONDS, 600 by default here)
SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
BIN := target/release/agentfense-runc
PYTEST ?= python3 -m pytest

.PHONY: all build install host lint unit fuzz-ci fuzz integration test demo bench clean

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

# Every cargo-fuzz target for a bounded time, on stable Rust (see fuzz/run.sh): executions and
# time per target; a crash fails the build. The summary line is printed again at the end of
# `make test`.
FUZZ_SUMMARY := $(CURDIR)/target/fuzz-summary.txt
fuzz-ci:
	CARGO="$(CARGO)" FUZZ_SECONDS="$(or $(FUZZ_SECONDS),20)" FUZZ_SUMMARY="$(FUZZ_SUMMARY)" bash fuzz/run.sh

fuzz:
	CARGO="$(CARGO)" FUZZ_SECONDS="$(or $(FUZZ_SECONDS),600)" FUZZ_SUMMARY="$(FUZZ_SUMMARY)" bash fuzz/run.sh

integration: build
	AGENTFENSE_BIN=$(CURDIR)/$(BIN) $(PYTEST) -v -p no:cacheprovider integration

test: host lint unit fuzz-ci integration
	@cat $(FUZZ_SUMMARY)

demo: host install
	bash integration/demo.sh

# Figures, not assertions: the policy engine's decisions per second, and fenced workloads
# side by side with the native directory (BENCH_ARGS=--quick for a small run).
bench: build
	$(CARGO) bench --bench policy
	AGENTFENSE_BIN=$(CURDIR)/$(BIN) python3 benches/fence_bench.py $(BENCH_ARGS)

clean:
	$(CARGO) clean
