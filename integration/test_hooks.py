"""The OCI hooks (hooks/): podman running stock runc, fenced by `agentfense-runc hook
precreate|poststop` from a hooks directory (`--hooks-dir`) holding the shipped hooks.d JSON
files, pointed at the freshly built binary.

A fenced container sees the policy (hidden `.env`, read-only sources, writes to output/ in
its delta), its fence is gone once it exits, its audit trail stays; a container without
annotations is not touched; a bad request makes podman refuse to create the container, with
the hook's reason; a runtime create that fails after the hook fenced leaves nothing running. `gc` keeps a hook
fence while its daemon runs or podman has the container, and collects one whose record was
left live when podman never created the container.
"""

import fcntl
import json
import os
import pty
import shutil
import subprocess
import termios
from pathlib import Path

import pytest

from conftest import BIN, IMAGE, PODMAN, PODMAN_ULIMITS, REPO, sh, unique, wait_for

RUNC = shutil.which("runc")
STATE = Path("/var/lib/agentfense")
SHIPPED = REPO / "hooks"
INSTALLED_PATH = "/usr/local/bin/agentfense-runc"


@pytest.fixture(scope="session")
def hooks_dir(tmp_path_factory, agentfense_bin):
    """The shipped hooks.d files, their program pointed at the built binary."""
    if RUNC is None:
        pytest.fail("runc is not installed")
    d = tmp_path_factory.mktemp("hooks.d")
    files = sorted(SHIPPED.glob("*.json"))
    assert files, "hooks/ ships no JSON file"
    for f in files:
        hook = json.loads(f.read_text())
        assert hook["hook"]["path"] == INSTALLED_PATH, f
        hook["hook"]["path"] = str(agentfense_bin)
        (d / f.name).write_text(json.dumps(hook))
    return d


def podman(hooks_dir, *args):
    return [PODMAN, "--runtime", RUNC, "--hooks-dir", hooks_dir, "--cgroup-manager", "cgroupfs",
            *args]


def run_args(*args):
    return ["run", "--network", "none", *PODMAN_ULIMITS, *args]


FENCE = ["--annotation", "agentfense.io/preset=agent-safe", "--annotation",
         "agentfense.io/workspace=/w"]


def container_id(hooks_dir, name):
    return sh(podman(hooks_dir, "inspect", "-f", "{{.Id}}", name), check=True).stdout.strip()


def fence_of(cid):
    """The container's fence mounts and fence daemons on the host."""
    mounts = [l for l in Path("/proc/mounts").read_text().splitlines()
              if l.split()[0] == f"agentfense:{cid}"]
    daemons = [l for l in sh(["pgrep", "-af", "fence-daemon"]).stdout.splitlines() if cid in l]
    return mounts, daemons


def no_leftovers(cid):
    wait_for(lambda: fence_of(cid) == ([], []), f"the fence of {cid} to go away", timeout=15)


def record(cid):
    return json.loads((STATE / "containers" / cid / "fence.json").read_text())


def make_repo(root):
    (root / "src").mkdir(parents=True)
    (root / "output").mkdir()
    (root / ".env").write_text("SECRET=1\n")
    (root / "src" / "main.py").write_text("print('hi')\n")
    return root


def under_tty(cmd, timeout=120):
    """Runs cmd with a pseudo-terminal as its controlling terminal and stdio, as a user at a
    terminal would; returns (exit code, everything written to the terminal)."""
    master, slave = pty.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([str(c) for c in cmd], stdin=slave, stdout=slave, stderr=slave,
                         preexec_fn=own_terminal)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=timeout), out.decode(errors="replace")


def test_shipped_hooks_match_on_the_annotations(hooks_dir):
    by_stage = {}
    for f in SHIPPED.glob("*.json"):
        hook = json.loads(f.read_text())
        assert hook["version"] == "1.0.0"
        assert hook["when"] == {"annotations": {"^agentfense\\.io/": ".*"}}
        for stage in hook["stages"]:
            by_stage[stage] = hook["hook"]["args"]
    assert by_stage == {"precreate": ["agentfense-runc", "hook", "precreate"],
                        "poststop": ["agentfense-runc", "hook", "poststop"]}


def test_hook_fences_a_container_under_stock_runc(podman_engine, hooks_dir, tmp_path):
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    script = ("ls -a /w; cat /w/.env; "
              "echo x >> /w/src/main.py && echo wrote-src || echo refused-src; "
              "echo out > /w/output/o.txt && echo wrote-out; cat /w/output/o.txt; "
              "grep ' /w ' /proc/mounts | cut -d' ' -f3")
    try:
        p = sh(podman(hooks_dir, *run_args("--name", name, *FENCE, "-v", f"{repo}:/w", IMAGE,
                                           "sh", "-c", script)))
        assert p.returncode == 0, p.stderr
        listing, rest = p.stdout.split("refused-src")[0], p.stdout
        assert ".env" not in listing.split() and "src" in listing.split(), p.stdout
        assert "can't open '/w/.env': No such file or directory" in p.stderr, p.stderr
        assert "can't create /w/src/main.py: Permission denied" in p.stderr, p.stderr
        assert "refused-src" in rest and "wrote-out\nout\nfuse\n" in rest, p.stdout
        # The host's repository is untouched: the write is in the container's delta.
        assert (repo / "src" / "main.py").read_text() == "print('hi')\n"
        assert not (repo / "output" / "o.txt").exists()
        cid = container_id(hooks_dir, name)
        # The container exited: podman ran the poststop hook, the fence is down.
        no_leftovers(cid)
        rec = record(cid)
        assert rec["runtime_root"] == "hook:podman" and rec["live"] is False, rec
        upper = Path(rec["workspaces"][0]["upper"])
        assert (upper / "output" / "o.txt").read_text() == "out\n"
        diff = sh([BIN, "diff", cid], check=True).stdout
        assert "A /w/output/o.txt" in diff, diff

        # Started again, it is fenced again, over the delta it kept.
        p = sh(podman(hooks_dir, "start", "-a", name))
        assert p.returncode == 0, p.stderr
        assert "refused-src" in p.stdout and "wrote-out\nout\nfuse\n" in p.stdout, p.stdout
        no_leftovers(cid)
    finally:
        sh(podman(hooks_dir, "rm", "-f", name))
    no_leftovers(cid)
    # The audit trail outlives the container, chain intact.
    events = [json.loads(l)["event"] for l in
              (STATE / "containers" / cid / "audit.jsonl").read_text().splitlines()]
    assert events[0] == "create" and events[-1] == "delete", events
    assert events.count("create") == 2 and events.count("delete") == 2, events
    v = sh([BIN, "audit", "verify", cid])
    assert v.returncode == 0, v.stdout + v.stderr
    summary = json.loads(sh([BIN, "audit", "summary", cid, "--format", "json"], check=True).stdout)
    assert summary, summary


def test_container_without_annotations_is_untouched(podman_engine, hooks_dir, tmp_path):
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    try:
        p = sh(podman(hooks_dir, *run_args("--name", name, "-v", f"{repo}:/w", IMAGE, "sh", "-c",
                                           "cat /w/.env; echo x > /w/src/new.txt; "
                                           "grep ' /w ' /proc/mounts | cut -d' ' -f3")))
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("SECRET=1\n") and "fuse" not in p.stdout, p.stdout
        assert (repo / "src" / "new.txt").read_text() == "x\n"
        cid = container_id(hooks_dir, name)
        assert fence_of(cid) == ([], [])
        assert not (STATE / "containers" / cid).exists()
    finally:
        sh(podman(hooks_dir, "rm", "-f", name))


@pytest.mark.parametrize("annotation,reason", [
    ("agentfense.io/preset=bogus", 'unknown preset "bogus"'),
    # Valid request, but nothing to fence at /nowhere: fails after the state directory is made.
    ("agentfense.io/workspace=/nowhere", "workspace /nowhere is neither a bind mount"),
])
def test_bad_request_makes_podman_refuse_the_container(podman_engine, hooks_dir, tmp_path,
                                                       annotation, reason):
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    log = STATE / "hooks.log"
    before = log.read_text() if log.exists() else ""
    extra = [] if annotation.startswith("agentfense.io/preset") else [
        "--annotation", "agentfense.io/preset=agent-safe"]
    try:
        code, out = under_tty(podman(hooks_dir, *run_args(
            "--name", name, "--annotation", annotation, *extra, "-v", f"{repo}:/w", IMAGE,
            "sh", "-c", "echo ran")))
        assert code != 0, out
        assert "ran" not in out.split(), out
        # podman's own error names the hook; the hook's reason reaches the terminal.
        assert "precreate hook" in out, out
        assert "container refused" in out and reason in out, out
        assert reason in (log.read_text()[len(before):]), "the refusal is not in hooks.log"
        cid = sh(podman(hooks_dir, "inspect", "-f", "{{.Id}}", name)).stdout.strip()
        if cid:
            assert fence_of(cid) == ([], [])
            assert sh(podman(hooks_dir, "inspect", "-f", "{{.State.Status}}", name)
                      ).stdout.strip() != "running"
            rec_path = STATE / "containers" / cid / "fence.json"
            assert not rec_path.exists() or record(cid)["live"] is False
    finally:
        sh(podman(hooks_dir, "rm", "-f", name))


def test_failed_runtime_create_leaves_no_fence(podman_engine, hooks_dir, tmp_path):
    """runc's create fails after the hook fenced: podman runs no poststop hook for a container
    the runtime never created, but runc runs the spec's own, which the hook added."""
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    try:
        p = sh(podman(hooks_dir, *run_args("--name", name, *FENCE, "-v", f"{repo}:/w", IMAGE,
                                           "/nonexistent")))
        assert p.returncode in (126, 127), (p.returncode, p.stderr)
        assert "/nonexistent" in p.stderr, p.stderr
        cid = container_id(hooks_dir, name)
        no_leftovers(cid)
        assert record(cid)["live"] is False
    finally:
        sh(podman(hooks_dir, "rm", "-f", name))


def test_detached_container_exec_and_stop(podman_engine, hooks_dir, tmp_path):
    """`run -d`: the fence stays up while the container runs (`exec` sees it too) and goes
    when `podman stop` ends it (podman's cleanup process runs the saved poststop hook)."""
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    try:
        sh(podman(hooks_dir, *run_args("-d", "--name", name, *FENCE, "-v", f"{repo}:/w", IMAGE,
                                       "sleep", "1000")), check=True)
        cid = container_id(hooks_dir, name)
        mounts, daemons = fence_of(cid)
        assert len(mounts) == 1 and len(daemons) == 1, (mounts, daemons)
        assert record(cid)["live"] is True
        p = sh(podman(hooks_dir, "exec", name, "sh", "-c",
                      "ls -a /w; cat /w/src/main.py; echo y > /w/src/main.py || echo refused"))
        assert ".env" not in p.stdout.split() and "print('hi')" in p.stdout, p.stdout
        assert "refused" in p.stdout, p.stdout
        sh(podman(hooks_dir, "stop", "-t", "1", name), check=True)
        no_leftovers(cid)
        wait_for(lambda: record(cid)["live"] is False, "the fence record to be closed")
    finally:
        sh(podman(hooks_dir, "rm", "-f", name))
    assert (repo / "src" / "main.py").read_text() == "print('hi')\n"


@pytest.fixture
def private_hooks(tmp_path, agentfense_bin):
    """The shipped hooks with `--agentfense-config` (as hooks/README.md says to pass settings)
    naming a private state directory, so that `gc` here sees only this test's containers.
    Returns (hooks dir, the runtime's command prefix for that configuration, state dir)."""
    if RUNC is None:
        pytest.fail("runc is not installed")
    state = tmp_path / "state"
    cfg = tmp_path / "agentfense.json"
    cfg.write_text(json.dumps({"state_dir": str(state)}))
    d = tmp_path / "hooks.d"
    d.mkdir()
    for f in sorted(SHIPPED.glob("*.json")):
        hook = json.loads(f.read_text())
        args = hook["hook"]["args"]
        assert args[1] == "hook", args
        hook["hook"]["path"] = str(agentfense_bin)
        hook["hook"]["args"] = [args[0], "--agentfense-config", str(cfg), *args[1:]]
        (d / f.name).write_text(json.dumps(hook))
    return d, [str(agentfense_bin), "--agentfense-config", str(cfg)], state


def daemon_pids(state, cid):
    rec = json.loads((state / "containers" / cid / "fence.json").read_text())
    return [w["daemon"]["pid"] for w in rec["workspaces"] if w.get("daemon")]


def kill_daemons(state, cid):
    pids = daemon_pids(state, cid)
    assert pids
    for pid in pids:
        os.kill(pid, 9)
    wait_for(lambda: fence_of(cid)[1] == [], "the fence daemons to die")


def test_gc_collects_a_hook_fence_podman_never_created(podman_engine, private_hooks, tmp_path):
    """A precreate hook after ours fails: podman refuses the container (and `--rm` forgets
    it), the runtime never creates it, no poststop runs, and our fence stays up with its
    record live. gc keeps it while its daemon runs; once the daemon is dead it tears the dead
    mount down and removes the state."""
    hooks, af, state = private_hooks
    (hooks / "zzz-fail.json").write_text(json.dumps({
        "version": "1.0.0", "hook": {"path": shutil.which("false"), "args": ["false"]},
        "when": {"always": True}, "stages": ["precreate"]}))
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    p = sh(podman(hooks, *run_args("--rm", "--name", name, *FENCE, "-v", f"{repo}:/w", IMAGE,
                                   "true")))
    assert p.returncode != 0 and "precreate hook" in p.stderr, (p.returncode, p.stderr)
    assert sh(podman(hooks, "container", "exists", name)).returncode == 1
    [cid] = os.listdir(state / "containers")
    rec = json.loads((state / "containers" / cid / "fence.json").read_text())
    assert rec["runtime_root"] == "hook:podman" and rec["live"] is True, rec
    mounts, daemons = fence_of(cid)
    assert len(mounts) == 1 and len(daemons) == 1, (mounts, daemons)

    pid = daemon_pids(state, cid)[0]
    out = sh([*af, "gc", "-v"], check=True).stdout
    assert out == f"kept {cid}: its fence is live (daemon {pid})\n", out

    kill_daemons(state, cid)
    assert len(fence_of(cid)[0]) == 1, "the dead fence's mount should still be there"
    out = sh([*af, "gc", "--dry-run", "-v"], check=True).stdout
    assert out == f"would remove {cid}\n", out
    assert (state / "containers" / cid).exists()
    out = sh([*af, "gc", "-v"], check=True).stdout
    assert out == f"removed {cid}\n", out
    assert fence_of(cid) == ([], [])
    assert os.listdir(state / "containers") == []
    assert (repo / ".env").read_text() == "SECRET=1\n"


def test_gc_keeps_a_hook_fence_while_podman_has_the_container(podman_engine, private_hooks,
                                                              tmp_path):
    """The fence daemon of a running hook-fenced container dies (the workspace fails closed):
    its record is still live, and podman still has the container, so gc keeps its state (the
    delta is the container's, for its next start). Once podman removes it (poststop), gc
    removes the state."""
    hooks, af, state = private_hooks
    repo = make_repo(tmp_path / "repo")
    name = unique("hook")
    try:
        sh(podman(hooks, *run_args("-d", "--name", name, *FENCE, "-v", f"{repo}:/w", IMAGE,
                                   "sh", "-c", "echo kept > /w/output/o.txt; sleep 1000")),
           check=True)
        cid = container_id(hooks, name)
        wait_for(lambda: (state / "containers" / cid / "fence.json").exists(), "the fence")
        kill_daemons(state, cid)
        p = sh(podman(hooks, "exec", name, "ls", "/w"))
        assert p.returncode != 0, p.stdout  # fails closed
        out = sh([*af, "gc", "-v"], check=True).stdout
        assert out.startswith(f"kept {cid}: an engine still has it (") or \
            out == f"kept {cid}: podman still has it\n", out
        assert (state / "containers" / cid / "upper").exists()
    finally:
        sh(podman(hooks, "rm", "-f", "-t", "0", name))
    wait_for(lambda: json.loads((state / "containers" / cid / "fence.json").read_text())["live"]
             is False, "poststop to close the record")
    assert fence_of(cid) == ([], [])
    out = sh([*af, "gc", "-v"], check=True).stdout
    assert out == f"removed {cid}\n", out
    assert os.listdir(state / "containers") == []
    assert not (repo / "output" / "o.txt").exists()
