#!/usr/bin/env bash
# `make demo`: a fenced container over a sample repository, through Docker.
# Registers the installed agentfense-runc as Docker runtime `agentfense`, builds a small repo
# with secrets, sources and an output/ directory, and runs an "agent" in a container with the
# agent-safe preset: secrets do not exist for it, sources are read-only, output/ is writable,
# and its writes land in its own delta, not in the repository.
set -euo pipefail
BIN="${AGENTFENSE_BIN:-/usr/local/bin/agentfense-runc}"
DOCKER=/usr/bin/docker
IMAGE=agentfense-test/busybox:latest
here=$(dirname "$(readlink -f "$0")")
demo=/tmp/agentfense-demo
repo=$demo/repo

"$BIN" configure docker --name agentfense --runtime-path "$BIN"
kill -HUP "$(cat /var/run/docker.pid)"
for _ in $(seq 100); do
    $DOCKER info --format '{{json .Runtimes}}' | grep -q '"agentfense"' && break
    sleep 0.1
done

if ! $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,tmp,etc,proc,sys,dev}
    cp "$(command -v busybox)" "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
    tar -C "$root" -cf "$root.tar" .
    $DOCKER import -c 'ENV PATH=/bin' -c 'CMD ["sh"]' "$root.tar" "$IMAGE" >/dev/null
    rm -rf "$root" "$root.tar"
fi

rm -rf "$demo"
mkdir -p "$repo"/{src,tests,output,credentials,.git}
cat > "$repo/.env" <<'EOF'
OPENAI_API_KEY=sk-live-do-not-leak
DATABASE_URL=postgres://admin:hunter2@db/prod
EOF
echo "-----BEGIN PRIVATE KEY-----" > "$repo/deploy.pem"
echo "secret" > "$repo/signing.key"
echo '{"aws_secret_access_key": "abc"}' > "$repo/credentials/aws.json"
echo "[core]" > "$repo/.git/config"
cat > "$repo/src/app.py" <<'EOF'
import os

def main():
    # TODO: read the key from the environment, not from .env
    return os.environ.get("OPENAI_API_KEY")
EOF
printf 'def test_app():\n    # TODO: real test\n    assert True\n' > "$repo/tests/test_app.py"
echo "# Sample service" > "$repo/README.md"

name=agentfense-demo-$$
echo
echo "== the agent's view of $repo (docker run --runtime=agentfense -e AGENTFENSE_PRESET=agent-safe)"
set +e
$DOCKER run --name "$name" --runtime=agentfense -e AGENTFENSE_PRESET=agent-safe \
    -v "$repo:/workspace" -w /workspace "$IMAGE" sh -c '
run() { echo; echo "\$ $*"; sh -c "$*" 2>&1; }
run ls -a
run cat .env
run cat credentials/aws.json
run "find . -name \"*.key\" -o -name \"*.pem\""
run grep -rn TODO .
run "echo hacked >> src/app.py"
run "echo \"2 TODOs found\" > output/report.txt && cat output/report.txt"
'
set -e
id=$($DOCKER inspect -f '{{.Id}}' "$name")
$DOCKER rm "$name" >/dev/null
echo
echo "== on the host"
echo "\$ ls -A $repo/output"
if [ -z "$(ls -A "$repo/output")" ]; then echo "(empty: the repository itself is untouched)"; else ls -A "$repo/output"; fi
upper=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["workspaces"][0]["upper"])' \
    "/var/lib/agentfense/containers/$id/fence.json")
echo "\$ find $upper   # the container's writes, kept in its own delta"
find "$upper" -mindepth 1
echo
echo "== the audit trail (agentfense-runc audit ${id:0:12})"
"$BIN" audit "$id"
echo
"$BIN" audit verify "$id"
echo
echo "== what the agent touched, was refused, and never touched (agentfense-runc audit summary)"
"$BIN" audit summary "$id"
echo
echo "Left behind by this container: $(grep -c "agentfense:$id" /proc/mounts || true) fence mounts, $(pgrep -fc "containers/$id/daemon" || true) fence daemons."
