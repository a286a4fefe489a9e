"""The setups, each mounted as it is in real life over a given directory:

    native          the directory itself
    overlayfs       mount -t overlay overlay -o lowerdir=DIR,upperdir=U,workdir=W MNT
    bindfs          bindfs DIR MNT
    fuse-overlayfs  fuse-overlayfs -o lowerdir=DIR,upperdir=U,workdir=W MNT
    fence           agentfense-runc fence-daemon CFG (the daemon the runtime starts for a
                    fenced workspace, with the same config fields: base, upper, origins,
                    policy in canonical form, audit trail, 4 threads)

Every mount registers its own undo with the harness's Cleanup, so it is unmounted (and its
scratch directory removed, never while anything is mounted beneath it) even on failure.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .util import WorkloadError, log, mounted, mounts_under, pids_matching, run, unmount

# The presets' rules in the daemon's canonical form (Policy::canonical_json), as the runtime
# writes them into the daemon's config.
_G = lambda p, l, prio=0: {"pattern": p, "permission": l, "type": "glob", "priority": prio}  # noqa: E731
PRESETS = {
    "read-only": {"default": "none", "rules": [_G("**/*", "read")]},
    "full-access": {"default": "none", "rules": [_G("**/*", "write")]},
    "agent-safe": {"default": "none", "rules": [
        _G("**/*", "read"), _G("/output/**", "write", 10), _G("/tmp/**", "write", 10),
        _G("**/.env*", "none", 100), _G("**/secrets/**", "none", 100), _G("**/*.key", "none", 100),
        _G("**/*.pem", "none", 100), _G("**/credentials*", "none", 100),
        _G("**/.git/**", "none", 50)]},
}


class Mount:
    """A setup mounted over `base`; workloads run in `.root`."""

    kind = "native"

    def __init__(self, base, cleanup, scratch_parent=None):
        self.base = Path(base)
        self.cleanup = cleanup
        self.root = self.base
        self.scratch = None
        self._undo = None
        self.scratch_parent = scratch_parent

    def _make_scratch(self):
        self.scratch = Path(tempfile.mkdtemp(prefix=f"afbench-{self.kind}-", dir=self.scratch_parent))
        self._undo = self.cleanup.push(f"{self.kind} mount at {self.scratch}", self._teardown)

    def daemon_pids(self):
        """The processes serving this mount (FUSE daemons); none for kernel setups."""
        return []

    def _teardown(self):
        if self.scratch is None:
            return
        mnt = self.scratch / "mnt"
        t = time.monotonic()
        if mounted(mnt):
            unmount(mnt)
        self._after_unmount()
        t1 = time.monotonic()
        left = mounts_under(str(self.scratch))
        if left:
            raise WorkloadError(f"not removing {self.scratch}: {left} still mounted")
        shutil.rmtree(self.scratch, ignore_errors=True)
        if time.monotonic() - t > 2:
            log(f"{self.kind} teardown: unmount {t1 - t:.1f}s, removing its scratch "
                f"{time.monotonic() - t1:.1f}s")

    def _after_unmount(self):
        pass

    def close(self):
        if self._undo is not None:
            self.cleanup.discharge(self._undo)


class Native(Mount):
    kind = "native"

    def __init__(self, base, cleanup, scratch_parent=None):
        super().__init__(base, cleanup, scratch_parent)


class Overlay(Mount):
    kind = "overlayfs"

    def __init__(self, base, cleanup, scratch_parent=None):
        super().__init__(base, cleanup, scratch_parent)
        self._make_scratch()
        for d in ("upper", "work", "mnt"):
            (self.scratch / d).mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.base},upperdir={self.scratch / 'upper'},workdir={self.scratch / 'work'}",
             self.scratch / "mnt"], timeout=60)
        self.root = self.scratch / "mnt"


class _FuseProgram(Mount):
    """A FUSE file system that daemonizes itself (bindfs, fuse-overlayfs)."""

    program = None

    def _wait_mounted(self):
        end = time.monotonic() + 20
        while not mounted(self.root):
            if time.monotonic() > end:
                raise WorkloadError(f"{self.kind}: {self.root} not mounted after 20s")
            time.sleep(0.05)

    def daemon_pids(self):
        return pids_matching(self.program.encode() + b"\0", str(self.root).encode() + b"\0") or \
            pids_matching(self.program, str(self.root))

    def _after_unmount(self):
        # The daemon exits once unmounted; give it a moment (it is ours: it serves our mount).
        end = time.monotonic() + 10
        while self.daemon_pids() and time.monotonic() < end:
            time.sleep(0.05)


class Bindfs(_FuseProgram):
    kind = "bindfs"
    program = "bindfs"

    def __init__(self, base, cleanup, scratch_parent=None):
        super().__init__(base, cleanup, scratch_parent)
        self._make_scratch()
        (self.scratch / "mnt").mkdir()
        self.root = self.scratch / "mnt"
        run(["bindfs", self.base, self.root], timeout=60)
        self._wait_mounted()


class FuseOverlay(_FuseProgram):
    kind = "fuse-overlayfs"
    program = "fuse-overlayfs"

    def __init__(self, base, cleanup, scratch_parent=None):
        super().__init__(base, cleanup, scratch_parent)
        self._make_scratch()
        for d in ("upper", "work", "mnt"):
            (self.scratch / d).mkdir()
        self.root = self.scratch / "mnt"
        run(["fuse-overlayfs", "-o",
             f"lowerdir={self.base},upperdir={self.scratch / 'upper'},workdir={self.scratch / 'work'}",
             self.root], timeout=60)
        self._wait_mounted()


class Fence(Mount):
    """The fence daemon over `base`, with `policy` (a preset name) and audit level `audit`."""

    kind = "fence"

    def __init__(self, base, cleanup, binary, preset, audit, scratch_parent=None):
        super().__init__(base, cleanup, scratch_parent)
        self.proc = None
        self._make_scratch()
        for d in ("upper", "mnt"):
            (self.scratch / d).mkdir()
        self.root = self.scratch / "mnt"
        cfg = {"container_id": f"bench-{os.getpid()}", "base": str(self.base),
               "upper": str(self.scratch / "upper"), "mountpoint": str(self.root),
               "policy": json.dumps(PRESETS[preset], separators=(",", ":")), "read_only": False,
               "threads": 4, "audit_level": audit,
               "audit_path": str(self.scratch / "audit.jsonl") if audit != "off" else None,
               "origins": str(self.scratch / "origins.jsonl")}
        (self.scratch / "daemon.json").write_text(json.dumps(cfg))
        self.log = self.scratch / "daemon.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([str(binary), "fence-daemon", str(self.scratch / "daemon.json")],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=logf)
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        if line != "ready":
            try:
                rc = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(timeout=10)
            raise WorkloadError(f"fence daemon ({preset}, audit {audit}) did not mount (exit {rc}): "
                                f"{self.log.read_text(errors='replace').strip()[-500:]}")

    def daemon_pids(self):
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def audit_bytes(self):
        p = self.scratch / "audit.jsonl"
        return p.stat().st_size if p.exists() else 0

    def _after_unmount(self):
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"fence daemon {self.proc.pid} still running after unmount: killing it")
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


def mount(setup, base, cleanup, binary, scratch_parent=None):
    """Mounts `setup` (a Setup below) over base."""
    if setup.kind == "native":
        return Native(base, cleanup, scratch_parent)
    if setup.kind == "overlayfs":
        return Overlay(base, cleanup, scratch_parent)
    if setup.kind == "bindfs":
        return Bindfs(base, cleanup, scratch_parent)
    if setup.kind == "fuse-overlayfs":
        return FuseOverlay(base, cleanup, scratch_parent)
    if setup.kind == "fence":
        return Fence(base, cleanup, binary, setup.preset, setup.audit, scratch_parent)
    raise ValueError(setup.kind)


class Setup:
    """One row of the table: how the directory is mounted."""

    def __init__(self, label, kind, preset=None, audit=None):
        self.label, self.kind, self.preset, self.audit = label, kind, preset, audit

    def __repr__(self):
        return self.label


NATIVE = Setup("native", "native")
OVERLAY = Setup("overlayfs", "overlayfs")
BINDFS = Setup("bindfs", "bindfs")
FUSE_OVERLAY = Setup("fuse-overlayfs", "fuse-overlayfs")
# Labels kept as the earlier harness printed them (integration/test_bench.py looks for them).
FENCE_RO = Setup("read-only", "fence", "read-only", "off")
FENCE_SAFE_OFF = Setup("agent-safe, audit off", "fence", "agent-safe", "off")
FENCE_SAFE_ALL = Setup("agent-safe, audit all", "fence", "agent-safe", "all")
# For git status: agent-safe hides .git/**, so a policy that lets git read (and, for its
# index refresh, write) .git is used there instead.
FENCE_FULL_OFF = Setup("full-access, audit off", "fence", "full-access", "off")
FENCE_FULL_ALL = Setup("full-access, audit all", "fence", "full-access", "all")

BASELINES = [NATIVE, OVERLAY, BINDFS, FUSE_OVERLAY]
FENCES = [FENCE_RO, FENCE_SAFE_OFF, FENCE_SAFE_ALL]
GIT_FENCES = [FENCE_RO, FENCE_FULL_OFF, FENCE_FULL_ALL]
WRITE_FENCES = [FENCE_SAFE_OFF, FENCE_SAFE_ALL]
