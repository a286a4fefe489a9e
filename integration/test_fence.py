"""The fence, from inside real containers: every row of SPEC §4 for every level, through Docker
(environment form: Docker 20.10 has no --annotation), ctr and podman (annotations), as root
and as an ordinary user, on bind-mounted and image-content workspaces, read-only binds, two
workspaces at once and `docker exec`; and after each run, no mount and no daemon left behind,
and the base untouched.
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    BIN, CTR, CTR_IMAGE, CTR_NS, DOCKER, IMAGE, PODMAN, PODMAN_ULIMITS, REPO, export_rootfs,
    make_bundle, sh, unique, wait_for,
)

LEVELS = ("none", "view", "read", "write")
TABLE_POLICY = [
    {"pattern": "/none", "permission": "none", "type": "directory"},
    {"pattern": "/view", "permission": "view", "type": "directory"},
    {"pattern": "/read", "permission": "read", "type": "directory"},
    {"pattern": "/write", "permission": "write", "type": "directory"},
    {"pattern": "**/.env", "permission": "none", "priority": 100},
]


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe"
    sh(["gcc", "-static", "-O2", "-o", out, REPO / "integration" / "probe.c"], check=True)
    return out


def podman_value(v):
    """podman reads --annotation values as CSV: quote one that holds quotes or commas."""
    return '"' + v.replace('"', '""') + '"' if any(c in v for c in '",') else v


def fence_mounts_and_daemons():
    mounts = {l.split()[1] for l in Path("/proc/mounts").read_text().splitlines() if "agentfense" in l}
    daemons = set(sh(["pgrep", "-f", "fence-daemon"]).stdout.split())
    return mounts, daemons


# Fences that were there before the tests (someone else's) are not the tests' leftovers.
BEFORE = fence_mounts_and_daemons()


def no_leftovers():
    """No fence mount and no fence daemon left on the host by the tests."""
    def clean():
        mounts, daemons = fence_mounts_and_daemons()
        return mounts <= BEFORE[0] and daemons <= BEFORE[1]
    wait_for(clean, "fence mounts and daemons to go away", timeout=15)


def tree_digest(root):
    """A digest of names, types, modes and contents under root (no following links)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_mode:o}".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def make_table_repo(root):
    for lvl in LEVELS:
        d = root / lvl
        (d / "d").mkdir(parents=True)
        for f in ("f", "f2", "f3"):
            (d / f).write_text(f"{lvl} content\n")
        os.symlink("f", d / "l")
    (root / "write" / ".env").write_text("SECRET=1\n")
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, 0o666)


def table_checks(ws, nonroot):
    """(check line, expected result) pairs for the SPEC §4 table."""
    checks = []

    def add(op, path, arg, expect):
        checks.append((f"{op} {path} {arg}".strip(), f"{op} {path} {expect}"))

    for lvl in LEVELS:
        d = f"{ws}/{lvl}"
        hidden = lvl == "none"
        see = "ENOENT" if hidden else "ok"
        rd = "ENOENT" if hidden else ("EACCES" if lvl == "view" else "ok")
        wr = "ENOENT" if hidden else ("ok" if lvl == "write" else "EACCES")
        add("listed", ws, lvl, see)
        add("stat", f"{d}/f", "", see)
        add("lstat", f"{d}/l", "", see)
        add("read", f"{d}/f", "", rd)
        add("readlink", f"{d}/l", "", rd)
        add("getxattr", f"{d}/f", "", rd)
        add("write", f"{d}/f", "", wr)
        add("truncate", f"{d}/f2", "", wr)
        add("setxattr", f"{d}/f", "", wr)
        add("create", f"{d}/new", "", wr)
        add("mkdir", f"{d}/newd", "", wr)
        add("symlink", f"{d}/news", "", wr)
        add("mkfifo", f"{d}/newp", "", wr)
        add("unlink", f"{d}/l", "", wr)
        add("rmdir", f"{d}/d", "", wr)
        # The policy answers first (SPEC §4), before Unix rules such as fs.protected_hardlinks.
        add("link", f"{d}/f3", f"{ws}/write/link-{lvl}", wr)
        add("rename", f"{d}/f", f"{ws}/write/moved-{lvl}", wr)
        if lvl != "none":
            # access(2) agrees with the policy for every user, root (with CAP_DAC_OVERRIDE)
            # included.
            add("access_w", f"{d}/f2", "", "ok" if lvl == "write" else "EACCES")
    # A hidden name inside a writable directory: absent, and nothing can be made there.
    env = f"{ws}/write/.env"
    add("listed", f"{ws}/write", ".env", "ENOENT")
    add("stat", env, "", "ENOENT")
    add("read", env, "", "ENOENT")
    add("create", env, "", "EACCES")
    add("mkdir", env, "", "EACCES")
    add("symlink", env, "", "EACCES")
    add("unlink", env, "", "ENOENT")
    add("rename", f"{ws}/write/f2", env, "EACCES")
    # Reads after the changes: the container sees its own writes.
    add("read", f"{ws}/write/moved-write", "", "ok")
    add("stat", f"{ws}/write/f", "", "ENOENT")
    return checks


def run_probe_lines(cmd_prefix, checks):
    p = sh([*cmd_prefix, "-a", *(c for c, _ in checks)], timeout=120)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    got = p.stdout.splitlines()
    return got


def assert_table(got, checks):
    expected = [e for _, e in checks]
    assert len(got) == len(expected), (got, expected)
    wrong = [(g, e) for g, e in zip(got, expected) if g != e]
    assert not wrong, "\n".join(f"got {g!r}, expected {e!r}" for g, e in wrong)


def check_host_after(repo, digest, upper_root=None):
    assert tree_digest(repo) == digest, "the base changed"
    no_leftovers()


def state_dir_of(cid):
    return Path("/var/lib/agentfense/containers") / cid


# ------------------------------------------------------------------ the table


@pytest.mark.parametrize("user", ["root", "1000:1000"])
def test_docker_table(docker_engine, image, probe, tmp_path, user):
    repo = tmp_path / "repo"
    make_table_repo(repo)
    digest = tree_digest(repo)
    checks = table_checks("/workspace", user != "root")
    name = unique()
    got = run_probe_lines(
        [DOCKER, "run", "--name", name, "--runtime", "agentfense", "-u", user,
         "-e", "AGENTFENSE_POLICY=" + json.dumps(TABLE_POLICY),
         "-v", f"{repo}:/workspace", "-v", f"{probe}:/probe:ro", IMAGE, "/probe"],
        checks)
    assert_table(got, checks)
    check_host_after(repo, digest)
    # The container's writes are in its delta, kept after delete.
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    sh([DOCKER, "rm", name], check=True)
    record = json.loads((state_dir_of(cid) / "fence.json").read_text())
    assert record["workspaces"][0]["base"] == str(repo) and not record["live"]
    upper = Path(record["workspaces"][0]["upper"])
    assert (upper / "write" / "moved-write").read_text() == "write content\nx"
    assert (upper / "write" / "new").exists()


def test_ctr_table_with_annotations(ctr_engine, probe, tmp_path):
    repo = tmp_path / "repo"
    make_table_repo(repo)
    digest = tree_digest(repo)
    checks = table_checks("/workspace", False)
    cid = unique("ctr")
    got = run_probe_lines(
        [CTR, "-a", ctr_engine, "-n", CTR_NS, "run", "--rm", "--runtime", "io.containerd.runc.v2",
         "--runc-binary", BIN, "--annotation", "agentfense.io/policy=" + json.dumps(TABLE_POLICY),
         "--mount", f"type=bind,src={repo},dst=/workspace,options=rbind:rw",
         "--mount", f"type=bind,src={probe},dst=/probe,options=rbind:ro",
         CTR_IMAGE, cid, "/probe"],
        checks)
    assert_table(got, checks)
    check_host_after(repo, digest)


def test_podman_table_with_annotations(podman_engine, probe, tmp_path):
    repo = tmp_path / "repo"
    make_table_repo(repo)
    digest = tree_digest(repo)
    checks = table_checks("/workspace", True)
    got = run_probe_lines(
        [PODMAN, "--runtime", BIN, "--cgroup-manager", "cgroupfs", "run", "--rm", "-i",
         "--network", "none", *PODMAN_ULIMITS, "-u", "1000:1000",
         "--annotation", podman_value("agentfense.io/policy=" + json.dumps(TABLE_POLICY)),
         "-v", f"{repo}:/workspace", "-v", f"{probe}:/probe:ro", IMAGE, "/probe"],
        checks)
    assert_table(got, checks)
    check_host_after(repo, digest)


def test_docker_exec_is_fenced_too(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    make_table_repo(repo)
    digest = tree_digest(repo)
    name = unique()
    cleanup_docker.append(name)
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense",
        "-e", "AGENTFENSE_POLICY=" + json.dumps(TABLE_POLICY),
        "-v", f"{repo}:/workspace", "-v", f"{probe}:/probe:ro", IMAGE, "sleep", "1000"], check=True)
    checks = table_checks("/workspace", True)
    got = run_probe_lines([DOCKER, "exec", "-u", "1000:1000", name, "/probe"], checks)
    assert_table(got, checks)
    # The fencing variables never reach the container's environment.
    env = sh([DOCKER, "exec", name, "env"]).stdout
    assert "AGENTFENSE" not in env
    sh([DOCKER, "rm", "-f", name], check=True)
    check_host_after(repo, digest)


# ------------------------------------------------------------------ workspace shapes


def test_read_only_bind_stays_read_only(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    (repo / "out").mkdir(parents=True)
    (repo / "a.txt").write_text("a\n")
    digest = tree_digest(repo)
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=full-access",
            "-v", f"{repo}:/workspace:ro", IMAGE, "sh", "-c",
            "cat /workspace/a.txt; echo x > /workspace/out/b 2>&1 || echo refused"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == "a\nrefused\n"
    assert "Read-only file system" in p.stderr
    check_host_after(repo, digest)


def test_image_content_workspace(docker_engine, image):
    """A workspace that is no bind mount: the image's own /srv/app, fenced."""
    policy = [{"pattern": "**/*", "permission": "read"},
              {"pattern": "/secret.txt", "permission": "none", "type": "file"}]
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_WORKSPACE=/srv/app",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(policy), IMAGE, "sh", "-c",
            "ls /srv/app; cat /srv/app/public.txt; cat /srv/app/secret.txt"])
    assert p.returncode == 1
    assert p.stdout == "public.txt\npublic\n"
    assert "No such file or directory" in p.stderr
    no_leftovers()


def test_two_workspaces(docker_engine, image, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "main.c").write_text("int main;\n")
    (src / ".env").write_text("X=1\n")
    policy = [{"pattern": "**/*", "permission": "write"}, {"pattern": "**/.env", "permission": "none"}]
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_WORKSPACE=/src,/out",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(policy),
            "-v", f"{src}:/src", "-v", f"{out}:/out", IMAGE, "sh", "-c",
            "ls -a /src; cat /src/main.c > /out/copy.c; cat /out/copy.c; mount | grep -c agentfense"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == ".\n..\nmain.c\nint main;\n2\n"
    # delta keep: the host directories are untouched.
    assert not (out / "copy.c").exists()
    no_leftovers()


def test_workspace_that_is_not_there_is_refused(docker_engine, image, tmp_path):
    """A repository mounted elsewhere than the workspace path must not run unfenced while an
    empty /workspace is fenced instead."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".env").write_text("s\n")
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=agent-safe",
            "-v", f"{repo}:/code", IMAGE, "cat", "/code/.env"])
    assert p.returncode != 0 and p.stdout == ""
    assert "workspace /workspace is neither a bind mount" in p.stderr, p.stderr
    no_leftovers()


def test_unfenced_container_gets_no_fence(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".env").write_text("visible\n")
    name = unique()
    p = sh([DOCKER, "run", "--rm", "--name", name, "--runtime", "agentfense", "-v",
            f"{repo}:/workspace", IMAGE, "sh", "-c", "cat /workspace/.env; mount | grep -c fuse || true"])
    assert p.stdout == "visible\n0\n"
    no_leftovers()


def test_bad_policy_never_starts_the_container(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for env, words in [
        ("AGENTFENSE_PRESET=agent-unsafe", "unknown preset"),
        ('AGENTFENSE_POLICY=[{"pattern": "a[", "permission": "read"}]', "rule 0"),
        ('AGENTFENSE_POLICY=[{"pattern": "*", "permission": "rw"}]', "rw"),
        ("AGENTFENSE_POLICY_NAME=../etc/passwd", "policy"),
        ("AGENTFENSE_TYPO=1", "AGENTFENSE_TYPO"),
    ]:
        p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", env, "-v",
                f"{repo}:/workspace", IMAGE, "sh", "-c", "echo RAN > /workspace/ran"])
        assert p.returncode != 0, env
        assert "RAN" not in p.stdout
        assert words in p.stderr, (env, p.stderr)
        assert not (repo / "ran").exists()
    no_leftovers()


def test_restart_keeps_the_delta(docker_engine, image, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "output").mkdir(parents=True)
    name = unique()
    cleanup_docker.append(name)
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense", "-e",
        "AGENTFENSE_PRESET=agent-safe", "-v", f"{repo}:/workspace", IMAGE, "sh", "-c",
        "echo $$ >> /workspace/output/starts; sleep 1000"], check=True)
    wait_for(lambda: sh([DOCKER, "exec", name, "cat", "/workspace/output/starts"]).stdout.count("\n") == 1,
             "first start")
    sh([DOCKER, "restart", "-t", "1", name], check=True)
    wait_for(lambda: sh([DOCKER, "exec", name, "cat", "/workspace/output/starts"]).stdout.count("\n") == 2,
             "second start to append to the same delta")
    assert not (repo / "output" / "starts").exists()
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_killed_daemon_fails_closed_and_delete_cleans_up(docker_engine, image, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("a\n")
    name = unique()
    cleanup_docker.append(name)
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense", "-e",
        "AGENTFENSE_PRESET=read-only", "-v", f"{repo}:/workspace", IMAGE, "sleep", "1000"], check=True)
    assert sh([DOCKER, "exec", name, "cat", "/workspace/a.txt"]).stdout == "a\n"
    for pid in fence_mounts_and_daemons()[1] - BEFORE[1]:
        os.kill(int(pid), 9)
    p = sh([DOCKER, "exec", name, "cat", "/workspace/a.txt"])
    assert p.returncode != 0 and p.stdout == ""
    assert "Transport endpoint is not connected" in p.stderr or "I/O error" in p.stderr, p.stderr
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_failed_create_after_fencing_leaves_nothing(docker_engine, image, tmp_path):
    """The fence is up when libcontainer fails (no such program): it is torn down again."""
    repo = tmp_path / "repo"
    repo.mkdir()
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=read-only",
            "-v", f"{repo}:/workspace", IMAGE, "/nonexistent"])
    assert p.returncode == 127, p.stderr
    assert "/nonexistent" in p.stderr
    no_leftovers()


def test_delete_force_cleans_up_after_a_runtime_that_lost_its_state(tmp_path, image):
    """As after a runtime killed half way through create: the fence is up, the container's
    state is gone. `delete --force` still stops the daemon and unmounts."""
    repo = tmp_path / "repo"
    repo.mkdir()
    bundle = make_bundle(tmp_path, ["sleep", "1000"], {"agentfense.io/preset": "read-only"}, repo)
    root = tmp_path / "runtime-root"
    cid = unique("crash")
    # The container keeps the stdio it is given: give it a file, not a pipe.
    with open(tmp_path / "create.err", "w+") as err:
        p = subprocess.run([str(BIN), "--root", str(root), "create", "--bundle", str(bundle), cid],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                           timeout=60)
    assert p.returncode == 0, (tmp_path / "create.err").read_text()
    assert fence_mounts_and_daemons() != BEFORE
    # The runtime's own state is lost (the container's processes are killed by hand).
    state = json.loads(sh([BIN, "--root", root, "state", cid], check=True).stdout)
    os.kill(state["pid"], 9)
    shutil.rmtree(root / cid)
    p = sh([BIN, "--root", root, "delete", "--force", cid])
    assert p.returncode == 0, p.stderr
    no_leftovers()


def test_image_symlink_cannot_point_the_workspace_at_the_host(tmp_path, image):
    """An image whose /proj is a symlink to a host path: fencing /proj/app is refused, never
    served from the host directory."""
    hostdir = tmp_path / "hostdir"
    (hostdir / "app").mkdir(parents=True)
    (hostdir / "app" / "host.txt").write_text("HOST-ONLY\n")
    rootfs = export_rootfs(tmp_path / "rootfs")
    os.symlink(hostdir, rootfs / "proj")
    bundle = make_bundle(tmp_path, ["cat", "/proj/app/host.txt"],
                         {"agentfense.io/preset": "read-only", "agentfense.io/workspace": "/proj/app"},
                         rootfs=rootfs)
    p = sh([BIN, "--root", tmp_path / "root", "run", "--bundle", bundle, unique("sym")])
    assert p.returncode != 0
    assert "HOST-ONLY" not in p.stdout
    assert "symlink in the image" in p.stderr, p.stderr
    no_leftovers()


def test_second_create_under_the_same_id_leaves_the_first_fence_alone(tmp_path, image):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("a\n")
    bundle = make_bundle(tmp_path, ["sleep", "1000"], {"agentfense.io/preset": "read-only"}, repo)
    original = (bundle / "config.json").read_text()
    root = tmp_path / "runtime-root"
    cid = unique("dup")
    with open(tmp_path / "err", "w") as err:
        first = subprocess.run([str(BIN), "--root", str(root), "run", "-d", "--bundle", str(bundle), cid],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=60)
    assert first.returncode == 0, (tmp_path / "err").read_text()
    # The bundle is left as the engine wrote it.
    assert json.loads((bundle / "config.json").read_text()) == json.loads(original)
    second = sh([BIN, "--root", root, "create", "--bundle", bundle, cid])
    assert second.returncode != 0 and "already exists" in second.stderr, second.stderr
    p = sh([BIN, "--root", root, "exec", cid, "cat", "/workspace/a.txt"])
    assert p.stdout == "a\n", p.stderr
    assert sh([BIN, "--root", root, "delete", "--force", cid]).returncode == 0
    no_leftovers()


@pytest.fixture(scope="module")
def table_image(image, tmp_path_factory):
    """An image whose own /workspace holds the table's layout (no bind mount)."""
    name = "agentfense-test/table:latest"
    root = tmp_path_factory.mktemp("table-rootfs")
    export_rootfs(root)
    make_table_repo(root / "workspace")
    tar = root.parent / "table.tar"
    sh(["tar", "-C", root, "-cf", tar, "."], check=True)
    sh([DOCKER, "import", "-c", "ENV PATH=/bin", tar, name], check=True)
    return name


@pytest.mark.parametrize("user", ["root", "1000:1000"])
def test_docker_table_on_image_content(docker_engine, table_image, probe, user):
    checks = table_checks("/workspace", user != "root")
    name = unique()
    got = run_probe_lines(
        [DOCKER, "run", "--rm", "--name", name, "--runtime", "agentfense", "-u", user,
         "-e", "AGENTFENSE_POLICY=" + json.dumps(TABLE_POLICY),
         "-v", f"{probe}:/probe:ro", table_image, "/probe"],
        checks)
    assert_table(got, checks)
    no_leftovers()


def test_the_daemon_keeps_only_the_capabilities_it_needs(docker_engine, image, tmp_path):
    """A fence daemon runs as root on the host: after start it holds only CAP_CHOWN,
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_SYS_ADMIN and CAP_MKNOD
    (also in its bounding set), none inheritable or ambient, with no_new_privs and a seccomp
    filter, and serves
    the fence with them (reads, copy-up of a file owned by someone else, whiteouts)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "theirs.txt").write_text("x\n")
    os.chown(repo / "theirs.txt", 4321, 4321)
    os.chmod(repo / "theirs.txt", 0o600)
    (repo / "gone.txt").write_text("y\n")
    name = unique()
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense", "-e",
        "AGENTFENSE_PRESET=full-access", "-e", "AGENTFENSE_WORKSPACE=/w", "-v", f"{repo}:/w",
        IMAGE, "sleep", "1000"], check=True)
    try:
        cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
        rec = json.loads((state_dir_of(cid) / "fence.json").read_text())
        pid = rec["workspaces"][0]["daemon"]["pid"]
        status = dict(l.split(":\t", 1) for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in l)
        want = sum(1 << b for b in (0, 1, 2, 3, 4, 21, 27))
        for k in ("CapEff", "CapPrm", "CapBnd"):
            assert int(status[k], 16) == want, (k, status[k])
        assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"  # a filter: the daemon's syscall allowlist
        p = sh([DOCKER, "exec", name, "sh", "-c",
                "echo more >> /w/theirs.txt && rm /w/gone.txt && stat -c '%u %a' /w/theirs.txt"])
        assert p.returncode == 0 and p.stdout == "4321 600\n", p.stdout + p.stderr
    finally:
        sh([DOCKER, "rm", "-f", name])
    no_leftovers()
