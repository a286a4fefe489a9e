"""config-examples/: every example that can run here, run.

- policies/*.json (the five seed scenarios): each passes `policy check`, and each fences a real
  `agentfense-runc sandbox` run that shows its scenario's point (secrets absent, writes only
  where intended, names without contents, per-tenant outputs, a plugin held to its manifest).
- runtime-presets/*.json and agentfense-config.json load as administrator settings.
- docker-daemon-presets.json: its named runtimes, registered with the test Docker daemon by
  `configure docker` exactly as listed (paths pointed at the build and a copy of each preset),
  fence containers that ask for nothing, and their floors hold when a container asks for more.
- agentfense-runc-agent-safe.sh: the wrapper, as `ctr --runc-binary`, fences without annotations.
- github-actions-fenced-build.yml: its "fenced build" and "report" steps, run verbatim by bash
  against the test Docker daemon, as GitHub would run them.
- nerdctl.md: not tested (nerdctl is not installable here).
"""

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import (BIN, CTR, CTR_IMAGE, CTR_NS, DAEMON_JSON, DOCKER, IMAGE, REPO,
                      configure_docker, reload_dockerd, sh, unique, wait_for)

EX = REPO / "config-examples"
STATE = Path("/var/lib/agentfense/containers")
SCENARIOS = {"code-review", "ci-untrusted-build", "multi-tenant", "metadata-view",
             "plugin-manifest"}
NOENT = "No such file or directory"
EACCES = "Permission denied"


def write(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def tree(root):
    """Every path and content under root (for 'the host was not changed')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


@pytest.fixture
def sandbox(agentfense_bin):
    """Runs `agentfense-runc sandbox --policy FILE DIR -- sh -c SCRIPT` under a fresh id;
    the ids' state is removed afterwards (nothing of a run may stay mounted)."""
    ids = []

    def run(policy, repo, script, sid=None):
        sid = sid or unique("ex")
        ids.append(sid)
        return sid, sh([BIN, "sandbox", "--id", sid, "--policy", policy, repo, "--", "sh", "-c",
                        script], timeout=120)

    yield run
    mounts = Path("/proc/mounts").read_text()
    for sid in ids:
        assert f"agentfense:{sid} " not in mounts, sid
        shutil.rmtree(STATE / sid, ignore_errors=True)


def policy(name):
    return EX / "policies" / f"{name}.json"


def test_every_example_policy_passes_policy_check(agentfense_bin):
    found = {p.stem for p in (EX / "policies").glob("*.json")}
    assert found == SCENARIOS
    for name in sorted(found):
        p = sh([BIN, "policy", "check", "--policy", policy(name)])
        assert p.returncode == 0 and p.stdout.startswith("policy OK"), (name, p.stdout, p.stderr)


def test_example_admin_settings_load(agentfense_bin):
    files = sorted((EX / "runtime-presets").glob("*.json")) + [EX / "agentfense-config.json"]
    assert len(files) == 4
    for f in files:
        p = sh([BIN, "--agentfense-config", f, "policy", "check"])
        # agentfense-config.json sets no default policy: then a preset must be named.
        if p.returncode != 0:
            p = sh([BIN, "--agentfense-config", f, "policy", "check", "--preset", "read-only"])
        assert p.returncode == 0 and "admin floor" in p.stdout, (f, p.stdout, p.stderr)


def test_1_code_review_policy_hides_secrets(sandbox, tmp_path):
    repo = write(tmp_path / "repo", {
        ".env": "API_KEY=sk-1\n", "config/.env.local": "X=1\n", "deploy/server.key": "k\n",
        "certs/tls.pem": "p\n", "credentials/aws.json": "{}\n", "credentials.json": "{}\n",
        "secrets/token": "t\n", "src/auth.py": "# TODO check token\n", "src/util.py": "# TODO\n",
        "README.md": "readme\n"})
    before = tree(repo)
    _, p = sandbox(policy("code-review"), repo,
                   "find . | sort; echo ---; grep -rl TODO . | sort; echo ---; "
                   "for f in .env config/.env.local deploy/server.key certs/tls.pem "
                   "credentials/aws.json credentials.json secrets/token; do cat $f; done; "
                   "echo x >> src/auth.py || echo refused")
    found, grepped, rest = p.stdout.split("---\n")
    assert found.split() == [".", "./README.md", "./certs", "./config", "./deploy", "./src",
                             "./src/auth.py", "./src/util.py"], found
    assert grepped.split() == ["./src/auth.py", "./src/util.py"]
    assert rest == "refused\n"
    assert p.stderr.count(NOENT) == 7, p.stderr
    assert "API_KEY" not in p.stdout + p.stderr
    assert tree(repo) == before


def test_2_ci_policy_builds_only_what_it_declares(sandbox, tmp_path):
    repo = write(tmp_path / "repo", {
        "Makefile": "all:\n", "src/main.c": "int main(){}\n", "tests/t.sh": "echo ok\n",
        "infra/prod.tfvars": "password=1\n", "infra/main.tf": "x\n", "terraform.tfvars": "y\n",
        "src/local.tfvars": "z\n", ".env": "e\n",
        ".git/config": "[http]\n\textraheader = AUTHORIZATION: basic c2VjcmV0\n",
        "README.md": "r\n"})
    before = tree(repo)
    sid, p = sandbox(policy("ci-untrusted-build"), repo,
                     "ls -a; mkdir build && cat Makefile src/main.c tests/t.sh > build/out.txt "
                     "&& echo built; ls src; for f in infra/main.tf .git/config terraform.tfvars "
                     "src/local.tfvars .env README.md; do cat $f; done; "
                     "echo x > src/main.c || echo refused-src")
    assert p.stdout == (".\n..\nMakefile\nsrc\ntests\nbuilt\nmain.c\nrefused-src\n"), p.stdout
    assert p.stderr.count(NOENT) == 6, p.stderr
    assert EACCES in p.stderr and "extraheader" not in p.stdout
    # The build's output is in its delta, not in the checkout.
    assert tree(repo) == before
    diff = sh([BIN, "diff", sid], check=True).stdout.splitlines()
    assert "A /workspace/build/out.txt" in diff, diff


def test_3_multi_tenant_policy_isolates_outputs(sandbox, tmp_path):
    base = write(tmp_path / "base", {"app/agent.py": "print('agent')\n",
                                     "output/bob/earlier.txt": "bob's\n"})
    before = tree(base)
    template = policy("multi-tenant").read_text()
    assert "TENANT_ID" in template
    seen = {}
    for tenant in ("alice", "bob"):
        pol = tmp_path / f"{tenant}.json"
        pol.write_text(template.replace("TENANT_ID", tenant))
        _, p = sandbox(pol, base, f"mkdir -p output/{tenant} && echo {tenant} > "
                                  f"output/{tenant}/result.txt; ls output; cat app/agent.py; "
                                  "echo x > app/agent.py || echo refused-app")
        seen[tenant] = (p.stdout, p.stderr)
    assert seen["alice"][0] == "alice\nprint('agent')\nrefused-app\n", seen["alice"]
    # bob sees his own earlier output (in the base) and nothing of alice's.
    assert seen["bob"][0] == "bob\nprint('agent')\nrefused-app\n", seen["bob"]
    assert tree(base) == before


def test_4_metadata_view_policy_lists_without_reading(sandbox, tmp_path):
    repo = write(tmp_path / "repo", {"src/a.py": "a\n", "configs/database.yaml": "password: x\n",
                                     "configs/api.yaml": "url: y\n", "secrets/k": "k\n"})
    _, p = sandbox(policy("metadata-view"), repo,
                   "ls configs; ls -l configs | wc -l; cat src/a.py; cat configs/database.yaml; "
                   "ls secrets")
    assert p.stdout == "api.yaml\ndatabase.yaml\n3\na\n", p.stdout
    assert f"configs/database.yaml: {EACCES}" in p.stderr, p.stderr
    assert f"cannot access 'secrets': {NOENT}" in p.stderr, p.stderr
    assert "password" not in p.stdout


def test_5_plugin_manifest_policy_is_enforced_and_audited(sandbox, tmp_path):
    repo = write(tmp_path / "repo", {"src/main.py": "x = 1\n", "reports/.keep": "",
                                     "secrets/token": "t\n", ".env": "e\n",
                                     "configs/c.yaml": "c\n"})
    sid, p = sandbox(policy("plugin-manifest"), repo,
                     "ls -a; wc -l src/main.py > reports/complexity.json; "
                     "cat reports/complexity.json; cat secrets/token .env configs/c.yaml")
    assert p.stdout == ".\n..\nreports\nsrc\n1 src/main.py\n", p.stdout
    assert p.stderr.count(NOENT) == 3, p.stderr
    s = json.loads(sh([BIN, "audit", "summary", sid, "--format", "json"], check=True).stdout)
    assert "/src/main.py" in s["read"] and s["written"] == ["/reports/complexity.json"], s
    assert set(s["probed"]) == {"/secrets", "/.env", "/configs"}, s
    assert sh([BIN, "audit", "verify", sid]).returncode == 0


@pytest.fixture
def preset_runtimes(docker_engine, image, tmp_path):
    """docker-daemon-presets.json's runtimes, registered with the test dockerd by `configure
    docker` as the file lists them: the binary under test for its path, a copy of each
    runtime-presets/ file for the settings it names. Removed again afterwards."""
    example = json.loads((EX / "docker-daemon-presets.json").read_text())["runtimes"]
    assert DAEMON_JSON.exists()
    text_before = DAEMON_JSON.read_text()
    backups_before = set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*"))
    added = []
    for name, rt in example.items():
        assert rt["path"] == "/usr/local/bin/agentfense-runc", rt
        args = list(rt.get("runtimeArgs", []))
        if not args:
            continue  # plain `agentfense`: the session's own registration
        assert args[0] == "--agentfense-config" and args[1].startswith("/etc/agentfense/"), args
        settings = EX / "runtime-presets" / Path(args[1]).name
        copy = tmp_path / settings.name
        shutil.copy(settings, copy)
        args[1] = str(copy)
        configure_docker(name, BIN, args)
        added.append(name)
    assert len(added) == 3
    reload_dockerd()
    wait_for(lambda: all(n in sh([DOCKER, "info", "--format", "{{json .Runtimes}}"]).stdout
                         for n in added), "dockerd to load the preset runtimes")
    yield added
    cfg = json.loads(DAEMON_JSON.read_text())
    for n in added:
        cfg["runtimes"].pop(n, None)
    tmp = DAEMON_JSON.with_name(DAEMON_JSON.name + ".test-tmp")
    # As it was, to the byte, unless someone else changed it meanwhile.
    same = cfg == json.loads(text_before)
    tmp.write_text(text_before if same else json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, DAEMON_JSON)
    for b in set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*")) - backups_before:
        b.unlink()
    reload_dockerd()


def docker_fenced(runtime, repo, script, env=()):
    name = unique("preset")
    args = [DOCKER, "run", "--name", name, "--runtime", runtime, "--network", "none"]
    for e in env:
        args += ["-e", e]
    p = sh([*args, "-v", f"{repo}:/workspace", "-w", "/workspace", IMAGE, "sh", "-c", script])
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name]).stdout.strip()
    sh([DOCKER, "rm", "-f", name])
    if cid:
        shutil.rmtree(STATE / cid, ignore_errors=True)
    return p


def test_docker_named_runtimes_carry_preset_defaults(preset_runtimes, tmp_path):
    repo = write(tmp_path / "repo", {".env": "SECRET=1\n", "src/app.py": "print(1)\n",
                                     "output/.keep": ""})
    before = tree(repo)
    look = "ls -a; cat .env; echo x >> src/app.py && echo wrote-src || echo refused-src"
    # Nothing asked: each runtime's default policy fences.
    p = docker_fenced("agentfense-agent-safe", repo, look)
    assert p.returncode == 0, p.stderr
    assert ".env" not in p.stdout.split() and "refused-src" in p.stdout, p.stdout
    assert NOENT in p.stderr
    p = docker_fenced("agentfense-development", repo, look)
    assert ".env" not in p.stdout.split() and "wrote-src" in p.stdout, (p.stdout, p.stderr)
    p = docker_fenced("agentfense-read-only", repo, look)
    assert ".env" not in p.stdout.split() and "refused-src" in p.stdout, (p.stdout, p.stderr)
    # A container asking for more gets no more than the runtime's floor.
    p = docker_fenced("agentfense-agent-safe", repo, look, env=["AGENTFENSE_PRESET=full-access"])
    assert ".env" not in p.stdout.split() and "wrote-src" in p.stdout, (p.stdout, p.stderr)
    p = docker_fenced("agentfense-read-only", repo, look, env=["AGENTFENSE_PRESET=full-access"])
    assert ".env" not in p.stdout.split() and "refused-src" in p.stdout, (p.stdout, p.stderr)
    assert tree(repo) == before
    # Every container on such a runtime is fenced: one with nothing at /workspace is refused.
    name = unique("preset")
    p = sh([DOCKER, "run", "--rm", "--name", name, "--runtime", "agentfense-agent-safe", IMAGE,
            "true"])
    assert p.returncode != 0 and "workspace /workspace is neither a bind mount" in p.stderr, \
        p.stderr


def test_wrapper_fences_under_ctr_without_annotations(ctr_engine, tmp_path):
    cfg = tmp_path / "agent-safe.json"
    shutil.copy(EX / "runtime-presets" / "agent-safe.json", cfg)
    wrapper = tmp_path / "agentfense-runc-agent-safe"
    text = (EX / "agentfense-runc-agent-safe.sh").read_text()
    assert "/usr/local/bin/agentfense-runc --agentfense-config /etc/agentfense/agent-safe.json" \
        in text
    wrapper.write_text(text.replace("/usr/local/bin/agentfense-runc", str(BIN))
                       .replace("/etc/agentfense/agent-safe.json", str(cfg)))
    wrapper.chmod(0o755)
    repo = write(tmp_path / "repo", {".env": "SECRET=1\n", "src/app.py": "print(1)\n"})
    cid = unique("ctr")
    try:
        p = sh([CTR, "-a", ctr_engine, "-n", CTR_NS, "run", "--rm", "--runtime",
                "io.containerd.runc.v2", "--runc-binary", wrapper,
                "--mount", f"type=bind,src={repo},dst=/workspace,options=rbind:rw",
                CTR_IMAGE, cid, "sh", "-c", "ls -a /workspace; cat /workspace/.env"])
        assert ".env" not in p.stdout.split() and "app.py" not in p.stdout, p.stdout
        assert "src" in p.stdout.split() and NOENT in p.stderr, (p.stdout, p.stderr)
        rec = json.loads((STATE / cid / "fence.json").read_text())
        assert rec["live"] is False
    finally:
        shutil.rmtree(STATE / cid, ignore_errors=True)


def workflow_steps():
    wf = yaml.safe_load((EX / "github-actions-fenced-build.yml").read_text())
    job = wf["jobs"]["build"]
    # `on:` is YAML 1.1's `True`.
    assert wf.get("on", wf.get(True))["pull_request_target"], wf
    steps = {s.get("name"): s for s in job["steps"]}
    return job, steps


def test_github_actions_fenced_build_steps_run_verbatim(docker_engine, image, tmp_path):
    job, steps = workflow_steps()
    assert set(job["env"]) >= {"BUILD_IMAGE", "BUILD_COMMAND", "WORKSPACE", "POLICY_FILE"}
    checkouts = [s for s in steps.values() if s.get("uses", "").startswith("actions/checkout")]
    assert checkouts and all(s["with"]["persist-credentials"] is False for s in checkouts)
    build, report = steps["fenced build"], steps["report"]

    repo = write(tmp_path / "pr", {
        "Makefile": "all:\n", "src/main.c": "int main(){}\n", "tests/t.sh": "echo tests-ok\n",
        "infra/prod.tfvars": "password=1\n", ".env": "TOKEN=1\n",
        ".git/config": "[http]\n\textraheader = AUTHORIZATION: basic c2VjcmV0\n"})
    before = tree(repo)
    # What GitHub provides: a shell, the job's env (pointed at fixtures), GITHUB_OUTPUT, sudo.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (shims / "sudo").chmod(0o755)
    (shims / "agentfense-runc").symlink_to(BIN)
    (shims / "docker").symlink_to(DOCKER)
    out = tmp_path / "github_output"
    out.write_text("")
    env = {
        "PATH": f"{shims}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path),
        "GITHUB_OUTPUT": str(out), "GITHUB_RUN_ID": unique("run"), "GITHUB_RUN_ATTEMPT": "1",
        "BUILD_IMAGE": IMAGE, "WORKSPACE": str(repo),
        "POLICY_FILE": str(EX / "policies" / "ci-untrusted-build.json"),
        # The untrusted build: uses what it may, tries what it may not.
        "BUILD_COMMAND": "mkdir build && cat Makefile src/main.c > build/app && sh tests/t.sh; "
                         "cat infra/prod.tfvars .env .git/config; env | grep AGENTFENSE; true",
    }
    work = tmp_path / "runner"
    work.mkdir()
    p = sh(["bash", "-e", "-c", build["run"]], env=env, timeout=300)
    # (GitHub runs `bash -e {0}`; the step's own `set -u` comes on top.)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout == "tests-ok\n", p.stdout
    assert p.stderr.count(NOENT) == 3, p.stderr
    assert "password" not in p.stdout and "extraheader" not in p.stdout
    outputs = dict(l.split("=", 1) for l in out.read_text().splitlines())
    cid = outputs["id"]
    try:
        assert len(cid) == 64
        assert sh([DOCKER, "inspect", cid]).returncode != 0, "the container should be removed"
        # The report step runs in the job's working directory (the artifact is read there).
        r = sh(["bash", "-e", "-c", f"cd {work}\n{report['run']}"], env={**env, "ID": cid},
               timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "A /workspace/build/app" in r.stdout, r.stdout
        assert f"{cid}" in r.stdout and "chain intact" in r.stdout, r.stdout
        art = work / "fenced-build"
        with tarfile.open(art / "build-output.tar") as t:
            names = t.getnames()
            app = t.extractfile([m for m in t.getmembers() if m.name.endswith("build/app")][0])
            assert app.read() == b"all:\nint main(){}\n"
        assert any(n.endswith("build/app") for n in names), names
        records = [json.loads(l) for l in (art / "audit.jsonl").read_text().splitlines()]
        hidden = {r["path"] for r in records if r.get("decision") == "hidden"}
        assert {"/infra", "/.env", "/.git"} <= hidden, hidden
        assert "/infra" in (art / "audit-summary.txt").read_text()
    finally:
        shutil.rmtree(STATE / cid, ignore_errors=True)
    assert tree(repo) == before
