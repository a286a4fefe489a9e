"""The delta layer and the finer points of the fence, from inside a container: copy-up keeps
what it should, deletions and re-creations, renames (EXDEV, RENAME_EXCHANGE, RENAME_NOREPLACE),
ownership of new files, stable inode numbers, host changes showing through, delta=off.
"""

import json
import os
import time
from pathlib import Path

from conftest import DOCKER, IMAGE, sh, unique, wait_for
from test_fence import no_leftovers, probe, tree_digest  # noqa: F401  (probe is a fixture)

FULL = [{"pattern": "**", "permission": "write"},
        {"pattern": "**/.env", "permission": "none", "priority": 100},
        {"pattern": "/ro/**", "permission": "read", "priority": 50}]


def start(repo, probe, policy=FULL, env=()):
    name = unique()
    args = [DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(policy), "-e", "AGENTFENSE_WORKSPACE=/w"]
    for e in env:
        args += ["-e", e]
    sh([*args, "-v", f"{repo}:/w", "-v", f"{probe}:/probe:ro", IMAGE, "sleep", "1000"], check=True)
    return name


def ex(name, script, user="0:0"):
    return sh([DOCKER, "exec", "-u", user, name, "sh", "-c", script])


def upper_of(name):
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    rec = json.loads((Path("/var/lib/agentfense/containers") / cid / "fence.json").read_text())
    return Path(rec["workspaces"][0]["upper"])


def test_copy_up_keeps_metadata_and_base_is_untouched(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "d").mkdir(parents=True)
    f = repo / "d" / "f.txt"
    f.write_text("original\n")
    os.chmod(f, 0o640)
    os.chown(f, 1234, 4321)
    os.setxattr(f, "user.origin", b"kept")
    os.utime(f, (1_000_000_000, 1_000_000_000))
    digest = tree_digest(repo)
    name = start(repo, probe)
    cleanup_docker.append(name)
    p = ex(name, "echo more >> /w/d/f.txt && stat -c '%a %u %g %Y' /w/d/f.txt && cat /w/d/f.txt")
    assert p.returncode == 0, p.stderr
    mode, uid, gid, _mtime = p.stdout.splitlines()[0].split()
    assert (mode, uid, gid) == ("640", "1234", "4321")
    assert p.stdout.splitlines()[1:] == ["original", "more"]
    up = upper_of(name) / "d" / "f.txt"
    st = up.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1234, 4321)
    assert os.getxattr(up, "user.origin") == b"kept"
    # Our bookkeeping attribute is neither visible nor settable from inside.
    p = ex(name, "/probe -a 'setxattr /w/d/f.txt'")
    assert p.stdout.strip() == "setxattr /w/d/f.txt ok"
    assert tree_digest(repo) == digest
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_delete_recreate_and_bookkeeping_names(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "d" / "sub").mkdir(parents=True)
    (repo / "d" / "old.txt").write_text("old\n")
    (repo / "d" / "sub" / "x").write_text("x\n")
    (repo / "d" / ".env").write_text("hidden\n")
    digest = tree_digest(repo)
    name = start(repo, probe)
    cleanup_docker.append(name)
    # A directory whose remaining entries are all hidden is empty to the container.
    p = ex(name, "rm -rf /w/d && ls -a /w && mkdir /w/d && ls -a /w/d && "
                 "touch /w/.wh.README /w/.wh..wh..opq && ls -a /w")
    assert p.returncode == 0, p.stderr
    assert p.stdout == ".\n..\n.\n..\n.\n..\n.wh..wh..opq\n.wh.README\nd\n"
    assert (repo / "d" / ".env").read_text() == "hidden\n"
    assert tree_digest(repo) == digest
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_renames(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "basedir").mkdir(parents=True)
    (repo / "basedir" / "f").write_text("f\n")
    (repo / "a").write_text("a\n")
    (repo / "b").write_text("b\n")
    (repo / "ro").mkdir()
    (repo / "ro" / "r").write_text("r\n")
    digest = tree_digest(repo)
    name = start(repo, probe)
    cleanup_docker.append(name)
    ex(name, "mkdir -p /w/newdir/sub && echo n > /w/newdir/sub/n")
    p = ex(name, "/probe -a 'rename /w/basedir /w/moved' 'rename /w/newdir /w/moved2' "
                 "'rename /w/newdir /w/ro/x' 'exchange /w/a /w/b' 'noreplace /w/a /w/b' "
                 "'noreplace /w/a /w/c' 'rename /w/c /w/.env' 'rename /w/ro/r /w/r2' "
                 "'statfs /w' 'fsync /w/b' 'fallocate /w/b'; cat /w/c /w/moved2/sub/n; "
                 "head -c 2 /w/b; wc -c < /w/b")
    assert p.stdout.splitlines() == [
        "rename /w/basedir EXDEV",      # a directory holding base content
        "rename /w/newdir ok",          # a directory made in the container
        "rename /w/newdir ENOENT",      # (it moved)
        "exchange /w/a ok",
        "noreplace /w/a EEXIST",
        "noreplace /w/a ok",
        "rename /w/c EACCES",           # onto a hidden name
        "rename /w/ro/r EACCES",        # away from a read-only path
        "statfs /w ok",
        "fsync /w/b ok",
        "fallocate /w/b ok",
        "b",                            # a and b exchanged, then a moved to c
        "n",
        "a",
        "4096",                         # fallocate extended b
    ], p.stdout + p.stderr
    assert tree_digest(repo) == digest
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_new_files_belong_to_their_creator(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    repo.mkdir()
    os.chmod(repo, 0o777)
    name = start(repo, probe)
    cleanup_docker.append(name)
    p = ex(name, "echo hi > /w/mine && mkdir /w/mydir && stat -c '%u %g' /w/mine /w/mydir", user="1000:1000")
    assert p.stdout == "1000 1000\n1000 1000\n", p.stderr
    st = (upper_of(name) / "mine").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_inode_numbers_stable_and_host_changes_show(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "f").write_text("v1\n")
    name = start(repo, probe)
    cleanup_docker.append(name)
    first = ex(name, "stat -c %i /w/f").stdout
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    time.sleep(1.5)
    assert ex(name, "stat -c %i /w/f").stdout == first
    # The host changes an unmodified file, and adds one: both show within about a second.
    (repo / "f").write_text("v2, longer\n")
    (repo / "g").write_text("new\n")
    wait_for(lambda: ex(name, "cat /w/f /w/g").stdout == "v2, longer\nnew\n",
             "host changes to show through", timeout=5)
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_host_changes_reach_warm_caches(docker_engine, image, probe, tmp_path, cleanup_docker):
    """The kernel keeps names and attributes for minutes (the fence invalidates them when the
    host changes the base): sizes, modes, deletions, renames and new names still show within
    about a second, with every cache warm."""
    repo = tmp_path / "repo"
    (repo / "d" / "sub").mkdir(parents=True)
    (repo / "d" / "f").write_text("1\n")
    (repo / "d" / "gone").write_text("x\n")
    (repo / "d" / "sub" / "s").write_text("s\n")
    name = start(repo, probe)
    cleanup_docker.append(name)
    warm = "stat -c '%n %s %a' /w/d/f /w/d/gone /w/d/sub/s && ls /w/d /w/d/sub"
    assert ex(name, warm).returncode == 0
    assert ex(name, warm).returncode == 0
    # Names looked up and found missing: the kernel may remember that, until the host adds them.
    missing = "cat /w/d/new /w/d/sub/later 2>/dev/null; echo $?"
    assert ex(name, missing).stdout == "1\n" and ex(name, missing).stdout == "1\n"
    (repo / "d" / "f").write_text("longer now\n")
    os.chmod(repo / "d" / "f", 0o600)
    (repo / "d" / "gone").unlink()
    (repo / "d" / "sub").rename(repo / "d" / "moved")
    (repo / "d" / "new").write_text("n\n")
    (repo / "d" / "moved" / "later").write_text("l\n")
    want = "/w/d/f 11 600\n" + "f\nmoved\nnew\n" + "missing missing\n"
    probe_cmd = ("stat -c '%n %s %a' /w/d/f; ls /w/d; "
                 "stat /w/d/gone >/dev/null 2>&1 || printf 'missing '; "
                 "stat /w/d/sub >/dev/null 2>&1 || echo missing")
    wait_for(lambda: ex(name, probe_cmd).stdout == want, "host changes to reach warm caches",
             timeout=2)
    assert ex(name, "cat /w/d/moved/s /w/d/new /w/d/moved/later").stdout == "s\nn\nl\n"
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_host_rewrites_reach_cached_contents(docker_engine, image, probe, tmp_path, cleanup_docker):
    """Files keep their contents in the kernel from one open to the next (small ones in the
    page cache, large read-only ones by passthrough): a host rewrite of the same size still
    shows, and so does one the host makes by renaming a new file over the old; writes through
    the fence show at once and then stay the container's own."""
    repo = tmp_path / "repo"
    (repo / "d").mkdir(parents=True)
    (repo / "d" / "small").write_text("aaaa\n")
    (repo / "d" / "swap").write_text("one\n")
    (repo / "d" / "rw").write_text("rw-1\n")
    big = b"x" * (3 << 20)
    (repo / "d" / "big").write_bytes(big)
    # (Audit `all` counts the bytes every open reads: reads then all go through the daemon.)
    name = start(repo, probe, policy=[{"pattern": "**", "permission": "read"},
                                      {"pattern": "/d/rw", "permission": "write", "priority": 10}],
                 env=["AGENTFENSE_AUDIT=write"])
    cleanup_docker.append(name)
    show = "cat /w/d/small /w/d/swap /w/d/rw; tail -c 4 /w/d/big; echo"
    # A process keeps the files open, so the kernel keeps their inodes (and cached pages)
    # across the host's change: only the fence's invalidation can drop them.
    sh([DOCKER, "exec", "-d", name, "sh", "-c",
        "exec 3</w/d/small 4</w/d/big 5</w/d/rw; sleep 1000"], check=True)
    for _ in range(3):
        assert ex(name, show).stdout == "aaaa\none\nrw-1\nxxxx\n"
    with open(repo / "d" / "small", "r+") as f:
        f.write("bbbb\n")
    (repo / "d" / "swap.new").write_text("two\n")
    (repo / "d" / "swap.new").rename(repo / "d" / "swap")
    with open(repo / "d" / "big", "r+b") as f:
        f.seek(len(big) - 4)
        f.write(b"yyyy")
    (repo / "d" / "rw").write_text("rw-2\n")
    wait_for(lambda: ex(name, show).stdout == "bbbb\ntwo\nrw-2\nyyyy\n",
             "host rewrites to reach cached contents", timeout=3)
    # A write through the fence shows at once (the same inode's cache), and from then on the
    # file is the container's copy: the host's next change is a conflict, not shown.
    assert ex(name, "printf rw-C > /w/d/rw; cat /w/d/rw").stdout == "rw-C"
    (repo / "d" / "rw").write_text("rw-3\n")
    time.sleep(1.5)
    assert ex(name, "cat /w/d/rw").stdout == "rw-C"
    # And the read-only files stay read-only.
    p = ex(name, "echo z > /w/d/small")
    assert p.returncode != 0 and (repo / "d" / "small").read_text() == "bbbb\n"
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_delta_off_writes_through(docker_engine, image, probe, tmp_path):
    repo = tmp_path / "repo"
    (repo / "out").mkdir(parents=True)
    (repo / ".env").write_text("s\n")
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=development",
            "-e", "AGENTFENSE_DELTA=off", "-v", f"{repo}:/workspace", IMAGE, "sh", "-c",
            "echo built > /workspace/out/a; cat /workspace/.env; ls -a /workspace"])
    assert p.stdout == ".\n..\nout\n"
    assert (repo / "out" / "a").read_text() == "built\n"
    assert (repo / ".env").read_text() == "s\n"
    no_leftovers()


def test_moving_a_directory_over_a_deleted_one_does_not_resurrect_it(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "old").mkdir(parents=True)
    (repo / "old" / "a.txt").write_text("deleted\n")
    (repo / "old2").mkdir()
    (repo / "old2" / "b.txt").write_text("deleted too\n")
    name = start(repo, probe)
    cleanup_docker.append(name)
    p = ex(name, "rm -rf /w/old && mkdir /w/new && mv /w/new /w/old && ls -a /w/old; sleep 1.2; "
                 "ls -a /w/old; cat /w/old/a.txt; "
                 "rm -rf /w/old2 && touch /w/old2 && mkdir /w/new2 && "
                 "/probe -a 'exchange /w/new2 /w/old2'; sleep 1.2; ls -a /w/old2")
    assert p.stdout == ".\n..\n.\n..\nexchange /w/new2 ok\n.\n..\n", p.stdout + p.stderr
    assert "No such file or directory" in p.stderr
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_concurrent_first_writes(docker_engine, image, probe, tmp_path, cleanup_docker):
    repo = tmp_path / "repo"
    (repo / "deep" / "er").mkdir(parents=True)
    for i in range(40):
        (repo / "deep" / "er" / f"f{i}").write_text("base\n")
    name = start(repo, probe)
    cleanup_docker.append(name)
    script = " ".join(f"(for j in 1 2 3 4; do echo {i} >> /w/deep/er/f{i % 8}; done) &" for i in range(40))
    p = ex(name, script + " wait; cat /w/deep/er/f0 /w/deep/er/f1 | wc -l")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.strip() == str(2 + 5 * 4 * 2)
    sh([DOCKER, "rm", "-f", name], check=True)
    no_leftovers()


def test_in_place_directory_rename_keeps_hidden_entries_hidden(docker_engine, image, probe, tmp_path):
    repo = tmp_path / "repo"
    (repo / "config" / "prod").mkdir(parents=True)
    (repo / "config" / "prod" / "db.env").write_text("SECRET\n")
    (repo / "config" / "app.yaml").write_text("a\n")
    policy = [{"pattern": "**/*", "permission": "write"},
              {"pattern": "/config/prod/**", "permission": "none", "priority": 10}]
    p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_DELTA=off",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(policy), "-v", f"{repo}:/workspace", IMAGE,
            "sh", "-c", "mv /workspace/config /workspace/cfg; ls -R /workspace; cat /workspace/cfg/prod/db.env"])
    assert "SECRET" not in p.stdout
    assert (repo / "config" / "prod" / "db.env").read_text() == "SECRET\n"
    no_leftovers()
