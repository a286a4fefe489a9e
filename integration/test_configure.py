"""`agentfense-runc configure`: the configurations it writes are the ones the engines run with.

Docker: the session's runtimes `agentfense` and `agentfense-cfg` are registered by configure
(conftest.py); here, dockerd runs them and a second configure finds nothing to do. podman: a
containers.conf written by configure (over the distribution's own) makes `--runtime agentfense`
name the binary, and a fenced run through it hides `.env`. containerd: the config it writes is
one containerd itself reads.
"""

import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from conftest import BIN, DAEMON_JSON, DOCKER, IMAGE, PODMAN, PODMAN_ULIMITS, sh

SYSTEM_CONTAINERS_CONF = Path("/usr/share/containers/containers.conf")
SYSTEM_CONTAINERD_TOML = Path("/etc/containerd/config.toml")


def backups(path):
    return sorted(path.parent.glob(path.name + ".agentfense-backup.*"))


def configure(*args, check=True):
    return sh([BIN, "configure", *args], check=check)


def test_docker_runs_the_runtimes_configure_registered(docker_engine, image):
    cfg = json.loads(DAEMON_JSON.read_text())
    assert cfg["runtimes"]["agentfense"] == {"path": str(BIN)}
    assert cfg["runtimes"]["agentfense-cfg"]["path"] == str(BIN)
    assert cfg["runtimes"]["agentfense-cfg"]["runtimeArgs"][0] == "--agentfense-config"
    loaded = json.loads(sh([DOCKER, "info", "--format", "{{json .Runtimes}}"], check=True).stdout)
    assert loaded["agentfense"]["path"] == str(BIN)
    # Registering again changes nothing and makes no backup.
    before = backups(DAEMON_JSON)
    text = DAEMON_JSON.read_text()
    out = configure("docker", "--config", DAEMON_JSON, "--name", "agentfense",
                    "--runtime-path", BIN).stdout
    assert "already configured" in out
    assert DAEMON_JSON.read_text() == text
    assert backups(DAEMON_JSON) == before
    r = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", IMAGE, "echo", "ok"], check=True)
    assert r.stdout == "ok\n"


@pytest.fixture
def podman_conf(tmp_path):
    """A containers.conf: the distribution's own, with runtime `agentfense` added by configure."""
    conf = tmp_path / "containers.conf"
    if SYSTEM_CONTAINERS_CONF.exists():
        shutil.copy(SYSTEM_CONTAINERS_CONF, conf)
    original = conf.read_text() if conf.exists() else None
    out = configure("podman", "--config", conf, "--runtime-path", BIN).stdout
    assert "engine.runtimes.agentfense" in out
    assert "podman --runtime agentfense" in out
    if original is not None:
        assert len(backups(conf)) == 1 and backups(conf)[0].read_text() == original
        # Only one line was added.
        added = set(conf.read_text().splitlines()) - set(original.splitlines())
        assert added == {f'agentfense = ["{BIN}"]'}, added
    assert "already configured" in configure("podman", "--config", conf, "--runtime-path", BIN).stdout
    assert len(backups(conf)) == (0 if original is None else 1)
    return conf


def test_podman_runs_the_runtime_configure_registered(podman_engine, podman_conf, tmp_path):
    env = dict(os.environ, CONTAINERS_CONF=str(podman_conf))
    base = [PODMAN, "--runtime", "agentfense", "--cgroup-manager", "cgroupfs"]
    info = sh([*base, "info", "--format", "{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Path}}"],
              env=env, check=True).stdout.split()
    assert info == ["agentfense", str(BIN)], info

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".env").write_text("TOKEN=secret\n")
    (ws / "README").write_text("hello\n")
    run = [*base, "run", "--rm", "--network", "none", *PODMAN_ULIMITS, "-v", f"{ws}:/workspace"]
    show = ["sh", "-c", "ls -a /workspace; cat /workspace/README; cat /workspace/.env; true"]

    plain = sh([*run, IMAGE, *show], env=env, check=True)
    assert ".env" in plain.stdout.split() and "TOKEN=secret" in plain.stdout

    fenced = sh([*run, "--annotation", "agentfense.io/preset=agent-safe", IMAGE, *show],
                env=env, check=True)
    names = fenced.stdout.split()
    assert "README" in names and "hello" in names, fenced.stdout
    assert ".env" not in names and "TOKEN=secret" not in fenced.stdout, fenced.stdout
    assert (ws / ".env").read_text() == "TOKEN=secret\n"


def test_containerd_reads_the_config_configure_wrote(tmp_path):
    containerd = shutil.which("containerd") or "/usr/bin/containerd"
    if not os.path.exists(containerd):
        pytest.fail("containerd is missing (integration/host.sh install)")
    conf = tmp_path / "config.toml"
    if SYSTEM_CONTAINERD_TOML.exists():
        shutil.copy(SYSTEM_CONTAINERD_TOML, conf)
    out = configure("containerd", "--config", conf, "--runtime-path", BIN).stdout
    assert "restart containerd" in out
    dump = tomllib.loads(sh([containerd, "--config", conf, "config", "dump"], check=True).stdout)
    cri = dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    rt = cri["runtimes"]["agentfense"]
    assert rt["runtime_type"] == "io.containerd.runc.v2"
    assert rt["pod_annotations"] == ["agentfense.io/*"]
    assert rt["options"]["BinaryName"] == str(BIN)
    # The rest of the configuration is what it was: runc is still the default.
    assert cri["default_runtime_name"] == "runc"
    assert "runc" in cri["runtimes"]
    # A malformed file is refused and left as it is.
    conf.write_text("version = 2\n[plugins\n")
    r = configure("containerd", "--config", conf, "--runtime-path", BIN, check=False)
    assert r.returncode == 1 and "not valid TOML" in r.stderr
    assert conf.read_text() == "version = 2\n[plugins\n"
