#!/usr/bin/env bash
# Prepares this Debian host for the end-to-end tests and the demo, as root:
#   host.sh install   Debian packages, the Python test runner (and the CRI client) and cargo-fuzz
#   host.sh start     dockerd (which starts its own containerd) unless one already answers
#   host.sh stop      stops what `start` started, nothing else
# Idempotent: safe to run again on a host that is already set up.
set -euo pipefail

STATE=/run/agentfense-test-host
CRI_API_VERSION=2.0.1
PKGS=(docker.io containerd runc podman fuse3 libseccomp-dev pkg-config busybox-static
      bindfs fuse-overlayfs jq rsync iptables uidmap slirp4netns conmon gcc libc6-dev
      g++ zsh fish)  # g++: libfuzzer-sys builds libFuzzer from C++ (make fuzz-ci); zsh, fish:
                     # the generated completions are checked by their own shells (test_docs)

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "host.sh: must run as root" >&2; exit 1; fi
}

install() {
    need_root
    local missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "host.sh: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    if ! python3 -c 'import pytest' 2>/dev/null; then
        python3 -m pip install -q pytest
    fi
    # test_cri.py: a CRI client (the Kubernetes CRI API's generated gRPC stubs, with grpcio and
    # protobuf) and PyYAML for config-examples/runtimeclass.yaml.
    if ! python3 -c 'import cri_api.v1.api_pb2_grpc, yaml' 2>/dev/null; then
        python3 -m pip install -q "container-runtime-interface-api==$CRI_API_VERSION" pyyaml
    fi
    install_cargo_fuzz
}

# cargo-fuzz, for the fuzz step of `make test` (fuzz/run.sh; stable Rust is enough).
install_cargo_fuzz() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "host.sh: cargo is missing: install the stable Rust toolchain (rustup) first" >&2
        exit 1
    fi
    if cargo fuzz --version >/dev/null 2>&1; then
        return 0
    fi
    echo "host.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
}

docker_up() {
    /usr/bin/docker info >/dev/null 2>&1
}

start() {
    need_root
    mkdir -p "$STATE"
    if docker_up; then
        echo "host.sh: dockerd already running"
        return 0
    fi
    echo "host.sh: starting dockerd"
    # dockerd starts its own containerd (socket /run/docker/containerd/containerd.sock).
    setsid dockerd >"$STATE/dockerd.log" 2>&1 < /dev/null &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 1 60); do
        docker_up && { echo "host.sh: dockerd up"; return 0; }
        sleep 1
    done
    echo "host.sh: dockerd did not come up; its log:" >&2
    tail -50 "$STATE/dockerd.log" >&2
    exit 1
}

stop() {
    if [ -f "$STATE/dockerd.pid" ]; then
        local pid
        pid=$(cat "$STATE/dockerd.pid")
        echo "host.sh: stopping dockerd ($pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$STATE/dockerd.pid"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: host.sh install|start|stop" >&2; exit 2 ;;
esac
