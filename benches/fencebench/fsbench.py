"""File system workloads, run in each setup mounted over the same directory.

Groups (in each, every setup is mounted at once and the runs are interleaved):
    tree   grep -r (warm and cold), find -type f | wc -l, find with a stat of every file,
           and the FUSE daemons' memory (idle, then after grep -r)
    git    git status in a git checkout of a slice of the tree
    read   sequential read (dd bs=1M) of one large file, warm cache
    write  many small files written, and tar x of many files, into a writable area
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

from . import mounts as M
from .util import (WorkloadError, drop_caches, log, mounts_under, proc_mem, run, timed_cmd,
                   unmount)

NO_MATCH = "zzz_no_match_zzz"


class Result:
    def __init__(self):
        self.values = []      # seconds per timed run
        self.error = None     # why it could not run
        self.skipped = None   # why it was not run (not a failure)
        self.extra = {}


class Workload:
    """`fn(root, k)` returns seconds; `prepare(root, k)` runs untimed before it."""

    def __init__(self, key, title, fn, setups, warmup=True, cold=False, prepare=None,
                 throughput_bytes=None, note=None):
        self.key, self.title, self.fn, self.setups = key, title, fn, setups
        self.warmup, self.cold, self.prepare = warmup, cold, prepare
        self.throughput_bytes = throughput_bytes
        self.note = note


def _cmd(argv, ok=(0,)):
    return lambda root, k: timed_cmd(argv, cwd=root, ok=ok)


def write_small_files(root, k, count, size=1024):
    """count files of `size` bytes, 100 per directory, under output/w-k (created untimed)."""
    base = Path(root) / "output" / f"w-{k}"
    body = b"x" * size
    t = time.perf_counter()
    for i in range(count):
        if i % 100 == 0:
            d = base / f"d{i // 100:04d}"
            os.mkdir(d)
        fd = os.open(d / f"f{i % 100:03d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
    return time.perf_counter() - t


class FsBench:
    def __init__(self, cfg, cleanup, results, memory):
        self.cfg, self.cleanup = cfg, cleanup
        self.results, self.memory = results, memory

    # -- one group: every setup mounted over `base` at once, runs interleaved ---------------

    def run_group(self, name, base, workloads, setups, memory=False, fresh_base=None,
                  base_for=None, scratch=None):
        """Mounts every setup (each over `base`, or over its own fresh_base(), or over
        base_for(setup) when that returns a directory), then runs each workload in all of them,
        run by run, in an order rotated at each run, so that a machine's load changing over
        time weighs on every setup alike. Unmounts everything at the end, also on failure."""
        mounted, undo = {}, []
        try:
            for setup in setups:
                mine = [w for w in workloads if setup in w.setups]
                if not mine:
                    continue
                b = base
                if fresh_base is not None:
                    b = fresh_base()
                    undo.append(self.cleanup.push(f"scratch base {b}", lambda b=b: self._rm_base(b)))
                if base_for is not None:
                    b = base_for(setup) or b
                try:
                    m = M.mount(setup, b, self.cleanup, self.cfg.binary, scratch or self.cfg.scratch)
                    if m._undo is not None:
                        undo.append(m._undo)
                    mounted[setup] = m
                except WorkloadError as e:
                    for w in mine:
                        self.results.setdefault((w.key, setup.label), Result()).error = f"mount: {e}"
            if memory:
                for setup, m in mounted.items():
                    self._memory(setup, m, "idle")
            for w in workloads:
                active = [s for s in setups if s in w.setups and s in mounted]
                log(f"{name}: {w.title} ({len(active)} setups)")
                for s in active:
                    r = self.results.setdefault((w.key, s.label), Result())
                    if w.cold and not self.cfg.can_drop:
                        r.skipped = "drop_caches not permitted"
                    elif w.warmup and not w.cold:
                        self._once(w, s, mounted[s], r, "warm", timed=False)
                runs = self.cfg.cold_runs if w.cold else self.cfg.runs
                for k in range(runs):
                    n = len(active)
                    for s in (active[k % n:] + active[:k % n]) if n else []:
                        r = self.results[(w.key, s.label)]
                        if r.error or r.skipped:
                            continue
                        self._once(w, s, mounted[s], r, k, timed=True)
                for s in active:
                    if isinstance(mounted[s], M.Fence):
                        self.results[(w.key, s.label)].extra["audit_bytes"] = mounted[s].audit_bytes()
                if memory and w.key == "grep-warm":
                    for setup, m in mounted.items():
                        self._memory(setup, m, "after grep -r")
        finally:
            for u in reversed(undo):
                self.cleanup.discharge(u)

    def _once(self, w, s, m, r, k, timed):
        try:
            if w.prepare:
                w.prepare(m.root, k)
            if w.cold and not drop_caches():
                r.values, r.skipped = [], "drop_caches not permitted"
                return
            v = w.fn(m.root, k)
            if timed:
                r.values.append(v)
        except WorkloadError as e:
            r.error = str(e)
        except OSError as e:
            r.error = f"{type(e).__name__}: {e}"

    @staticmethod
    def _rm_base(b):
        left = mounts_under(str(b))
        if left:
            raise WorkloadError(f"not removing {b}: {left} mounted")
        t = time.monotonic()
        shutil.rmtree(b, ignore_errors=True)
        if time.monotonic() - t > 2:
            log(f"removing {b}: {time.monotonic() - t:.1f}s")

    def _memory(self, setup, m, when):
        pids = m.daemon_pids()
        if not pids:
            return
        tot = {}
        for pid in pids:
            for k, v in proc_mem(pid).items():
                if v is not None:
                    tot[k] = tot.get(k, 0) + v
        self.memory[(setup.label, when)] = tot

    # -- the groups --------------------------------------------------------------------

    def tree(self, tree):
        all_setups = M.BASELINES + M.FENCES
        ws = [
            Workload("grep-warm", "grep -r, warm cache",
                     _cmd(["grep", "-r", "-c", NO_MATCH, "."], ok=(0, 1)), all_setups),
            Workload("find-count", "find . -type f | wc -l, warm cache",
                     _cmd(["bash", "-c", "set -o pipefail; find . -type f | wc -l"]), all_setups),
            Workload("find-stat", "find . -type f with a stat of every file, warm cache",
                     _cmd(["find", ".", "-type", "f", "-printf", "%s %m %T@\\n"]), all_setups),
            Workload("grep-cold", "grep -r, cold cache (drop_caches before each run)",
                     _cmd(["grep", "-r", "-c", NO_MATCH, "."], ok=(0, 1)), all_setups,
                     cold=True),
        ]
        self.run_group("tree", tree, ws, all_setups, memory=True)
        return ws

    def git(self, checkout):
        setups = M.BASELINES + M.GIT_FENCES
        git = ["git", "-c", "core.fsmonitor=false", "-c", "safe.directory=*"]
        # Native git refreshes the index once, before anything is mounted over the checkout:
        # every setup then starts from the index as git on the host left it.
        run(git + ["status"], cwd=checkout, timeout=600)

        copies = []

        def own_copy(setup):
            # bindfs writes through: git's index refresh there (new inode numbers) would land
            # in the checkout that the other setups read. It gets its own copy.
            if setup is not M.BINDFS:
                return None
            d = Path(tempfile.mkdtemp(prefix="afbench-gitcopy-", dir=self.cfg.scratch))
            copies.append(self.cleanup.push(f"git copy {d}", lambda: self._rm_base(d)))
            run(["cp", "-a", f"{checkout}/.", d], timeout=600)
            return d

        ws = [Workload("git-status", "git status, warm cache", _cmd(git + ["status"]), setups)]
        try:
            self.run_group("git", checkout, ws, setups, base_for=own_copy)
        finally:
            for u in copies:
                self.cleanup.discharge(u)
        return ws

    def read(self, d, size):
        setups = M.BASELINES + M.FENCES
        ws = [Workload("seq-read", f"sequential read of a {size >> 20} MiB file (dd bs=1M), warm cache",
                       _cmd(["dd", "if=data.bin", "of=/dev/null", "bs=1M"]), setups,
                       throughput_bytes=size)]
        self.run_group("read", d, ws, setups)
        return ws

    def write(self, tar, count):
        from .fixtures import writable_base
        setups = M.BASELINES + M.WRITE_FENCES

        def mkdir(prefix):
            return lambda root, k: os.mkdir(Path(root) / "output" / f"{prefix}-{k}")

        def tar_x(root, k):
            return timed_cmd(["tar", "-x", "-f", tar, "-C", Path(root) / "output" / f"t-{k}"],
                             cwd=root)

        ws = [
            Workload("write-small", f"write {count:,} files of 1 KiB (100 per directory)",
                     lambda root, k: write_small_files(root, k, count), setups,
                     prepare=mkdir("w"), warmup=False),
            Workload("tar-x", f"tar x of {count:,} files (200 B - 4 KiB)", tar_x, setups,
                     prepare=mkdir("t"), warmup=False),
        ]
        # No warm-up run (nothing to warm but the archive itself, read here once).
        Path(tar).read_bytes()
        area = self.cfg.write_dir
        if area is None:
            # A tmpfs of our own for everything written (writable bases, uppers, deltas):
            # removing some 360,000 small files from a busy disk afterwards took longer than
            # all the measurements, and writeback of other work on the disk stays out of the
            # figures. --write-dir DIR puts the writable areas on DIR's file system instead.
            area = tempfile.mkdtemp(prefix="afbench-tmpfs-", dir=self.cfg.scratch)
            run(["mount", "-t", "tmpfs", "-o", "mode=0755", "afbench", area], timeout=60)
            undo = self.cleanup.push(f"tmpfs at {area}", lambda: (unmount(area), os.rmdir(area)))
        else:
            area = tempfile.mkdtemp(prefix="afbench-writes-", dir=area)
            undo = self.cleanup.push(f"write area {area}", lambda: self._rm_base(area))
        try:
            self.run_group("write", None, ws, setups, fresh_base=lambda: writable_base(area),
                           scratch=area)
        finally:
            # Now, not at exit: what was written must not weigh on the memory figures below.
            self.cleanup.discharge(undo)
        return ws
