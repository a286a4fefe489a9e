"""Fault injection: the fence under a killed daemon, a full disk, descriptor exhaustion, a host
changing the base underneath, many files. After each: no hidden data exposed, no base data
changed, the delta intact up to the last completed write, nothing left behind.
"""

import errno
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, DOCKER, IMAGE, DirectFence, sh, unique, wait_for
from test_fence import BEFORE, fence_mounts_and_daemons, no_leftovers, tree_digest

FULL = json.dumps({"default": "none", "rules": [
    {"pattern": "**", "permission": "write", "type": "glob", "priority": 0},
    {"pattern": "**/.env", "permission": "none", "type": "glob", "priority": 9}]})


class Fence(DirectFence):
    """A fence mounted by the daemon directly (no engine), over `base`, delta in `upper`."""

    def __init__(self, tmp, base, upper=None, policy=FULL, nofile=None):
        self.dir = tmp / unique("fence")
        super().__init__(base, upper or self.dir / "upper", self.dir / "mnt", policy,
                         self.dir.name, nofile=nofile)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_daemon_killed_mid_grep_and_mid_write(docker_engine, image, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    for i in range(300):
        (repo / "src" / f"f{i}.txt").write_text(f"line {i}\n" * 50)
    (repo / ".env").write_text("SECRET=never\n")
    (repo / "out").mkdir()
    digest = tree_digest(repo)
    name = unique()
    cleanup_docker.append(name)
    script = ("i=0; while true; do i=$((i+1)); echo \"record $i complete\" >> /w/out/log || exit 3; "
              "done & while true; do grep -r never /w >/dev/null 2>&1; done")
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense",
        "-e", "AGENTFENSE_POLICY=" + json.dumps([{"pattern": "**", "permission": "write"},
                                                 {"pattern": "**/.env", "permission": "none",
                                                  "priority": 9}]),
        "-e", "AGENTFENSE_WORKSPACE=/w", "-v", f"{repo}:/w", IMAGE, "sh", "-c", script], check=True)
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    rec = json.loads((Path("/var/lib/agentfense/containers") / cid / "fence.json").read_text())
    upper = Path(rec["workspaces"][0]["upper"])
    wait_for(lambda: (upper / "out" / "log").exists() and (upper / "out" / "log").stat().st_size > 2000,
             "the writer to get going")
    os.kill(rec["workspaces"][0]["daemon"]["pid"], 9)
    time.sleep(0.5)
    # Fails closed: nothing readable, nothing written any more.
    p = sh([DOCKER, "exec", name, "sh", "-c", "cat /w/src/f1.txt; cat /w/.env; ls /w"])
    assert p.stdout == "" and "never" not in p.stderr
    size = (upper / "out" / "log").stat().st_size
    time.sleep(0.5)
    assert (upper / "out" / "log").stat().st_size == size
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()
    # The delta holds whole records, in order, up to the last completed write.
    lines = (upper / "out" / "log").read_text().split("\n")
    complete = lines[:-1] if lines[-1] == "" else lines[:-1]
    assert complete, "no record written"
    assert complete == [f"record {i} complete" for i in range(1, len(complete) + 1)]
    assert lines[-1] == "" or f"record {len(complete) + 1} complete".startswith(lines[-1])
    assert tree_digest(repo) == digest
    sh(["rm", "-rf", str(Path("/var/lib/agentfense/containers") / cid)])


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs for the delta."""
    d = tmp_path / "small"
    d.mkdir()
    sh(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    yield d
    sh(["umount", "-l", str(d)])


def test_full_disk_under_the_delta(tmp_path, small_fs):
    base = tmp_path / "base"
    base.mkdir()
    (base / "keep.txt").write_text("base\n")
    digest = tree_digest(base)
    f = Fence(tmp_path, base, upper=small_fs / "upper")
    try:
        m = f.mnt
        (m / "small.txt").write_text("fits\n")
        with pytest.raises(OSError) as e:
            with open(m / "big.bin", "wb") as out:
                for _ in range(16):
                    out.write(b"x" * (1 << 20))
                    out.flush()
                    os.fsync(out.fileno())
        assert e.value.errno == errno.ENOSPC
        # Copy-up of a base file on a full disk fails cleanly and leaves the base alone.
        with pytest.raises(OSError) as e:
            with open(m / "keep.txt", "a") as out:
                out.write("more\n")
        assert e.value.errno == errno.ENOSPC
        assert (m / "keep.txt").read_text() == "base\n"
        os.unlink(m / "big.bin")
        (m / "after.txt").write_text("room again\n")
        assert (m / "small.txt").read_text() == "fits\n"
        assert (m / "after.txt").read_text() == "room again\n"
        with open(m / "keep.txt", "a") as out:
            out.write("more\n")
        assert (m / "keep.txt").read_text() == "base\nmore\n"
    finally:
        f.close()
    assert tree_digest(base) == digest
    assert (small_fs / "upper" / "small.txt").read_text() == "fits\n"


def test_descriptor_exhaustion_is_an_error_not_a_crash(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for i in range(64):
        (base / f"f{i}").write_text(str(i))
    f = Fence(tmp_path, base, nofile=256)
    try:
        daemon_limit = int(Path(f"/proc/{f.pid()}/limits").read_text().split("Max open files")[1].split()[0])
        assert daemon_limit == 256
        fds = []
        failure = None
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        try:
            for i in range(daemon_limit + 100):
                try:
                    fds.append(os.open(f.mnt / f"f{i % 64}", os.O_RDONLY))
                except OSError as e:
                    failure = e
                    break
        finally:
            for fd in fds:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print(f"daemon fd limit {daemon_limit}; opened {len(fds)} before {failure!r}")
        assert failure is not None and failure.errno in (errno.EMFILE, errno.ENFILE), failure
        assert f.proc.poll() is None, "the daemon died"
        assert (f.mnt / "f3").read_text() == "3"
    finally:
        f.close()


def test_daemon_takes_its_hard_descriptor_limit(tmp_path):
    """Engines often leave a soft limit of 1024 descriptors; the daemon holds one for every file
    the container keeps open (and its cached directories), so it raises its own to the hard
    limit it was given."""
    base = tmp_path / "base"
    base.mkdir()
    f = Fence(tmp_path, base, nofile="256:4096")
    try:
        line = Path(f"/proc/{f.pid()}/limits").read_text().split("Max open files")[1].split()
        assert (int(line[0]), int(line[1])) == (4096, 4096), line
    finally:
        f.close()


def test_host_renames_and_deletes_under_a_busy_fence(tmp_path):
    base = tmp_path / "base"
    for d in range(20):
        (base / f"d{d}").mkdir(parents=True)
        for i in range(20):
            (base / f"d{d}" / f"f{i}").write_text(f"{d}/{i}\n")
        (base / f"d{d}" / ".env").write_text("SECRET=never\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("canary\n")
    f = Fence(tmp_path, base)
    stop = time.time() + 4
    seen = []
    errors = []

    def reader():
        while time.time() < stop:
            for dirpath, _, files in os.walk(f.mnt):
                for n in files:
                    p = Path(dirpath) / n
                    try:
                        if p.is_symlink():
                            continue  # resolved by this (host) process's own kernel
                        seen.append(p.read_text())
                    except OSError as e:
                        # A name swapped for a symlink to a host directory between the listing
                        # and the read is followed by this (host) process's kernel: EISDIR.
                        # EIO (the kernel marking an inode bad because one inode number
                        # came back with another file type) is an error.
                        if e.errno not in (errno.ENOENT, errno.ESTALE, errno.EISDIR):
                            errors.append((str(p), e))

    def host():
        k = 0
        while time.time() < stop:
            d = k % 20
            if (base / f"d{d}").exists():
                (base / f"d{d}").rename(base / f"moved{d}")
            else:
                (base / f"moved{d}").rename(base / f"d{d}")
            (base / f"d{(k + 7) % 20}" / "f0").unlink(missing_ok=True)
            # A directory swapped for a symlink (dangling, so that this host-side reader's own
            # kernel finds nothing if it follows it): the daemon must never follow it.
            sw = base / f"d{(k + 3) % 20}"
            if sw.is_dir() and not sw.is_symlink():
                sw.rename(base / "swapped")
                os.symlink("/nonexistent-agentfense-target", sw)
                time.sleep(0.001)
                sw.unlink()
                (base / "swapped").rename(sw)
            k += 1

    try:
        ts = [threading.Thread(target=reader), threading.Thread(target=host)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert f.proc.poll() is None, "the daemon died"
        assert not errors, errors[:5]
        assert seen and not any("SECRET" in s or "canary" in s for s in seen)
        assert outside.read_text() == "canary\n"
        assert not list(f.upper.iterdir()), "reading changed the delta"
    finally:
        f.close()


def drop_kernel_caches_and_settle(pid, timeout=10.0):
    """Drops the kernel's cached names and inodes (the fence is told, FORGET) and waits until
    the daemon's RSS stops falling. Returns it."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    last, end = rss_kib(pid), time.time() + timeout
    while time.time() < end:
        time.sleep(0.5)
        now = rss_kib(pid)
        if now >= last:
            return now
        last = now
    return last


def test_many_files_memory(tmp_path):
    """A container making 50,000 files and a 200-deep tree, three times over: the daemon keeps
    serving, and its memory follows the kernel's cache: what the kernel forgets (here by
    drop_caches; under memory pressure by itself) the daemon forgets too, so another 50,000
    files do not add to what it holds."""
    base = tmp_path / "base"
    base.mkdir()
    f = Fence(tmp_path, base)
    try:
        before = rss_kib(f.pid())
        m = f.mnt
        rounds = []
        for r in range(int(os.environ.get("MEMORY_ROUNDS", "3"))):
            for d in range(50):
                (m / f"r{r}d{d}").mkdir()
                for i in range(1000):
                    (m / f"r{r}d{d}" / f"f{i}").write_bytes(b"")
            deep = m / f"r{r}deep"
            for i in range(200):
                deep = deep / f"n{i}"
            os.makedirs(deep)
            (deep / "leaf").write_text("deep\n")
            assert (deep / "leaf").read_text() == "deep\n"
            assert sum(1 for _ in os.scandir(m / f"r{r}d49")) == 1000
            full = rss_kib(f.pid())
            settled = drop_kernel_caches_and_settle(f.pid())
            rounds.append((full, settled))
            print(f"round {r + 1}: daemon RSS {full} KiB with 50,200 new paths cached, "
                  f"{settled} KiB after the kernel forgot them (idle: {before} KiB)")
        assert f.proc.poll() is None
        full1, settled1 = rounds[0]
        # The kernel forgot: the daemon gave back much of what the paths took...
        assert settled1 - before < (full1 - before) * 2 / 3, rounds
        # ...and after all the rounds (150,600 paths) it holds less than the first 50,200 paths
        # took while cached: what it keeps follows the kernel's cache, not every path ever seen
        # (a table of every path would have grown by full1 - before each round). What remains
        # above idle is the allocator's fragmentation, not nodes.
        assert rounds[-1][1] - before < full1 - before, rounds
        # Everything is still there, with the same inode numbers as before forgetting.
        ino = os.stat(m / "r0d7" / "f9").st_ino
        drop_kernel_caches_and_settle(f.pid(), timeout=1)
        assert os.stat(m / "r0d7" / "f9").st_ino == ino
        assert sum(1 for _ in os.scandir(m / "r0d49")) == 1000
    finally:
        f.close()


@pytest.mark.parametrize("step", ["state-dir", "daemon", "config", "built"])
def test_runtime_killed_during_create_then_delete_force_leaves_nothing(tmp_path, image, step):
    """The runtime dies (abort: no cleanup of its own) at each step of a fenced create: after
    the state directory, after the fence daemon is up, after config.json is rewritten, after
    libcontainer built the container. `delete --force` then leaves no mount, no daemon, no
    container process, and the base unchanged."""
    from conftest import make_bundle
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "f.txt").write_text("base\n")
    digest = tree_digest(repo)
    bundle = make_bundle(tmp_path, ["sleep", "1000"],
                         {"agentfense.io/preset": "read-only"}, repo)
    root = tmp_path / "root"
    cid = unique("crash")
    env = dict(os.environ, AGENTFENSE_TEST_CRASH_AT=step)
    with open(tmp_path / "create.err", "w+") as err:
        p = subprocess.run([str(BIN), "--root", str(root), "create", "--bundle", str(bundle), cid],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                           env=env, timeout=60)
    assert p.returncode != 0, f"{step}: the runtime was not killed"
    state_dir = Path("/var/lib/agentfense/containers") / cid

    def mine():
        mounts = [l for l in Path("/proc/mounts").read_text().splitlines() if f"agentfense:{cid}" in l]
        daemons = sh(["pgrep", "-f", f"containers/{cid}/daemon"]).stdout.split()
        return mounts, daemons

    if step != "state-dir":
        assert mine() != ([], []), f"{step}: the fence should be up when the runtime died"
    init = None
    if step == "built":
        st = sh([BIN, "--root", root, "state", cid])
        assert st.returncode == 0, st.stderr
        init = json.loads(st.stdout)["pid"]
    p = sh([BIN, "--root", root, "delete", "--force", cid])
    assert p.returncode == 0, p.stderr
    wait_for(lambda: mine() == ([], []), f"{step}: fence mounts and daemons to go away")
    if init:
        wait_for(lambda: not Path(f"/proc/{init}").exists() or
                 Path(f"/proc/{init}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 "the container's process to go away")
    assert not (root / cid).exists()
    if (state_dir / "fence.json").exists():
        assert json.loads((state_dir / "fence.json").read_text())["live"] is False
    assert tree_digest(repo) == digest
    sh(["rm", "-rf", str(state_dir)])
