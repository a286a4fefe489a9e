"""The audit trail of real fenced containers, through Docker and containerd: the exact records
of a known run, the hash chain verified and tampering caught, the summary's untouched grants,
and one open record per file read.
"""

import json
import shutil
from pathlib import Path

from conftest import BIN, CTR, CTR_IMAGE, CTR_NS, DOCKER, IMAGE, make_bundle, sh, unique
from test_fence import no_leftovers

STATE = Path("/var/lib/agentfense/containers")
POLICY = [
    {"pattern": "/src/**", "permission": "read"},
    {"pattern": "/output/**", "permission": "write"},
    {"pattern": "/docs/**", "permission": "read"},
    {"pattern": "**/.env", "permission": "none", "priority": 100},
]
SCRIPT = ("cat /workspace/src/main.py >/dev/null; echo out > /workspace/output/o.txt; "
          "echo x >> /workspace/src/main.py; cat /workspace/.env; true")


def repo_at(tmp_path):
    repo = tmp_path / "repo"
    for rel, text in {"src/main.py": "print(1)\n", "output/.keep": "", "docs/a.md": "a\n",
                      ".env": "S=1\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    return repo


def records(cid):
    return [json.loads(l) for l in (STATE / cid / "audit.jsonl").read_text().splitlines()]


def audit(*args):
    return sh([BIN, "audit", *args])


def check_known_run(cid):
    recs = records(cid)
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert all(r["container"] == cid for r in recs)
    shape = [(r["event"], r.get("op"), r.get("path"), r.get("decision"), r.get("mode"),
              r.get("errno"), r.get("bytes_read"), r.get("bytes_written")) for r in recs]
    # Lifecycle records frame the run; an allowed open is recorded when the kernel releases
    # the file, which it does asynchronously, so accesses are compared as a set.
    assert [s[0] for s in shape] == ["create", "start"] + ["access"] * 5 + ["daemon-stop", "delete"]
    assert sorted(s[1:] for s in shape if s[0] == "access") == sorted([
        ("open", "/src/main.py", "allow", "read", None, 9, 0),
        ("create", "/output/o.txt", "allow", None, None, None, None),
        ("open", "/output/o.txt", "allow", "write", None, 0, 4),
        ("open", "/src/main.py", "deny", "write", "EACCES", None, None),
        ("lookup", "/.env", "hidden", None, "ENOENT", None, None),
    ], key=str), shape

    create = recs[0]["info"]
    assert create["delta"] == "keep" and create["workspaces"] == ["/workspace"]
    assert json.loads(create["policy"])["rules"][0]["pattern"] == "/src/**"
    by_op = {(r.get("op"), r.get("decision")): r for r in recs if r["event"] == "access"}
    assert by_op[("lookup", "hidden")]["rule"] == 3
    assert by_op[("create", "allow")]["rule"] == 1
    assert all(r["uid"] == 0 and r["pid"] > 0 for r in recs if r["event"] == "access")
    delete = recs[-1]["info"]
    assert delete["totals"] == {"allow": 3, "deny": 1, "hidden": 1}
    assert delete["dropped"] == 0
    assert (STATE / cid / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_docker_run_audit_records_verify_and_summary(docker_engine, image, tmp_path):
    repo = repo_at(tmp_path)
    name = unique()
    p = sh([DOCKER, "run", "--name", name, "--runtime", "agentfense",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(POLICY), "-v", f"{repo}:/workspace", IMAGE,
            "sh", "-c", SCRIPT])
    assert p.returncode == 0, p.stderr
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    sh([DOCKER, "rm", name], check=True)
    no_leftovers()
    check_known_run(cid)

    v = audit("verify", cid[:12])
    assert v.returncode == 0 and "9 records, chain intact" in v.stdout, v.stdout + v.stderr

    text = audit(cid[:12]).stdout
    assert f"{cid[:12]}: Read allowed: /src/main.py" in text
    assert f"{cid[:12]}: Path hidden: /.env" in text
    assert f"{cid[:12]}: Write denied: /src/main.py" in text
    hidden_only = audit(cid[:12], "--decision", "hidden").stdout.strip().splitlines()
    assert len(hidden_only) == 1 and hidden_only[0].endswith("Path hidden: /.env")

    s = json.loads(audit("summary", cid[:12], "--format", "json").stdout)
    assert s["read"] == ["/src/main.py"]
    assert s["written"] == ["/output/o.txt"] and s["created"] == ["/output/o.txt"]
    assert s["refused"] == [{"path": "/src/main.py", "ops": ["write"]}]
    assert s["probed"] == ["/.env"]
    # Granted but never touched: /docs (read); /src and /output were used.
    assert s["untouched"] == [{"rule": 2, "pattern": "/docs/**", "permission": "read"}]

    # Tampering, each on a copy: one line removed, one edited, two swapped, the tail cut.
    lines = (STATE / cid / "audit.jsonl").read_text().splitlines(keepends=True)
    edited = lines[3].replace('"allow"', '"deny"').replace('"hidden"', '"allow"')
    variants = {
        "removed": lines[:3] + lines[4:],
        "edited": lines[:3] + [edited] + lines[4:],
        "swapped": lines[:3] + [lines[4], lines[3]] + lines[5:],
        "cut": lines[:-2],
    }
    for kind, content in variants.items():
        copy = STATE / f"{cid}-tampered-{kind}"
        shutil.copytree(STATE / cid, copy)
        try:
            (copy / "audit.jsonl").write_text("".join(content))
            v = audit("verify", copy.name)
            assert v.returncode == 1, (kind, v.stdout, v.stderr)
            assert "line" in (v.stdout + v.stderr), (kind, v.stdout, v.stderr)
        finally:
            shutil.rmtree(copy)


def test_ctr_run_audit(ctr_engine, tmp_path):
    repo = repo_at(tmp_path)
    cid = unique("ctr")
    p = sh([CTR, "-a", ctr_engine, "-n", CTR_NS, "run", "--rm", "--runtime", "io.containerd.runc.v2",
            "--runc-binary", BIN, "--annotation", "agentfense.io/policy=" + json.dumps(POLICY),
            "--mount", f"type=bind,src={repo},dst=/workspace,options=rbind:rw",
            CTR_IMAGE, cid, "sh", "-c", SCRIPT])
    assert p.returncode == 0, p.stderr
    no_leftovers()
    check_known_run(cid)
    assert audit("verify", cid).returncode == 0


def test_one_open_record_per_file_read(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    for i in range(100):
        d = repo / f"d{i:03}"
        d.mkdir(parents=True)
        for j in range(100):
            (d / f"f{j:03}.txt").write_text("x\n")
    name = unique()
    p = sh([DOCKER, "run", "--name", name, "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=read-only",
            "-v", f"{repo}:/workspace", IMAGE, "sh", "-c",
            "find /workspace -type f -exec cat {} + | wc -l"], timeout=600)
    assert p.stdout.strip() == "10000", p.stderr
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    sh([DOCKER, "rm", name], check=True)
    recs = records(cid)
    opens = [r for r in recs if r.get("op") == "open"]
    assert len(opens) == 10000
    assert all(r["decision"] == "allow" and r["bytes_read"] == 2 for r in opens)
    assert len({r["path"] for r in opens}) == 10000
    assert recs[-1]["info"]["dropped"] == 0
    assert audit("verify", cid[:12]).returncode == 0
    no_leftovers()


def test_foreground_run_records_the_exit_status(tmp_path, image):
    """`agentfense-runc run` reaps the container itself, so its delete record carries the
    exit status (under an engine the engine reaps it, and the field is null)."""
    import os
    repo = repo_at(tmp_path)
    bundle = make_bundle(tmp_path, ["sh", "-c", "cat /workspace/.env; exit 3"],
                         {"agentfense.io/policy": json.dumps(POLICY)}, repo)
    cid = unique("run")
    p = sh([BIN, "--root", tmp_path / "root", "run", "--bundle", bundle, cid])
    assert p.returncode == 3, p.stderr
    recs = records(cid)
    assert recs[-1]["event"] == "delete" and recs[-1]["info"]["exit_status"] == 3
    assert any(r.get("op") == "lookup" and r["path"] == "/.env" for r in recs)
    assert audit("verify", cid).returncode == 0
    no_leftovers()


def test_every_probe_of_a_hidden_name_is_recorded(docker_engine, image, tmp_path):
    """The kernel may remember that a name does not exist, but never for a name the policy
    hides: each probe reaches the daemon and the trail, whether the hidden file exists or not."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".env").write_text("SECRET\n")
    name = unique()
    p = sh([DOCKER, "run", "--name", name, "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=agent-safe",
            "-v", f"{repo}:/workspace", IMAGE, "sh", "-c",
            "for i in 1 2 3; do cat /workspace/.env; cat /workspace/.env.local; "
            "cat /workspace/absent; done 2>&1 | grep -c 'No such file'"], timeout=120)
    assert p.stdout.strip() == "9", p.stdout + p.stderr
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    sh([DOCKER, "rm", name], check=True)
    hidden = [r["path"] for r in records(cid) if r.get("decision") == "hidden"]
    assert hidden.count("/.env") == 3, hidden
    assert hidden.count("/.env.local") == 3, hidden
    assert "/absent" not in hidden
    no_leftovers()
