"""Running commands, timing them, cleaning up whatever the harness set up, reading memory."""

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


class WorkloadError(Exception):
    """A workload (or the mount, container or fixture it needs) could not be run."""


def log(msg):
    """Progress goes to stderr: stdout holds only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, cwd=None, timeout=600, ok=(0,), capture=False, input=None):
    """Runs cmd; raises WorkloadError (with its stderr) unless it exits with a code in `ok`."""
    cmd = [str(c) for c in cmd]
    try:
        p = subprocess.run(cmd, cwd=cwd, timeout=timeout, input=input, text=True,
                           stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        raise WorkloadError(f"{' '.join(cmd)}: timed out after {timeout}s") from None
    except OSError as e:
        raise WorkloadError(f"{' '.join(cmd)}: {e}") from None
    if p.returncode not in ok:
        err = (p.stderr or "").strip().splitlines()
        raise WorkloadError(f"{' '.join(cmd)} (in {cwd or os.getcwd()}) exited {p.returncode}: "
                            f"{' | '.join(err[-3:])}")
    return p


def timed_cmd(cmd, cwd=None, ok=(0,), timeout=600):
    """Seconds taken by one run of cmd (output discarded)."""
    t = time.perf_counter()
    run(cmd, cwd=cwd, ok=ok, timeout=timeout)
    return time.perf_counter() - t


def drop_caches():
    """Writes back dirty data and drops the page, dentry and inode caches (root only, and
    not inside every container). Returns whether it was permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def median(xs):
    return statistics.median(xs) if xs else None


class Cleanup:
    """A stack of undo actions, run last-in first-out at the end, on an exception, on SIGINT,
    SIGTERM or SIGHUP, and at interpreter exit. Each action runs once; one failing does not
    stop the others."""

    def __init__(self):
        self.actions = []
        self.done = False

    def push(self, what, fn):
        entry = [what, fn, False]
        self.actions.append(entry)
        return entry

    @staticmethod
    def discharge(entry):
        """Runs one action now (and never again at the end)."""
        if not entry[2]:
            entry[2] = True
            entry[1]()

    def run_all(self):
        failed = []
        while self.actions:
            entry = self.actions.pop()
            if entry[2]:
                continue
            entry[2] = True
            try:
                entry[1]()
            except BaseException as e:  # noqa: BLE001 - keep cleaning up
                failed.append(f"{entry[0]}: {e}")
                log(f"cleanup of {entry[0]} failed: {e}")
        return failed

    def install_signals(self):
        def handler(signum, _frame):
            raise SystemExit(128 + signum)
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, handler)


def mounted(path):
    """Whether anything is mounted at path (by /proc/self/mountinfo, which also sees a FUSE
    mount whose daemon died)."""
    p = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == p:
            return True
    return False


def mounts_under(prefix):
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
            out.append(mp)
    return out


def unmount(path, tries=20):
    """Unmounts path (retrying while busy, then lazily). Raises if it stays mounted."""
    for i in range(tries):
        if not mounted(path):
            return
        p = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if p.returncode == 0 and not mounted(path):
            return
        time.sleep(0.1 * (i + 1))
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if mounted(path):
        raise WorkloadError(f"{path} is still mounted")


def pids_matching(*needles):
    """Pids whose command line contains every one of needles (bytes or str)."""
    needles = [n.encode() if isinstance(n, str) else n for n in needles]
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd and all(n in cmd for n in needles):
            found.append(int(d.name))
    return found


def proc_mem(pid):
    """{VmRSS, RssAnon, RssFile, RssShmem, Pss} of pid in KiB (None where unreadable)."""
    out = dict.fromkeys(("VmRSS", "RssAnon", "RssFile", "RssShmem", "Pss"))
    try:
        for l in Path(f"/proc/{pid}/status").read_text().splitlines():
            k = l.split(":")[0]
            if k in out:
                out[k] = int(l.split()[1])
        for l in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if l.startswith("Pss:"):
                out["Pss"] = int(l.split()[1])
    except OSError:
        pass
    return out


def meminfo():
    out = {}
    for l in Path("/proc/meminfo").read_text().splitlines():
        k, v = l.split(":", 1)
        out[k] = int(v.split()[0])
    return out


def fmt_count(n):
    return f"{n:,}"
