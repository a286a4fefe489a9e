"""The Python SDK (sdk/python, package `agentfense`) against the real runtime, for both runtime
types: the five seed scenarios as the seeds write them, plus timeouts, refused policies,
settling the delta and cleanup. Nothing is skipped: NATIVE needs `agentfense-runc sandbox`,
DOCKER needs Docker with runtime `agentfense` (the `docker_engine` fixture registers it).
"""

import os
import sys
import time
from pathlib import Path

import pytest

from conftest import DOCKER, REPO, sh, wait_for
from test_fence import tree_digest

sys.path.insert(0, str(REPO / "sdk" / "python"))

from agentfense import (  # noqa: E402
    AgentfenseError, CommandTimeout, PolicyError, Runtime, RuntimeType, Sandbox, SandboxClient,
    SandboxError,
)

RUNTIMES = [RuntimeType.NATIVE, RuntimeType.DOCKER]


@pytest.fixture(params=RUNTIMES, ids=lambda r: r.value)
def rt(request, agentfense_bin, monkeypatch):
    """The runtime type under test; the SDK finds the binary (and, for Docker, the client and
    the image) through its environment variables, so the seeds' calls run unchanged."""
    monkeypatch.setenv("AGENTFENSE_RUNC", str(agentfense_bin))
    if request.param is RuntimeType.DOCKER:
        image = request.getfixturevalue("image")  # also registers runtime `agentfense`
        monkeypatch.setenv("AGENTFENSE_IMAGE", image)
        monkeypatch.setenv("AGENTFENSE_DOCKER", DOCKER)
    return request.param


def write(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def audit_has(sandbox, timeout=10.0, **fields):
    """Waits until the sandbox's audit trail has a record with these fields (records are
    written asynchronously) and returns it."""
    found = []

    def look():
        for r in sandbox.audit():
            if all(r.get(k) == v for k, v in fields.items()):
                found.append(r)
                return True
        return False
    wait_for(look, f"an audit record {fields}", timeout=timeout)
    return found[0]


def host_traces(sandbox_id):
    """Fence mounts and daemons on the host that belong to this sandbox."""
    mounts = [l for l in Path("/proc/mounts").read_text().splitlines()
              if "agentfense" in l and sandbox_id in l]
    daemons = [l for l in sh(["pgrep", "-af", "fence-daemon"]).stdout.splitlines()
               if sandbox_id in l]
    return mounts, daemons


def assert_gone(sandbox, rt):
    """Nothing of the sandbox is left running: no container, no fence mount, no daemon."""
    sid = sandbox.id
    assert sid
    if rt is RuntimeType.DOCKER:
        p = sh([DOCKER, "ps", "-aq", "--no-trunc", "--filter", f"id={sid}"])
        assert p.stdout.strip() == "", p.stdout
    # (Filtered by id: other fences may come and go on the host meanwhile.)
    wait_for(lambda: host_traces(sid) == ([], []), f"sandbox {sid}'s fence to go away",
             timeout=15)


def alive(marker):
    """Host processes (not zombies) whose command line holds `marker`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmd and state != "Z" and "pytest" not in cmd:
            pids.append((name, cmd))
    return pids


# --- the five seed scenarios --------------------------------------------------------------


def test_1_code_review_without_secrets(rt, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {".env": "API_KEY=sk-1\n", "deploy/server.key": "k\n", "certs/tls.pem": "p\n",
                 "credentials/aws.json": "{}\n", "src/auth.py": "# TODO check token\n",
                 "src/util.py": "x = 1  # TODO\n", "README.md": "readme\n"})
    digest = tree_digest(repo)
    PERMISSIONS = [
        {"pattern": "**/*", "permission": "read"},
        {"pattern": ".env", "permission": "none"},
        {"pattern": "**/*.key", "permission": "none"},
        {"pattern": "**/*.pem", "permission": "none"},
        {"pattern": "credentials/**", "permission": "none"},
    ]
    with Sandbox.from_local(repo, permissions=PERMISSIONS, runtime=rt) as sandbox:
        result = sandbox.run("find . -name '*.py' | xargs grep 'TODO'")
        assert result.exit_code == 0, result
        assert sorted(result.stdout.splitlines()) == ["./src/auth.py:# TODO check token",
                                                      "./src/util.py:x = 1  # TODO"]
        assert result.output == result.stdout and result.duration > 0

        listing = sandbox.run("ls -la")
        assert listing.exit_code == 0
        names = [l.split()[-1] for l in listing.stdout.splitlines()[1:]]
        assert sorted(names) == [".", "..", "README.md", "certs", "deploy", "src"], listing
        assert ".env" not in listing.stdout and "credentials" not in listing.stdout

        cat = sandbox.run("cat .env")
        assert cat.exit_code != 0 and cat.stdout == ""
        assert "No such file or directory" in cat.stderr, cat
        assert "Permission denied" not in cat.stderr

        keys = sandbox.run('find . -name "*.key"; find . -name "*.pem"; ls credentials')
        assert keys.stdout == "", keys
        assert "No such file or directory" in keys.stderr

        probe = audit_has(sandbox, path="/.env", decision="hidden")
        assert probe["event"] == "access"
        audit_has(sandbox, op="open", path="/src/auth.py", decision="allow")
    assert tree_digest(repo) == digest
    assert_gone(sandbox, rt)


def test_2_untrusted_ci_build(rt, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {"src/main.py": "print('main')\n", "tests/test_main.py": "assert True\n",
                 "build/.keep": "", "infra/terraform.tfvars": "db_password = 1\n",
                 "infra/main.tf": "x\n", "prod.tfvars": "y\n", ".env": "z\n",
                 # The seed runs `bash ./external-contributor-script.sh` from the root, which
                 # this policy hides (default none): the script lives under /tests here.
                 "tests/external-contributor-script.sh":
                     "cat src/main.py tests/test_main.py > build/output.txt && echo built\n"
                     "ls infra; cat infra/terraform.tfvars; cat prod.tfvars; cat .env\n"
                     "echo pwned >> src/main.py\n"})
    digest = tree_digest(repo)
    UNTRUSTED_BUILD_PERMISSIONS = [
        {"pattern": "/src/**", "permission": "read"},
        {"pattern": "/tests/**", "permission": "read"},
        {"pattern": "/build/**", "permission": "write"},
        {"pattern": "/tmp/**", "permission": "write"},
        {"pattern": "/infra/**", "permission": "none"},
        {"pattern": "**/.env", "permission": "none"},
        {"pattern": "**/*.tfvars", "permission": "none"},
    ]
    with Sandbox.from_local(
        repo,
        permissions=UNTRUSTED_BUILD_PERMISSIONS,
        runtime=rt,
    ) as sandbox:
        result = sandbox.run("sh ./tests/external-contributor-script.sh")
        assert result.stdout == "built\n", result
        assert result.stderr.count("No such file or directory") == 4, result.stderr
        assert "Permission denied" in result.stderr  # the write to src/main.py
        assert "db_password" not in result.stdout + result.stderr
        out = sandbox.run("cat build/output.txt")
        assert out.stdout == "print('main')\nassert True\n"

        # The audit log the seed shows.
        audit_has(sandbox, op="open", path="/src/main.py", decision="allow")
        audit_has(sandbox, op="open", path="/tests/test_main.py", decision="allow")
        audit_has(sandbox, path="/infra", decision="hidden")
        audit_has(sandbox, op="create", path="/build/output.txt", decision="allow")
        audit_has(sandbox, path="/src/main.py", decision="deny")
        summary = sandbox.audit_summary()
        assert "/infra" in summary["probed"] and "/src/main.py" in summary["read"]
        assert sandbox.audit_verify()
    assert tree_digest(repo) == digest  # delta "keep": the host is untouched
    assert not (repo / "build" / "output.txt").exists()
    # The SDK's summary spans every command; the runtime's covers its latest run (for
    # Docker, the container's whole life here): the two agree where they should.
    whole, latest = sandbox.audit_summary(), sandbox.audit_summary(latest_run_only=True)
    if rt is RuntimeType.DOCKER:
        for k in ("read", "written", "created", "deleted", "listed", "refused", "probed",
                  "untouched", "bytes_read", "bytes_written"):
            assert whole[k] == latest[k], k
    else:
        assert latest["read"] == ["/build/output.txt"] and latest["probed"] == []
    assert "/infra" in whole["probed"] and {"path": "/src/main.py", "ops": ["write"]} in \
        whole["refused"]
    assert {"kind": "A", "path": "/workspace/build/output.txt"} in sandbox.diff()
    assert_gone(sandbox, rt)


def test_3_multi_tenant_shared_codebase(rt, tmp_path):
    src = tmp_path / "base-image"
    write(src, {"app/agent.sh": "echo agent running as $1\n", "app/data.txt": "shared\n",
                "output/.keep": ""})
    users = ["alice", "bob", "carol"]
    client = SandboxClient(runtime=rt)
    base = client.create_codebase(name="base-image", owner_id="platform")
    try:
        client.upload_directory(base.id, str(src) + "/")
        assert base.path == f"/var/lib/agentfense/codebases/{base.id}"
        digest = tree_digest(base.path)
        sandboxes = {}
        for user in users:
            sandbox = client.create_sandbox(
                codebase_id=base.id,
                permissions=[
                    {"pattern": "/app/**", "permission": "read"},
                    {"pattern": f"/output/{user}/**", "permission": "write"},
                    {"pattern": "/output/**", "permission": "none"},
                ],
            )
            assert sandbox.id
            client.start_sandbox(sandbox.id)
            sandboxes[user] = sandbox.id
            result = client.exec(sandbox.id, command=f"sh /workspace/app/agent.sh {user}")
            assert result.stdout == f"agent running as {user}\n", result
            w = client.exec(sandbox.id, f"mkdir output/{user} && echo {user} > "
                                        f"output/{user}/result.txt && echo ok")
            assert w.stdout == "ok\n", w
        assert sorted(s.id for s in client.list_sandboxes()) == sorted(sandboxes.values())
        # Every tenant has written; each sees its own output only, and the shared base.
        for user, sid in sandboxes.items():
            r = client.exec(sid, "ls output; cat output/*/result.txt; cat app/data.txt")
            assert r.stdout == f"{user}\n{user}\nshared\n", (user, r)
            for other in users:
                if other != user:
                    r = client.exec(sid, f"cat output/{other}/result.txt; ls output/{other}")
                    assert r.stdout == "" and r.stderr.count("No such file or directory") == 2
            r = client.exec(sid, "echo x > app/data.txt; echo y > output/new.txt")
            assert r.stderr.count("Permission denied") == 2, r
        # A stopped sandbox starts again with its delta.
        first = sandboxes[users[0]]
        client.stop_sandbox(first)
        client.start_sandbox(first)
        assert client.exec(first, f"cat output/{users[0]}/result.txt").stdout == f"{users[0]}\n"
        assert tree_digest(base.path) == digest  # the shared base is never written
        diffs = {u: client.get_sandbox(s).diff() for u, s in sandboxes.items()}
        for user in users:
            assert {"kind": "A", "path": f"/workspace/output/{user}/result.txt"} in diffs[user]
            assert not any(other in d["path"] for d in diffs[user]
                           for other in users if other != user)
        gone = [client.get_sandbox(s) for s in sandboxes.values()]
        for sid in sandboxes.values():
            client.destroy_sandbox(sid)
        assert client.list_sandboxes() == []
        for sandbox in gone:
            assert_gone(sandbox, rt)
    finally:
        client.close()
        client.delete_codebase(base.id)


def test_4_view_lists_names_not_contents(rt, tmp_path):
    project = tmp_path / "project"
    write(project, {"src/main.py": "x = 1\n", "configs/database.yaml": "password: hunter2\n",
                    "configs/api.yaml": "url: http://10.0.0.1\n", "configs/redis.yaml": "r\n",
                    "secrets/prod.key": "k\n"})
    PERMISSIONS = [
        {"pattern": "/src/**", "permission": "read"},
        {"pattern": "/configs/**", "permission": "view"},
        {"pattern": "/secrets/**", "permission": "none"},
    ]
    with Sandbox.from_local(project, permissions=PERMISSIONS, runtime=rt) as sandbox:
        result = sandbox.run("ls /workspace/configs/")
        assert result.stdout.split() == ["api.yaml", "database.yaml", "redis.yaml"], result

        result = sandbox.run("cat /workspace/configs/database.yaml")
        assert result.exit_code != 0 and "hunter2" not in result.stdout
        assert "Permission denied" in result.stderr, result

        result = sandbox.run("find /workspace/configs -type f | sort; ls /workspace/secrets")
        assert result.stdout.split() == [f"/workspace/configs/{n}" for n in
                                         ("api.yaml", "database.yaml", "redis.yaml")]
        assert "No such file or directory" in result.stderr
        assert sandbox.run("cat /workspace/src/main.py").stdout == "x = 1\n"
        audit_has(sandbox, op="open", path="/configs/database.yaml", decision="deny")
        audit_has(sandbox, op="opendir", path="/configs", decision="allow")
    assert_gone(sandbox, rt)


def test_5_plugin_manifest_enforced(rt, tmp_path):
    user_repo_path = tmp_path / "user-repo"
    write(user_repo_path, {"src/main.py": "a = 1\nb = 2\n", "src/util.py": "c = 3\n",
                           "reports/.keep": "", "secrets/token": "t\n", ".env": "e\n",
                           "configs/c.yaml": "c\n"})
    digest = tree_digest(user_repo_path)
    plugin_manifest = {
        "name": "CodeComplexityAnalyzer",
        "permissions": [
            {"pattern": "/src/**", "permission": "read"},
            {"pattern": "/reports/**", "permission": "write"},
        ],
    }
    with Sandbox.from_local(
        user_repo_path,
        permissions=plugin_manifest["permissions"],
        runtime=rt,
    ) as sandbox:
        assert sandbox.runtime_type is rt
        result = sandbox.run("ls -a; wc -l src/main.py src/util.py > reports/complexity.json; "
                             "cat reports/complexity.json; cat secrets/token .env configs/c.yaml")
        lines = result.stdout.splitlines()
        assert lines[:4] == [".", "..", "reports", "src"], result
        assert "3 total" in result.stdout
        assert result.stderr.count("No such file or directory") == 3, result.stderr

        audit_has(sandbox, op="create", path="/reports/complexity.json", decision="allow")
        summary = sandbox.audit_summary()
        assert set(summary["read"]) >= {"/src/main.py", "/src/util.py"}
        assert "/reports/complexity.json" in summary["written"] + summary["created"]
        assert {"/secrets", "/.env", "/configs"} <= set(summary["probed"]), summary
        # What the plugin touched is within its manifest.
        for r in sandbox.audit(decision="allow"):
            assert r["path"] == "/" or r["path"].startswith(("/src", "/reports")), r
    assert tree_digest(user_repo_path) == digest
    assert_gone(sandbox, rt)


# --- the SDK's own promises ---------------------------------------------------------------


def test_timeout_kills_the_whole_command(rt, tmp_path):
    (tmp_path / "repo").mkdir()
    marker = str(3000 + os.getpid() % 1000)
    with Sandbox.from_local(tmp_path / "repo", preset="read-only", runtime=rt) as sandbox:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout) as e:
            sandbox.run(f"echo started; sleep {marker} & sleep {marker}; echo never", timeout=2)
        assert time.monotonic() - t0 < 15
        assert e.value.timeout == 2 and "started" in e.value.stdout
        assert isinstance(e.value, AgentfenseError)
        wait_for(lambda: alive(f"sleep {marker}") == [], "the timed-out command to die",
                 timeout=10)
        # The sandbox is still usable, and keeps its delta.
        assert sandbox.run("echo ok").stdout == "ok\n"
    assert_gone(sandbox, rt)


def test_bad_policy_raises_policy_error(rt, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for kwargs, words in [
        ({"permissions": [{"pattern": "a[", "permission": "read"}]}, "rule 0"),
        ({"permissions": [{"pattern": "**", "permission": "rw"}]}, "rw"),
        ({"permissions": [{"pattern": "**", "permission": "read", "colour": 1}]}, "colour"),
        ({"preset": "agent-unsafe"}, "unknown preset"),
        ({"preset": "agent-safe", "delta": "sometimes"}, "delta"),
    ]:
        with pytest.raises(PolicyError) as e:
            with Sandbox.from_local(repo, runtime=rt, **kwargs) as sandbox:
                sandbox.run("echo RAN > ran")
        assert words in str(e.value), (kwargs, str(e.value))
    # Without the SDK's own check first, the runtime refuses the policy itself: still a
    # PolicyError with the runtime's message, and still nothing ran.
    monkeypatch.setattr(Runtime, "check_policy", lambda *a, **k: None)
    with pytest.raises(PolicyError) as e:
        with Sandbox.from_local(repo, runtime=rt,
                                permissions=[{"pattern": "a[", "permission": "read"}]) as sb:
            sb.run("echo RAN > ran")
    assert "rule 0" in str(e.value) and "invalid pattern" in str(e.value), str(e.value)
    assert not (repo / "ran").exists()
    if rt is RuntimeType.DOCKER:
        assert sh([DOCKER, "ps", "-aq", "--filter", "label=io.agentfense.sdk"]).stdout == ""


def test_docker_needs_an_image(monkeypatch, tmp_path):
    monkeypatch.delenv("AGENTFENSE_IMAGE", raising=False)
    with pytest.raises(SandboxError, match="image"):
        Sandbox.from_local(tmp_path, runtime=RuntimeType.DOCKER)
    assert RuntimeType.BWRAP is RuntimeType.NATIVE
    assert RuntimeType.coerce("bwrap") is RuntimeType.NATIVE


def test_cleanup_on_exception_and_successive_runs_share_a_delta(rt, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {"src/a.txt": "a\n"})
    with pytest.raises(RuntimeError):
        with Sandbox.from_local(repo, runtime=rt) as sandbox:  # agent-safe
            assert sandbox.run("mkdir -p output && echo one > output/n.txt").exit_code == 0
            r = sandbox.run("echo two >> output/n.txt; cat output/n.txt; cat src/a.txt")
            assert r.stdout == "one\ntwo\na\n", r
            mounts, daemons = host_traces(sandbox.id)
            if rt is RuntimeType.DOCKER:
                assert mounts and daemons  # the long-lived container's fence is live
            else:
                assert (mounts, daemons) == ([], [])  # one fence per command, gone after it
            raise RuntimeError("agent crashed")
    assert sandbox.status == "closed"
    assert_gone(sandbox, rt)
    with pytest.raises(SandboxError):
        sandbox.run("true")
    assert not (repo / "output").exists()
    # delta "keep": the writes wait in the runtime's state directory; commit() applies them.
    assert {"kind": "A", "path": "/workspace/output/n.txt"} in sandbox.diff()
    report = sandbox.commit()
    assert "/workspace/output/n.txt" in report["added"] and report["conflicts"] == []
    assert (repo / "output" / "n.txt").read_text() == "one\ntwo\n"


def test_delta_commit_and_discard_at_close(rt, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {"output/old.txt": "old\n", "src/a.txt": "a\n"})
    with Sandbox.from_local(repo, runtime=rt, delta="commit") as sandbox:
        sandbox.run("echo new > output/new.txt")
        sandbox.run("rm output/old.txt")
        assert not (repo / "output" / "new.txt").exists()
    assert (repo / "output" / "new.txt").read_text() == "new\n"
    assert not (repo / "output" / "old.txt").exists()
    assert sandbox.commit_report is not None
    assert "/workspace/output/new.txt" in sandbox.commit_report["added"]
    assert_gone(sandbox, rt)

    digest = tree_digest(repo)
    with Sandbox.from_local(repo, runtime=rt, delta="discard") as sandbox:
        sandbox.run("echo gone > output/gone.txt")
        assert sandbox.diff() != []
    assert tree_digest(repo) == digest
    assert sandbox.diff() == []
    assert_gone(sandbox, rt)


def test_run_options_and_export(rt, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {"src/a.txt": "a\n"})
    with Sandbox.from_local(repo, preset="development", runtime=rt,
                            env={"GREETING": "hello"}) as sandbox:
        r = sandbox.run("echo $GREETING $WHO; pwd; cat", env={"WHO": "agent"}, stdin="in\n")
        assert r.stdout == "hello agent\n/workspace\nin\n", r
        r = sandbox.run(["sh", "-c", 'echo "$0"; exit 3', "list form"])
        assert (r.stdout, r.exit_code, r.success) == ("list form\n", 3, False)
        sandbox.run("echo b > src/b.txt")
        layer = tmp_path / "layer.tar"
        sandbox.export(layer)
    names = sh(["tar", "-tf", layer], check=True).stdout.split()
    assert any(n.rstrip("/").endswith("src/b.txt") for n in names), names
    assert_gone(sandbox, rt)
