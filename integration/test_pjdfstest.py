"""POSIX conformance of the fence, measured with pjdfstest (the Rust rewrite, crates.io crate
`pjdfstest`), on three file systems side by side:

- `native`: a plain directory of the host (the reference: it must pass everything it runs);
- `fenced (cow)`: a full-access fence in copy-on-write mode over an empty base;
- `fenced (off)`: a full-access fence with `delta=off` (changes made in place).

The fences are mounted by the daemon directly (`agentfense-runc fence-daemon CONFIG`, as
benches/fence_bench.py does), no container engine. Every fenced failure must be in KNOWN
(inherent to FUSE, or the fence's documented design), with its expected failure message: a new
failure, or a known test failing for another reason, fails the run.

pjdfstest is installed on first use with `cargo install` into /var/cache/agentfense-ci/pjdfstest
(pinned version, `--locked`; about two minutes), and reused afterwards.

Configuration (pjdfstest.toml, written per run):
- features on: posix_fallocate, utimensat, utime_now, rename_ctime (Linux has them);
- features off: chflags, chflags_sf_snapshot, nfsv4_acls, stat_st_birthtime (FreeBSD only: no
  test needs them on Linux);
- allow_remount = false: the 13 `erofs_*` tests would remount the file system under test
  read-only (for `native` that is the host's own file system): they are skipped everywhere;
- dummy users: nobody/nogroup and daemon/daemon (both exist on a fresh Debian 12);
- secondary file system for the EXDEV tests: /dev/shm.
"""

import fcntl
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import DirectFence, figure

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AGENTFENSE_BIN", REPO / "target" / "release" / "agentfense-runc")).resolve()
PJD_VERSION = "0.2.2"
PJD_ROOT = Path(os.environ.get("PJDFSTEST_ROOT", "/var/cache/agentfense-ci/pjdfstest"))
PJD_BIN = PJD_ROOT / "bin" / "pjdfstest"
INSTALL_TIMEOUT = 1200  # seconds, a cold `cargo install` (about 2 minutes here)
RUN_TIMEOUT = 300  # seconds per pjdfstest run (about 5 s each here)
SECONDARY_FS = "/dev/shm"
DUMMY_AUTH = [("nobody", "nogroup"), ("daemon", "daemon")]
# The runtime starts the daemon with the umask it inherited (022 under the usual service
# managers); the daemon must not let that leak into the modes of files containers create.
DAEMON_UMASK = 0o022

FULL_ACCESS = json.dumps({"default": "none", "rules": [
    {"pattern": "**", "permission": "write", "type": "glob", "priority": 0}]})

# ---------------------------------------------------------------------------------------------
# Known fenced failures: test name -> (reason, regex the failure message must match).
# ---------------------------------------------------------------------------------------------

DEVICE = ("fence design: device nodes are never created through the fence (mknod of a block "
          "or character device answers EPERM, README 'Choices'); the test needs one")
NLINK = ("fence design (link counts hidden): files and directories report st_nlink=1, so a "
         "count cannot tell of names elsewhere (README 'Choices')")
EPERM_FIXTURE = r"EPERM|mknod\("
NLINK_MSG = r"left: 1\b"


def _device_fixture(*tests):
    return {f"{t}::{kind}": (DEVICE, EPERM_FIXTURE) for t in tests for kind in ("block", "char")}


KNOWN = {
    **_device_fixture(
        "chmod::change_perm", "chmod::enotdir_component", "chmod::failed_chmod_unchanged_ctime",
        "chmod::update_ctime", "chown::enotdir_component", "chown::lchown::enotdir_component",
        "link::changed_ctime_success", "link::eexist_dest_exists", "link::enotdir_component_either",
        "link::remove_link", "link::share_metadata", "link::unchanged_ctime_fails",
        "mkdir::eexist_file_exists", "mkdir::enotdir_component", "mkfifo::eexist_file_exists",
        "mkfifo::enotdir_component", "mknod::changed_times_success", "mknod::device_files",
        "mknod::eexist_file_exists", "mknod::enotdir_comp_char_block", "mknod::enotdir_component",
        "mknod::privileged::eexist_file_exists", "open::eexist_file_exists",
        "rename::changed_ctime_success", "rename::eexist_enotempty_to_non_empty",
        "rename::eisdir_to_dir_from_not_dir", "rename::enotdir_component_either",
        "rename::enotdir_from_dir_to_not_dir", "rename::preserve_metadata",
        "rename::to_multiply_linked", "rename::unchanged_ctime_failed",
        "rmdir::eexist_enotempty_non_empty_dir", "rmdir::enotdir_component",
        "symlink::create_symlink", "symlink::eexist_file_exists", "symlink::enotdir_component",
        "truncate::enotdir_component", "unlink::enotdir_component", "unlink::remove_type",
        "unlink::unchanged_ctime_failed", "unlink::update_ctime_success",
        "unlink::update_mtime_ctime_success_folder", "utimensat::changes_timestamps"),
    # st_nlink is asserted first; what these tests check after it (that all names of a file
    # share st_ino, mode, owner) is covered by test_soak.py's hard-link operations instead.
    **{f"link::share_metadata::{k}": (NLINK, NLINK_MSG) for k in ("regular", "fifo", "socket")},
    **{f"link::remove_link::{k}": (NLINK, NLINK_MSG) for k in ("regular", "fifo", "socket")},
    **{f"rename::to_multiply_linked::{k}": (NLINK, NLINK_MSG) for k in ("regular", "fifo", "socket")},
    "rename::updates_link_parent": (NLINK + " (a directory's count of 1, not 2 + subdirs)",
                                    NLINK_MSG),
    # link(2) through the fence makes a real hard link in the delta (one file, committed as
    # one), but the kernel sees one inode per name: the policy is decided per path, and two
    # names may have different levels, so they must not share an inode.
    **{f"rename::preserve_metadata::{k}": (
        "fence design (one inode per name): a hard link made with link(2) reports its own "
        "st_ino; the names still share content and metadata in the layer", r"left == right")
       for k in ("regular", "fifo", "socket")},
}

# Skips on a fence beyond the native ones: name -> reason.
KNOWN_SKIPS = {
    "link::link_count_max": "inherent to FUSE: pathconf(_PC_LINK_MAX) is not known on a FUSE "
                            "mount, so the test cannot know how many links to make",
}

# Failures found by this suite that are bugs (not FUSE, not the documented design). They are
# deliberately NOT in KNOWN: the run fails until they are fixed. Listed here so the failure
# message says what is known about each.
OPEN_BUGS = {
    "rename::write_access_required_subdir":
        "the daemon's own umask is applied to every file it creates on top of the caller's "
        "(the FUSE request's mode already has the caller's umask applied): with umask 0, "
        "mkdir(0777) gives 0755 and open(O_CREAT, 0666) gives 0644, so a 0777 directory made "
        "by root is not writable by nobody and rename inside it answers EACCES",
    "unlink::open_file_not_freed":
        "a descriptor whose last name was unlinked is unusable: fstat, ftruncate, fchmod, "
        "fsetxattr answer ESTALE (the inode's path is looked up instead of using the open "
        "handle), and pread too once the kernel revalidates attributes. tempfile.TemporaryFile "
        "(io.open fstat()s the fd) and SQLite's unlinked temp files fail. POSIX also wants "
        "st_nlink 0 there",
    **{f"link::changed_ctime_success::{k}":
        "after link(a, b), lstat(a) keeps reporting a's old ctime (even after the 1 s attribute "
        "lifetime): names of one file are separate inodes whose cached attributes are not "
        "refreshed"
       for k in ("regular", "fifo", "socket")},
    **{f"unlink::update_ctime_success::{k}":
        "after link(a, b); unlink(a), lstat(b) keeps the old ctime (same cause: per-name "
        "inodes, stale cached attributes)"
       for k in ("regular", "fifo", "socket")},
}


# ---------------------------------------------------------------------------------------------
# pjdfstest: install, configure, run, parse
# ---------------------------------------------------------------------------------------------

def _installed_version():
    if not PJD_BIN.is_file():
        return None
    p = subprocess.run([PJD_BIN, "--version"], capture_output=True, text=True, timeout=30)
    return p.stdout.split()[-1] if p.returncode == 0 and p.stdout.split() else None


def _cargo():
    c = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    if not os.path.exists(c):
        pytest.fail("cargo is missing: pjdfstest is built from crates.io with cargo (install a "
                    "stable Rust toolchain)")
    return c


def ensure_pjdfstest():
    """pjdfstest PJD_VERSION at PJD_BIN, installed with `cargo install` if missing (under a
    lock: concurrent runs wait for one install)."""
    PJD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(PJD_ROOT.parent / "pjdfstest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version() == PJD_VERSION:
            return PJD_BIN
        cmd = [_cargo(), "install", "pjdfstest", "--version", f"={PJD_VERSION}", "--locked",
               "--force", "--root", str(PJD_ROOT)]
        env = dict(os.environ, CARGO_TARGET_DIR=str(PJD_ROOT / "build"))
        t0 = time.time()
        print(f"installing pjdfstest {PJD_VERSION}: {' '.join(cmd)}", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env)
        if p.returncode != 0 and "acl" in p.stderr and shutil.which("apt-get"):
            # Its `exacl` dependency asks the linker for libacl; Debian's is in libacl1-dev.
            subprocess.run(["apt-get", "install", "-y", "-qq", "libacl1-dev"],
                           capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                               env=env)
        if p.returncode != 0:
            pytest.fail(f"cargo install pjdfstest {PJD_VERSION} failed ({p.returncode}):\n"
                        f"{p.stderr[-4000:]}")
        shutil.rmtree(PJD_ROOT / "build", ignore_errors=True)
        print(f"installed pjdfstest in {time.time() - t0:.0f} s", flush=True)
        if _installed_version() != PJD_VERSION:
            pytest.fail(f"{PJD_BIN} does not report version {PJD_VERSION} after installing")
        return PJD_BIN


def write_config(path):
    for user, group in DUMMY_AUTH:
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            pytest.fail(f"pjdfstest needs the user {user} and the group {group}")
    entries = ", ".join(f'["{u}", "{g}"]' for u, g in DUMMY_AUTH)
    path.write_text(
        "[features]\n"
        "posix_fallocate = {}\nutimensat = {}\nutime_now = {}\nrename_ctime = {}\n"
        "[settings]\nnaptime = 0.01\nallow_remount = false\n"
        f"[dummy_auth]\nentries = [{entries}]\n")
    return path


RESULT_LINE = re.compile(
    r"^(?P<name>\S+::\S+)\s+(?P<status>ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$")
SUMMARY = re.compile(r"^Summary: (\d+) failed, (\d+) skipped, (\d+) passed, (\d+) expected "
                     r"failures, (\d+) total")


def parse(output):
    """{test name: (status, message)} and the summary counts."""
    results, cur, summary = {}, None, None
    for line in output.splitlines():
        m = RESULT_LINE.match(line)
        if m:
            cur = m["name"]
            results[cur] = [m["status"], []]
            continue
        s = SUMMARY.match(line)
        if s:
            summary = dict(zip(("failed", "skipped", "passed", "xfail", "total"),
                               map(int, s.groups())))
            cur = None
            continue
        if cur and line.strip() and (line.startswith("\t") or line.startswith("  ")):
            results[cur][1].append(line.strip())
    return {k: (s, "\n".join(m)) for k, (s, m) in results.items()}, summary


def run_pjdfstest(where, config, log):
    env = dict(os.environ, NO_COLOR="1", CLICOLOR="0", RUST_BACKTRACE="0",
               RUST_LIB_BACKTRACE="0")
    t0 = time.time()
    p = subprocess.run([PJD_BIN, "-c", config, "-p", where, "-s", SECONDARY_FS],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    elapsed = time.time() - t0
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    results, summary = parse(p.stdout)
    if summary is None:
        pytest.fail(f"pjdfstest on {where} did not finish (exit {p.returncode}); log {log}:\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    counted = {k: sum(1 for s, _ in results.values() if s == k)
               for k in ("ok", "FAILED", "skipped")}
    assert (counted["ok"], counted["FAILED"], counted["skipped"]) == (
        summary["passed"], summary["failed"], summary["skipped"]), (
        f"parsed {counted} but pjdfstest summarised {summary}; log {log}")
    return {"results": results, "summary": summary, "seconds": elapsed, "log": log}


# ---------------------------------------------------------------------------------------------
# Fences mounted by the daemon directly
# ---------------------------------------------------------------------------------------------

class Fence(DirectFence):
    """A full-access fence at `dir/mnt`: copy-on-write over `dir/base` (empty) into
    `dir/upper`, or with `cow=False` (delta=off) changing `dir/upper` in place."""

    def __init__(self, dir, cow, policy=FULL_ACCESS, cid="pjdfstest"):
        self.dir = dir
        (dir / "base").mkdir(parents=True, exist_ok=True)
        super().__init__(dir / "base" if cow else None, dir / "upper", dir / "mnt", policy, cid,
                         umask=DAEMON_UMASK)


# ---------------------------------------------------------------------------------------------
# The runs (once per module) and the checks
# ---------------------------------------------------------------------------------------------

MODES = ("native", "fenced (cow)", "fenced (off)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("pjdfstest needs root (it switches users, chowns and makes devices natively)")
    if not BIN.is_file():
        pytest.fail(f"{BIN} is missing: build it first (cargo build --release)")
    if not os.path.isdir(SECONDARY_FS):
        pytest.fail(f"{SECONDARY_FS} (the secondary file system for EXDEV tests) is missing")
    ensure_pjdfstest()
    # Short (unix socket paths are limited to 107 bytes) and traversable by the dummy users
    # (pytest's own tmp_path sits in a 0700 directory).
    work = Path(tempfile.mkdtemp(prefix="afpjd-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    config = write_config(work / "pjdfstest.toml")
    logs = tmp_path_factory.mktemp("pjdfstest-logs")  # kept by pytest after the run
    out = {}
    native = work / "native"
    native.mkdir()
    out["native"] = run_pjdfstest(native, config, logs / "native.log")
    for mode, cow in (("fenced (cow)", True), ("fenced (off)", False)):
        d = work / ("cow" if cow else "off")
        fence = Fence(d, cow)
        try:
            out[mode] = run_pjdfstest(fence.mnt, config, logs / f"{d.name}.log")
            assert fence.alive(), f"the fence daemon died during pjdfstest ({mode})"
        finally:
            fence.close()
    print_table(out)
    yield out
    shutil.rmtree(work, ignore_errors=True)


def print_table(out):
    print(f"\npjdfstest {PJD_VERSION}".ljust(26) + "".join(f"{m:>16}" for m in MODES))
    for key, label in (("passed", "passed"), ("failed", "failed"), ("skipped", "skipped"),
                       ("total", "total")):
        print(f"{label:<25}" + "".join(f"{out[m]['summary'][key]:>16}" for m in MODES))
    print(f"{'seconds':<25}" + "".join(f"{out[m]['seconds']:>16.1f}" for m in MODES))
    figure(f"pjdfstest {PJD_VERSION}: " + "; ".join(
        f"{m} {out[m]['summary']['passed']} passed, {out[m]['summary']['failed']} failed"
        for m in MODES))
    for m in MODES[1:]:
        failed = sorted(n for n, (s, _) in out[m]["results"].items() if s == "FAILED")
        print(f"\n{m}: {len(failed)} failed")
        for n in failed:
            msg = out[m]["results"][n][1].splitlines()
            label = "known" if n in KNOWN and re.search(KNOWN[n][1], out[m]["results"][n][1]) \
                else "BUG" if n in OPEN_BUGS else "NEW"
            print(f"  [{label:5}] {n}: {msg[0] if msg else ''}")
        extra = sorted(n for n, (s, _) in out[m]["results"].items()
                       if s == "skipped" and out["native"]["results"].get(n, ("",))[0] != "skipped")
        for n in extra:
            print(f"  [skip ] {n}: {out[m]['results'][n][1].splitlines()[0]}")


def unexpected(out, mode):
    """The fenced failures that KNOWN does not explain, with what is known about each."""
    bad = []
    for name, (status, msg) in sorted(out[mode]["results"].items()):
        if status != "FAILED":
            continue
        if name in KNOWN and re.search(KNOWN[name][1], msg):
            continue
        why = OPEN_BUGS.get(name, "new failure")
        if name in KNOWN:
            why = f"known as '{KNOWN[name][0]}' but failing differently"
        bad.append(f"{name}: {msg.splitlines()[0] if msg else ''}\n    -> {why}")
    return bad


def test_native_directory_passes_everything_it_runs(runs):
    native = runs["native"]
    failed = {n: m for n, (s, m) in native["results"].items() if s != "ok" and s != "skipped"}
    assert not failed, f"pjdfstest fails on a plain directory (host problem?): {failed}"
    skipped = {n for n, (s, _) in native["results"].items() if s == "skipped"}
    assert all("erofs" in n for n in skipped), f"unexpected native skips: {sorted(skipped)}"
    assert native["summary"]["passed"] >= 350, native["summary"]


@pytest.mark.parametrize("mode", MODES[1:])
def test_fenced_failures_are_all_known(runs, mode):
    res = runs[mode]
    native = runs["native"]
    assert res["summary"]["total"] == native["summary"]["total"], (
        f"{mode} ran {res['summary']['total']} tests, native {native['summary']['total']}")
    native_skips = {n for n, (s, _) in native["results"].items() if s == "skipped"}
    skips = {n for n, (s, _) in res["results"].items() if s == "skipped"}
    assert skips <= native_skips | set(KNOWN_SKIPS), (
        f"{mode}: unexpected skips {sorted(skips - native_skips - set(KNOWN_SKIPS))}")
    passing_known = sorted(n for n in KNOWN if res["results"].get(n, ("",))[0] == "ok")
    if passing_known:
        print(f"\n{mode}: known failures that now pass (KNOWN may be stale): {passing_known}")
    bad = unexpected(runs, mode)
    assert not bad, (f"{mode}: {len(bad)} pjdfstest failures are neither inherent to FUSE nor "
                     f"the fence's documented design (log {res['log']}):\n" + "\n".join(bad))
