#!/usr/bin/env bash
# `make demo`: registers the installed agentfense-runc with Docker and runs a container with it.
# Today this shows the runtime standing in for runc; the fenced workspace (hidden .env, refused
# writes, audit trail) is the fence issue's part of the demo and is added to this script there.
set -euo pipefail
BIN="${AGENTFENSE_BIN:-/usr/local/bin/agentfense-runc}"
DOCKER=/usr/bin/docker
IMAGE=agentfense-test/busybox:latest
here=$(dirname "$(readlink -f "$0")")

# Register the runtime (merge into daemon.json, keep a backup, reload dockerd).
python3 "$here/register_docker.py" agentfense "$BIN"

if ! $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,tmp,etc,proc,sys,dev}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
    tar -C "$root" -cf "$root.tar" .
    $DOCKER import -c 'ENV PATH=/bin' -c 'CMD ["sh"]' "$root.tar" "$IMAGE" >/dev/null
    rm -rf "$root" "$root.tar"
fi

echo "== docker run --runtime=agentfense $IMAGE"
$DOCKER run --rm --runtime=agentfense "$IMAGE" sh -c 'echo "hello from a container run by agentfense-runc"; uname -sr'
echo "== the reason a container failed reaches the user:"
$DOCKER run --rm --runtime=agentfense "$IMAGE" /nonexistent || echo "(exit code $?)"
