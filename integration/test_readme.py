"""README.md's Docker quick start, run verbatim.

The shell blocks marked `<!-- test_readme: docker -->` are extracted from README.md and run by
bash as they are written: `make install` in the repository, `agentfense-runc configure docker`,
`kill -HUP "$(pidof dockerd)"`, then the fenced `docker run` in a fresh directory with a `.env`.
What the container prints must be the output the README shows under them: `.env` is hidden.

This touches the host as a newcomer's machine is touched (binary, completions and man pages
under /usr/local, /etc/docker/daemon.json). On CI that is a fresh machine; here and there, the
test puts everything back: daemon.json as it was (dockerd reloaded), the backups configure made
removed, files under /usr/local restored or removed, the `busybox` tag as it was. Two things of
the environment are set, not the commands: `make` gets `CARGO=true BIN=<binary under test>`
(the suite's binary is the build; cargo is not run again over a tree others may be editing),
and `busybox:latest` is the suite's local busybox image (no registry here; Docker uses a local
image before pulling).
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, DAEMON_JSON, DOCKER, IMAGE, REPO, reload_dockerd, sh, wait_for

README = REPO / "README.md"
MARK = "<!-- test_readme: docker -->"
PREFIX = Path("/usr/local")
INSTALLED = [
    "bin/agentfense-runc",
    "share/bash-completion/completions/agentfense-runc",
    "share/zsh/site-functions/_agentfense-runc",
    "share/fish/vendor_completions.d/agentfense-runc.fish",
]
STATE = Path("/var/lib/agentfense/containers")


def marked_blocks(text):
    """(the shell block after each marker, the plain block right after it if any)."""
    out = []
    for m in re.finditer(re.escape(MARK) + r"\n```sh\n(.*?)```\n", text, re.S):
        rest = text[m.end():]
        shown = re.match(r"\n(?:[^\n`][^\n]*\n)*?\n?```\n(.*?)```\n", rest, re.S)
        out.append((m.group(1), shown.group(1) if shown else None))
    return out


def installed_files():
    files = [PREFIX / f for f in INSTALLED]
    man1 = PREFIX / "share" / "man" / "man1"
    if man1.is_dir():
        files += sorted(man1.glob("agentfense-runc*.1"))
    return files


@pytest.fixture
def host_as_found(docker_engine, image, tmp_path):
    """Saves what the quick start changes on the host, and puts it back afterwards."""
    saved = tmp_path / "saved"
    saved.mkdir()
    before_files = {}
    for f in installed_files():
        if f.exists():
            copy = saved / str(len(before_files))
            shutil.copy2(f, copy)
            before_files[f] = copy
    dirs = [PREFIX / "share" / d for d in ("man/man1", "man", "bash-completion/completions",
                                           "bash-completion", "zsh/site-functions", "zsh",
                                           "fish/vendor_completions.d", "fish")]
    dirs_before = {d for d in dirs if d.exists()}
    daemon_json = DAEMON_JSON.read_text()
    backups = set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*"))
    busybox = sh([DOCKER, "image", "inspect", "-f", "{{.Id}}", "busybox:latest"]).stdout.strip()
    sh([DOCKER, "tag", IMAGE, "busybox:latest"], check=True)
    states = set(os.listdir(STATE)) if STATE.exists() else set()
    yield
    DAEMON_JSON.write_text(daemon_json)
    for b in set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*")) - backups:
        b.unlink()
    reload_dockerd()
    for f in installed_files():
        if f not in before_files:
            f.unlink()
    for f, copy in before_files.items():
        tmp = f.with_name(f.name + ".test-restore")
        shutil.copy2(copy, tmp)
        os.replace(tmp, f)
    for d in dirs:  # deepest first
        if d not in dirs_before and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    if busybox:
        sh([DOCKER, "tag", busybox, "busybox:latest"], check=True)
    else:
        sh([DOCKER, "rmi", "busybox:latest"], check=True)
    for s in (set(os.listdir(STATE)) if STATE.exists() else set()) - states:
        rec = STATE / s / "fence.json"
        if rec.exists() and str(tmp_path) in rec.read_text():
            shutil.rmtree(STATE / s, ignore_errors=True)


def bash(script, cwd, env):
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def runtimes():
    out = sh([DOCKER, "info", "--format", "{{json .Runtimes}}"], check=True).stdout
    return json.loads(out)


def test_readme_docker_quick_start_verbatim(host_as_found, agentfense_bin, tmp_path):
    blocks = marked_blocks(README.read_text())
    assert len(blocks) == 2, "README.md must mark the install block and the docker run block"
    (install, _), (demo, shown) = blocks
    assert "make install" in install and "configure docker" in install
    assert "docker run" in demo and shown, "the docker run block must be followed by its output"

    env = {
        "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path), "LANG": "C.UTF-8",
        "MAKEFLAGS": f"CARGO=true BIN={agentfense_bin}",
    }
    started = time.monotonic()
    p = bash(install, REPO, env)
    assert p.returncode == 0, p.stdout + p.stderr
    installed = PREFIX / "bin" / "agentfense-runc"
    assert installed.read_bytes() == Path(agentfense_bin).read_bytes()
    assert (PREFIX / "share" / "man" / "man1" / "agentfense-runc.1").is_file()
    cfg = json.loads(DAEMON_JSON.read_text())
    assert cfg["runtimes"]["agentfense"]["path"] == str(installed), cfg
    # dockerd reloads in the background after SIGHUP (as a person typing the next block waits).
    wait_for(lambda: runtimes().get("agentfense", {}).get("path") == str(installed),
             "dockerd to load the runtime configure registered")

    p = bash(demo, tmp_path, env)
    took = time.monotonic() - started
    # The container's last command, `cat .env`, fails: docker run exits with its status.
    assert p.returncode == 1, p.stdout + p.stderr
    # What the README shows: stdout, then cat's complaint on stderr.
    assert p.stdout + p.stderr == shown, (p.stdout, p.stderr, shown)
    assert ".env" not in p.stdout.split()
    demo_dir = tmp_path / "agentfense-demo"
    assert (demo_dir / ".env").read_text() == "API_KEY=sk-live-123\n"
    # The fence, not luck: the container's audit trail has the probe of the hidden .env.
    fenced = [s for s in os.listdir(STATE) if (STATE / s / "fence.json").exists()
              and str(demo_dir) in (STATE / s / "fence.json").read_text(errors="replace")]
    assert len(fenced) == 1, fenced
    hidden = sh([BIN, "audit", fenced[0], "--decision", "hidden", "--format", "json"],
                check=True).stdout
    assert any(json.loads(l).get("path") == "/.env" for l in hidden.splitlines()), hidden
    assert took < 300, took
