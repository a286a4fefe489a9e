"""Settling the delta (SPEC §5): commit at delete and later, conflicts with host changes, two
containers committing over one base, an interrupted commit run again, diff, discard, gc.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

from conftest import BIN, DOCKER, IMAGE, export_rootfs, make_bundle, sh, unique, wait_for
from test_fence import no_leftovers

STATE = Path("/var/lib/agentfense/containers")
POLICY = [{"pattern": "**", "permission": "write"},
          {"pattern": "**/.env", "permission": "none", "priority": 100},
          {"pattern": "/ro/**", "permission": "read", "priority": 50}]

LIST = r"""cd /w && find . -mindepth 1 | sort | while read p; do
  if [ -L "$p" ]; then echo "$p L $(readlink "$p")";
  elif [ -d "$p" ]; then echo "$p D $(stat -c %a "$p")";
  elif [ -p "$p" ]; then echo "$p P $(stat -c %a "$p")";
  else echo "$p F $(stat -c '%a %Y' "$p") $(md5sum < "$p" | cut -d' ' -f1)"; fi
done"""


def host_view(root, hidden=(".env",), readonly="./ro"):
    """The same listing as LIST, from the host, leaving out what the policy hides, with the
    write bits the fence takes away from what the policy makes read-only."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in hidden]
        for name in dirnames + filenames:
            if name in hidden:
                continue
            p = Path(dirpath) / name
            rel = "./" + str(p.relative_to(root))
            st = p.lstat()
            mode = st.st_mode & 0o7777
            if readonly and (rel == readonly or rel.startswith(readonly + "/")):
                mode &= ~0o222
            if p.is_symlink():
                out.append(f"{rel} L {os.readlink(p)}")
            elif p.is_dir():
                out.append(f"{rel} D {mode:o}")
            elif p.is_fifo():
                out.append(f"{rel} P {mode:o}")
            else:
                md5 = hashlib.md5(p.read_bytes()).hexdigest()
                out.append(f"{rel} F {mode:o} {int(st.st_mtime)} {md5}")
    return sorted(out)


def run(repo, script, delta="commit", name=None, detach=False, policy=POLICY):
    name = name or unique()
    args = [DOCKER, "run", "--name", name, "--runtime", "agentfense",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(policy), "-e", "AGENTFENSE_WORKSPACE=/w",
            "-e", f"AGENTFENSE_DELTA={delta}", "-v", f"{repo}:/w"]
    args += ["-d"] if detach else []
    p = sh([*args, IMAGE, "sh", "-c", script], timeout=120)
    assert p.returncode == 0, p.stderr
    return name, p.stdout


def cid_of(name):
    return sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()


def rm(name):
    sh([DOCKER, "rm", "-f", name], check=True)


def runtime(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return sh([BIN, *args], env=e, timeout=120)


def audit_records(cid):
    return [json.loads(l) for l in (STATE / cid / "audit.jsonl").read_text().splitlines()]


def forget(cid):
    sh(["rm", "-rf", str(STATE / cid)])


def make_repo(root):
    (root / "d").mkdir(parents=True)
    (root / "gone" / "deep").mkdir(parents=True)
    (root / "hid").mkdir()
    (root / "ro").mkdir()
    files = {"keep.txt": "keep\n", "mod.txt": "mod\n", "del.txt": "del\n", "ren.txt": "ren\n",
             "d/a": "a\n", "d/b": "b\n", "gone/x": "x\n", "gone/deep/y": "y\n",
             "hid/visible": "v\n", "hid/.env": "SECRET=1\n", ".env": "TOP=1\n",
             "ro/r.txt": "r\n", "chm.txt": "chmod me\n"}
    for rel, text in files.items():
        (root / rel).write_text(text)
        os.utime(root / rel, (1_500_000_000, 1_500_000_000))
    os.symlink("keep.txt", root / "link")
    return root


CHANGES = """cd /w && echo new > new.txt && echo more >> mod.txt && rm del.txt && mv ren.txt renamed.txt \
 && mkdir newdir && echo x > newdir/x && ln -s newdir/x newlink && rm -rf gone \
 && rm -rf d && mkdir d && echo fresh > d/c && rm -rf hid && chmod 600 chm.txt \
 && ln new.txt hard.txt && rm link && ln -s new.txt link && mkfifo pipe"""


def test_commit_at_delete_gives_the_host_the_containers_view(docker_engine, image, tmp_path):
    repo = make_repo(tmp_path / "repo")
    name, out = run(repo, CHANGES + " && " + LIST)
    cid = cid_of(name)
    rm(name)
    no_leftovers()
    seen = sorted(out.splitlines())
    assert any(l.startswith("./new.txt F 644 ") for l in seen)
    # The host now holds exactly what the container saw, and still what it could not see:
    # `hid` was removed in the container, but holds a hidden .env, which stays (with `hid`).
    assert host_view(repo) == sorted(seen + ["./hid D 755"])
    assert (repo / ".env").read_text() == "TOP=1\n"
    # A directory removed in the container keeps its hidden entries on the host.
    assert sorted(os.listdir(repo / "hid")) == [".env"]
    assert (repo / "hid" / ".env").read_text() == "SECRET=1\n"
    # Hard links stay hard links; the fifo is a fifo; nothing temporary is left.
    assert os.stat(repo / "new.txt").st_ino == os.stat(repo / "hard.txt").st_ino
    assert (repo / "pipe").is_fifo()
    assert not [p for p in repo.rglob(".agentfense-commit-*")]
    # The delta is gone once everything landed, and the commit is in the audit trail.
    up = json.loads((STATE / cid / "fence.json").read_text())["workspaces"][0]["upper"]
    assert os.listdir(up) == []
    recs = audit_records(cid)
    commit = [r for r in recs if r["event"] == "commit"]
    assert len(commit) == 1 and commit[0]["info"]["conflicts"] == []
    assert commit[0]["info"]["complete"] is True
    assert runtime("audit", "verify", cid).returncode == 0
    assert runtime("diff", cid).stdout == ""
    forget(cid)


def test_host_changes_are_conflicts_and_keep_the_hosts_content(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for n in ("f.txt", "g.txt", "h.txt"):
        (repo / n).write_text(f"{n} base\n")
    name, _ = run(repo, "echo container >> /w/f.txt; echo container >> /w/g.txt; rm /w/h.txt; "
                        "echo new > /w/n.txt; touch /tmp/done; sleep 1000", delta="commit",
                  detach=True)
    cid = cid_of(name)
    # Wait for the container's changes, then change the host behind its back.
    wait_for(lambda: sh([DOCKER, "exec", name, "test", "-e", "/tmp/done"]).returncode == 0,
             "the container to make its changes")
    (repo / "f.txt").write_text("host edit\n")
    (repo / "h.txt").write_text("host edit of a file the container deleted\n")
    (repo / "n.txt").write_text("host made it too\n")
    rm(name)
    no_leftovers()
    assert (repo / "f.txt").read_text() == "host edit\n"
    assert (repo / "g.txt").read_text() == "g.txt base\ncontainer\n"
    assert (repo / "h.txt").read_text() == "host edit of a file the container deleted\n"
    assert (repo / "n.txt").read_text() == "host made it too\n"
    recs = [r for r in audit_records(cid) if r["event"] == "commit"]
    conflicts = sorted(c["path"] for c in recs[-1]["info"]["conflicts"])
    assert conflicts == ["/w/f.txt", "/w/h.txt", "/w/n.txt"]
    # The container's versions stay in the kept delta: diff shows them, commit lists them.
    diff = runtime("diff", cid).stdout.splitlines()
    assert "C /w/f.txt" in diff and "D /w/h.txt" in diff and "A /w/n.txt" in diff
    assert "C /w/g.txt" not in diff
    p = runtime("commit", cid)
    assert p.returncode == 2, p.stdout + p.stderr
    assert sorted(l.split(":")[1].strip() for l in p.stdout.splitlines()
                  if l.startswith("conflict:")) == conflicts
    assert (repo / "f.txt").read_text() == "host edit\n"
    assert runtime("audit", "verify", cid).returncode == 0
    forget(cid)


def test_a_second_commit_does_not_undo_the_first(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for n in ("x.txt", "y.txt", "z.txt"):
        (repo / n).write_text(f"{n} base\n")
    done = "touch /tmp/done; sleep 1000"
    a, _ = run(repo, f"echo A >> /w/x.txt; rm /w/z.txt; {done}", delta="keep", detach=True)
    b, _ = run(repo, f"cat /w/x.txt >/dev/null; echo B >> /w/y.txt; {done}", delta="keep",
               detach=True)
    c, _ = run(repo, f"echo C >> /w/x.txt; echo C > /w/z.txt; {done}", delta="keep",
               detach=True)
    ids = {n: cid_of(n) for n in (a, b, c)}
    for n in (a, b, c):
        wait_for(lambda: sh([DOCKER, "exec", n, "test", "-e", "/tmp/done"]).returncode == 0,
                 f"{n} to make its changes")
    sh([DOCKER, "exec", a, "sh", "-c", "test ! -e /w/z.txt"], check=True)
    for n in (a, b, c):
        rm(n)
    no_leftovers()
    assert runtime("commit", ids[a]).returncode == 0
    assert runtime("commit", ids[b]).returncode == 0
    # C changed x and recreated z from what it saw before A's commit: both are conflicts.
    p = runtime("commit", ids[c])
    assert p.returncode == 2, p.stdout + p.stderr
    assert (repo / "x.txt").read_text() == "x.txt base\nA\n"
    assert (repo / "y.txt").read_text() == "y.txt base\nB\n"
    assert not (repo / "z.txt").exists()
    assert "conflict: /w/x.txt" in p.stdout and "conflict: /w/z.txt" in p.stdout
    for cid in ids.values():
        forget(cid)


def test_an_interrupted_commit_runs_again_cleanly(docker_engine, image, tmp_path):
    repo = make_repo(tmp_path / "repo")
    name, out = run(repo, CHANGES + " && " + LIST, delta="keep")
    cid = cid_of(name)
    rm(name)
    p = runtime("commit", cid, env={"AGENTFENSE_TEST_COMMIT_INTERRUPT_AFTER": "3"})
    assert p.returncode == 1 and "interrupted" in p.stderr, p.stdout + p.stderr
    assert host_view(repo) != sorted(out.splitlines())
    p = runtime("commit", cid)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "conflict" not in p.stdout
    assert host_view(repo) == sorted(out.splitlines() + ["./hid D 755"])
    assert not [p for p in repo.rglob(".agentfense-commit-*")]
    recs = [r for r in audit_records(cid) if r["event"] == "commit"]
    assert [r["info"]["complete"] for r in recs] == [False, True]
    assert runtime("audit", "verify", cid).returncode == 0
    forget(cid)


def test_diff_of_a_running_container(docker_engine, image, tmp_path):
    repo = make_repo(tmp_path / "repo")
    name, _ = run(repo, CHANGES + " && touch /tmp/done && sleep 1000", delta="keep", detach=True)
    cid = cid_of(name)
    try:
        wait_for(lambda: sh([DOCKER, "exec", name, "test", "-e", "/tmp/done"]).returncode == 0,
                 "the container to make its changes")
        lines = runtime("diff", cid[:12]).stdout.splitlines()
        want = {
            "C /w", "A /w/new.txt", "A /w/hard.txt", "C /w/mod.txt", "D /w/del.txt",
            "D /w/ren.txt", "A /w/renamed.txt", "A /w/newdir", "A /w/newdir/x", "A /w/newlink",
            "D /w/gone", "D /w/gone/x", "D /w/gone/deep", "D /w/gone/deep/y",
            "C /w/d", "D /w/d/a", "D /w/d/b", "A /w/d/c", "D /w/hid", "D /w/hid/visible",
            "C /w/chm.txt", "C /w/link", "A /w/pipe",
        }
        assert set(lines) == want, sorted(set(lines) ^ want)
        js = json.loads(runtime("diff", "--format", "json", cid).stdout)
        assert {f"{e['kind']} {e['path']}" for e in js} == want
        # Nothing is settled while it runs.
        p = runtime("commit", cid)
        assert p.returncode == 1 and "still running" in p.stderr
    finally:
        rm(name)
    forget(cid)


def test_discard_drops_the_delta_and_keeps_the_trail(docker_engine, image, tmp_path):
    repo = make_repo(tmp_path / "repo")
    before = host_view(repo, hidden=(), readonly=None)
    name, _ = run(repo, CHANGES, delta="discard")
    cid = cid_of(name)
    rm(name)
    no_leftovers()
    assert host_view(repo, hidden=(), readonly=None) == before
    up = Path(json.loads((STATE / cid / "fence.json").read_text())["workspaces"][0]["upper"])
    assert not up.exists()
    assert runtime("audit", "verify", cid).returncode == 0
    forget(cid)


def test_diff_of_a_missing_container_is_a_clear_error(tmp_path):
    p = runtime("diff", "no-such-container-" + unique())
    assert p.returncode == 1 and "no container matches" in p.stderr


def test_gc_removes_only_what_no_longer_exists(tmp_path, agentfense_bin):
    state = tmp_path / "state"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"state_dir": str(state)}))
    root = tmp_path / "root"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f").write_text("base\n")
    ann = {"agentfense.io/preset": "full-access", "agentfense.io/workspace": "/workspace"}
    rootfs = export_rootfs(tmp_path / "rootfs")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    done = make_bundle(tmp_path / "a", ["sh", "-c", "echo x > /workspace/g"], ann, ws, rootfs)
    base = [str(BIN), "--root", str(root), "--agentfense-config", str(cfg)]
    gone = unique()
    p = sh([*base, "run", "--bundle", done, gone])
    assert p.returncode == 0, p.stderr
    live = unique()
    b2 = make_bundle(tmp_path / "b", ["sleep", "1000"], ann, ws, rootfs)
    rc = subprocess.run([*base, "run", "--detach", "--bundle", str(b2), live],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=60).returncode
    assert rc == 0
    try:
        assert sorted(os.listdir(state / "containers")) == sorted([gone, live])
        p = sh([*base, "gc", "--dry-run", "-v"], check=True)
        assert f"would remove {gone}" in p.stdout
        assert f"kept {live}: its fence is live" in p.stdout
        assert (state / "containers" / gone).exists()
        p = sh([*base, "gc", "--older-than", "1h"], check=True)
        assert p.stdout == ""
        p = sh([*base, "gc"], check=True)
        assert p.stdout.splitlines() == [f"removed {gone}"]
        assert sorted(os.listdir(state / "containers")) == [live]
    finally:
        sh([*base, "delete", "--force", live])
    p = sh([*base, "gc"], check=True)
    assert p.stdout.splitlines() == [f"removed {live}"]
    assert os.listdir(state / "containers") == []
    assert (ws / "f").read_text() == "base\n" and not (ws / "g").exists()
    no_leftovers()
