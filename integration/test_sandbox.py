"""`agentfense-runc sandbox`: one fenced command over the host's system directories, no engine.

Runs the real runtime (as root) with the host's own grep, find, cat, sh, bound read-only into the
sandbox. Every run uses its own --id, and after each test nothing of it may be left: no mount,
no fence daemon, no bundle, no runtime state (the delta and audit trail stay, by design, in the
state directory, and are removed by the test).
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, sh, unique

STATE = Path("/var/lib/agentfense/containers")
ROOT = Path("/run/agentfense-runc")
BUNDLES = ROOT / "agentfense:sandbox"
SECRET = "sk-live-0123456789"


@pytest.fixture
def repo(tmp_path, agentfense_bin):
    r = tmp_path / "repo"
    files = {
        "README.md": "# demo\n",
        "src/app.py": "import os\n\n# TODO: read the key from the environment\nprint('hi')\n",
        "src/util.py": "def f():\n    return 1  # TODO\n",
        ".env": f"API_KEY={SECRET}\n",
        "secrets/key.pem": f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n",
        "config/credentials.json": f'{{"token": "{SECRET}"}}\n',
        ".git/config": "[core]\n",
        "output/.keep": "",
    }
    for name, text in files.items():
        p = r / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return r


@pytest.fixture
def ids():
    """Sandbox ids used by a test; checked for leftovers and their state removed after it."""
    used = []
    yield used
    for i in used:
        assert_clean(i)
        shutil.rmtree(STATE / i, ignore_errors=True)


def assert_clean(sid):
    mounts = [l for l in Path("/proc/mounts").read_text().splitlines() if sid in l]
    assert not mounts, mounts
    daemons = [p for p in pids_with(f"containers/{sid}/")]
    assert not daemons, daemons
    assert not (ROOT / sid).exists(), f"runtime state of {sid} left"
    if BUNDLES.exists():
        left = [b.name for b in BUNDLES.iterdir() if b.name.startswith(sid + ".")]
        assert not left, left


def pids_with(fragment):
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            out.append((int(d.name), cmd))
    return out


def sandbox(ids, repo, *cmd, opts=("--preset", "agent-safe"), sid=None, input=None, timeout=60):
    sid = sid or unique("sbx")
    if sid not in ids:
        ids.append(sid)
    return sh([BIN, "sandbox", "--id", sid, *opts, repo, "--", *cmd], input=input, timeout=timeout)


def test_grep_find_cat_ls_see_only_what_the_policy_shows(repo, ids):
    p = sandbox(ids, repo, "grep", "-rn", "TODO", ".")
    assert p.returncode == 0, p.stderr
    assert "./src/app.py:3:# TODO" in p.stdout
    assert "./src/util.py" in p.stdout

    p = sandbox(ids, repo, "grep", "-r", SECRET, ".")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert SECRET not in p.stdout + p.stderr

    p = sandbox(ids, repo, "cat", ".env")
    assert p.returncode == 1
    assert "No such file or directory" in p.stderr
    assert SECRET not in p.stdout

    p = sandbox(ids, repo, "cat", "secrets/key.pem")
    assert p.returncode == 1 and "No such file or directory" in p.stderr

    p = sandbox(ids, repo, "find", ".")
    assert p.returncode == 0, p.stderr
    found = set(p.stdout.split())
    assert {"./src/app.py", "./src/util.py", "./README.md", "./output"} <= found
    for hidden in (".env", "secrets", "key.pem", "credentials", ".git"):
        assert not any(hidden in f for f in found), (hidden, found)

    p = sandbox(ids, repo, "ls", "-a")
    assert p.returncode == 0
    names = set(p.stdout.split())
    assert "src" in names and ".env" not in names and ".git" not in names

    # The working directory is the workspace, and `pwd` says so.
    assert sandbox(ids, repo, "pwd").stdout.strip() == "/workspace"


def test_writes_follow_the_policy_and_land_in_the_delta(repo, ids):
    sid = unique("sbx")
    before = (repo / "src/app.py").read_text()
    p = sandbox(ids, repo, "sh", "-c", "echo hacked >> src/app.py", sid=sid)
    assert p.returncode != 0
    assert "Permission denied" in p.stderr
    p = sandbox(ids, repo, "sh", "-c", "echo evil > new.py", sid=sid)
    assert p.returncode != 0 and "Permission denied" in p.stderr

    p = sandbox(ids, repo, "sh", "-c", "echo '2 TODOs' > output/report.txt && cat output/report.txt",
                sid=sid)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "2 TODOs\n"
    # The host is untouched (delta keep, the default); the delta holds the report.
    assert (repo / "src/app.py").read_text() == before
    assert not (repo / "output/report.txt").exists()
    assert not (repo / "new.py").exists()
    d = sh([BIN, "diff", sid], check=True)
    assert "A /workspace/output/report.txt" in d.stdout.splitlines()
    assert "/workspace/src/app.py" not in d.stdout
    # The audit trail records the refusal and the write.
    audit = [json.loads(l) for l in (STATE / sid / "audit.jsonl").read_text().splitlines()]
    assert any(r.get("decision") == "deny" and r.get("path") == "/src/app.py" for r in audit)
    assert any(r.get("path") == "/output/report.txt" and r.get("decision") == "allow" for r in audit)


def test_exit_codes_pass_through(repo, ids):
    assert sandbox(ids, repo, "sh", "-c", "exit 7").returncode == 7
    assert sandbox(ids, repo, "false").returncode == 1
    assert sandbox(ids, repo, "true").returncode == 0
    p = sandbox(ids, repo, "no-such-command")
    assert p.returncode == 127 and "no-such-command" in p.stderr
    p = sandbox(ids, repo, "sh", "-c", "sleep 30 & kill -KILL $!; wait $!")
    assert p.returncode == 137


def test_signals_reach_the_command(repo, ids):
    sid = unique("sbx")
    ids.append(sid)
    # sleep neither handles nor ignores SIGTERM: it ends as it would outside (143), although
    # it is the sandbox's pid 1.
    proc = subprocess.Popen([str(BIN), "sandbox", "--id", sid, "--preset", "agent-safe", str(repo),
                             "--", "sh", "-c", "echo up; exec sleep 30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    # A command that handles the signal decides for itself.
    sid2 = unique("sbx")
    ids.append(sid2)
    proc = subprocess.Popen([str(BIN), "sandbox", "--id", sid2, "--preset", "agent-safe", str(repo),
                             "--", "sh", "-c",
                             "trap 'echo caught; exit 9' INT; echo up; while :; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 9 and "caught" in out, (out, err)


def test_piped_stdin_and_large_output(repo, ids):
    p = sandbox(ids, repo, "cat", input="hi\n")
    assert p.returncode == 0 and p.stdout == "hi\n"
    lines = "".join(f"line {i}\n" for i in range(50000))
    p = sandbox(ids, repo, "wc", "-l", input=lines)
    assert p.stdout.strip() == "50000"
    p = sandbox(ids, repo, "sh", "-c", "seq 1 200000")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 200000
    # The shell reads its script from stdin, as an agent would pipe one.
    p = sandbox(ids, repo, "sh", input="cd src\ngrep -c TODO app.py\nexit 4\n")
    assert p.returncode == 4 and p.stdout == "1\n"


def test_a_bad_policy_is_refused_before_anything_runs(repo, ids, tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "policy.json"
    bad.write_text('{"rules": [{"pattern": "**", "permission": "read"}')  # truncated JSON
    cases = [
        ("--policy", bad),
        ("--preset", "agent-unsafe"),
        ("--policy", tmp_path / "missing.json"),
    ]
    for opts in cases:
        sid = unique("sbx")
        p = sandbox(ids, repo, "sh", "-c", f"touch {marker}", opts=opts, sid=sid)
        assert p.returncode == 125, (opts, p.returncode, p.stderr)
        assert str(opts[1]) in p.stderr, p.stderr
        assert not marker.exists()
        assert not (STATE / sid).exists(), "state made for a refused sandbox"
    assert "invalid JSON" in sandbox(ids, repo, "true", opts=("--policy", bad)).stderr
    # A bad delta or audit value, a policy rule with an unknown level, no policy at all.
    bad_rule = tmp_path / "rule.json"
    bad_rule.write_text('[{"pattern": "**", "permission": "rw"}]')
    for opts, word in [
        (("--preset", "agent-safe", "--delta", "sometimes"), "--delta"),
        (("--preset", "agent-safe", "--audit", "loud"), "--audit"),
        (("--policy", bad_rule), "rw"),
        ((), "no policy"),
    ]:
        p = sandbox(ids, repo, "true", opts=opts)
        assert p.returncode == 125 and word in p.stderr, (opts, p.stderr)


def test_a_session_id_shares_one_delta(repo, ids, tmp_path):
    sid = unique("session")
    p = sandbox(ids, repo, "sh", "-c", "echo step1 > output/notes.txt", sid=sid,
                opts=("--preset", "agent-safe", "--print-id"))
    assert p.returncode == 0, p.stderr
    assert f"sandbox ID: {sid}" in p.stderr
    assert str(STATE / sid) in p.stderr
    p = sandbox(ids, repo, "sh", "-c", "cat output/notes.txt; echo step2 >> output/notes.txt",
                sid=sid)
    assert p.stdout == "step1\n", p.stderr
    p = sandbox(ids, repo, "cat", "output/notes.txt", sid=sid)
    assert p.stdout == "step1\nstep2\n"
    assert not (repo / "output/notes.txt").exists()
    assert (STATE / sid / "upper").is_dir()
    # Another id starts from the base.
    p = sandbox(ids, repo, "cat", "output/notes.txt")
    assert p.returncode == 1
    # A fresh id is made when none is given, and printed on request.
    p = sh([BIN, "sandbox", "--print-id", "--preset", "read-only", repo, "--", "true"])
    assert p.returncode == 0, p.stderr
    fresh = [l.split(": ", 1)[1] for l in p.stderr.splitlines() if l.startswith("sandbox ID: ")]
    assert len(fresh) == 1 and fresh[0].startswith("sbx-")
    ids.append(fresh[0])


def test_a_running_id_is_refused(repo, ids):
    sid = unique("sbx")
    ids.append(sid)
    proc = subprocess.Popen([str(BIN), "sandbox", "--id", sid, "--preset", "agent-safe", str(repo),
                             "--", "sh", "-c", "echo up; sleep 3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    p = sandbox(ids, repo, "true", sid=sid)
    assert p.returncode == 125 and "already running" in p.stderr, p.stderr
    proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_delta_commit_lands_on_the_host(repo, ids):
    p = sandbox(ids, repo, "sh", "-c", "echo done > output/result.txt; echo x >> src/app.py",
                opts=("--preset", "agent-safe", "--delta", "commit"))
    assert p.returncode != 0  # the write to src/app.py is refused
    assert (repo / "output/result.txt").read_text() == "done\n"
    assert "echo x" not in (repo / "src/app.py").read_text()
    p = sandbox(ids, repo, "sh", "-c", "echo direct > output/direct.txt",
                opts=("--preset", "agent-safe", "--delta", "off", "--audit", "off"))
    assert p.returncode == 0, p.stderr
    assert (repo / "output/direct.txt").read_text() == "direct\n"


def test_what_of_the_host_is_visible(repo, ids):
    script = "; ".join([
        "ls /",
        "echo ---",
        "ls /etc",
        "echo ---",
        "ls /sys/class/net",
        "echo ---",
        "touch /usr/x 2>&1 || true",
        "touch /etc/x 2>&1 || true",
        "echo tmp > /tmp/t && cat /tmp/t",
        "echo ---",
        "ls /tmp",
        "echo ---",
        "id -u",
        "echo $HOME",
    ])
    p = sandbox(ids, repo, "sh", "-c", script, opts=("--preset", "read-only"))
    assert p.returncode == 0, p.stderr
    root, etc, net, writes, tmp, user = p.stdout.split("---\n")
    root = set(root.split())
    assert {"usr", "etc", "proc", "dev", "tmp", "workspace"} <= root
    assert not root & {"root", "home", "var", "run", "opt", "srv", "boot"}
    etc = set(etc.split())
    assert "passwd" in etc
    assert not etc & {"shadow", "gshadow", "ssh", "sudoers", "docker", "hostname"}
    assert net.split() == ["lo"]
    assert "Read-only file system" in writes and writes.strip().endswith("tmp")
    assert tmp.split() == ["t"]  # a private /tmp: not the host's
    assert user.split() == [str(os.getuid()), "/tmp"]
    # Nothing of the caller's environment but the basics.
    env = sh([BIN, "sandbox", "--preset", "read-only", "--id", unique("sbx"), repo, "--", "env"],
             env={**os.environ, "OPENAI_API_KEY": "sk-caller-secret"})
    ids.append(next(a for a in env.args if a.startswith("sbx-")))
    assert "sk-caller-secret" not in env.stdout and "PATH=" in env.stdout
    p = sandbox(ids, repo, "sh", "-c", "echo $FOO", opts=("--preset", "read-only", "-e", "FOO=bar"))
    assert p.stdout == "bar\n"


def test_median_time_per_run(repo, ids):
    times = []
    for _ in range(20):
        t = time.perf_counter()
        p = sandbox(ids, repo, "true")
        times.append(time.perf_counter() - t)
        assert p.returncode == 0, p.stderr
    med = statistics.median(times)
    print(f"\nsandbox -- true: median {med * 1000:.0f} ms over 20 runs "
          f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})")


def test_a_killed_runtime_is_cleaned_up_by_its_watchdog(repo, ids):
    sid = unique("sbx")
    ids.append(sid)
    proc = subprocess.Popen([str(BIN), "sandbox", "--id", sid, "--preset", "agent-safe", str(repo),
                             "--", "sh", "-c", "echo up; exec sleep 60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    assert (ROOT / sid).exists() and pids_with(f"containers/{sid}/")
    proc.kill()  # as a caller's timeout would: no chance to clean up
    proc.communicate(timeout=20)  # the command's end of the pipes closes when it is killed
    end = time.time() + 20
    while time.time() < end and ((ROOT / sid).exists() or pids_with(f"containers/{sid}/")
                                 or any(BUNDLES.glob(sid + ".*"))):
        time.sleep(0.1)
    assert_clean(sid)
    # The audit trail is closed and the delta kept: the id can be used again.
    assert '"event":"delete"' in (STATE / sid / "audit.jsonl").read_text()
    assert sandbox(ids, repo, "true", sid=sid).returncode == 0
