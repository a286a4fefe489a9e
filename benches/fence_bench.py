#!/usr/bin/env python3
"""Fence benchmark: the same workloads on the native directory and through fences mounted by
the daemon directly (no engine), printed side by side with ratios to native.

    python3 benches/fence_bench.py [--tree DIR] [--runs N] [--quick]

Workloads: `grep -r` over a real tree (default: the machine's cargo registry sources) and
`find -type f` with a stat of every file, warm cache. Fences: `read-only`, and `agent-safe`
with audit `all` and `off` (the cost of the audit trail). Figures are medians of N runs with
min and max; nothing is asserted: this prints, people judge.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AGENTFENSE_BIN", REPO / "target" / "release" / "agentfense-runc"))


def policy(preset):
    """The preset's rules in the daemon's canonical form."""
    presets = {
        "read-only": {"default": "none", "rules": [
            {"pattern": "**/*", "permission": "read", "type": "glob", "priority": 0}]},
        "agent-safe": {"default": "none", "rules": [
            {"pattern": "**/*", "permission": "read", "type": "glob", "priority": 0},
            {"pattern": "/output/**", "permission": "write", "type": "glob", "priority": 10},
            {"pattern": "/tmp/**", "permission": "write", "type": "glob", "priority": 10},
            {"pattern": "**/.env*", "permission": "none", "type": "glob", "priority": 100},
            {"pattern": "**/secrets/**", "permission": "none", "type": "glob", "priority": 100},
            {"pattern": "**/*.key", "permission": "none", "type": "glob", "priority": 100},
            {"pattern": "**/*.pem", "permission": "none", "type": "glob", "priority": 100},
            {"pattern": "**/credentials*", "permission": "none", "type": "glob", "priority": 100},
            {"pattern": "**/.git/**", "permission": "none", "type": "glob", "priority": 50}]},
    }
    return json.dumps(presets[preset])


class Fence:
    def __init__(self, base, preset, audit, work):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-", dir=work))
        (self.dir / "upper").mkdir()
        (self.dir / "mnt").mkdir()
        cfg = {"container_id": "bench", "base": str(base), "upper": str(self.dir / "upper"),
               "mountpoint": str(self.dir / "mnt"), "read_only": False, "policy": policy(preset),
               "audit_level": audit,
               "audit_path": str(self.dir / "audit.jsonl") if audit != "off" else None}
        (self.dir / "cfg.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([BIN, "fence-daemon", self.dir / "cfg.json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            sys.exit(f"fence daemon failed: {self.proc.stderr.read()}")
        self.mnt = self.dir / "mnt"

    def close(self):
        subprocess.run(["umount", self.mnt])
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir)


def timed(cmd, runs):
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm up
    xs = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        xs.append(time.perf_counter() - t)
    return xs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a small tree and 2 runs (CI)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the fences are FUSE mounts)")
    tree = a.tree or (glob.glob(os.path.expanduser("~/.cargo/registry/src/*")) or [str(REPO / "src")])[0]
    runs = 2 if a.quick else a.runs
    if a.quick:
        tree = str(REPO / "src")
    work = tempfile.mkdtemp(prefix="agentfense-bench-")
    files = sum(len(f) for _, _, f in os.walk(tree))
    print(f"tree: {tree} ({files} files); {runs} runs each, warm cache; median [min, max] seconds")
    workloads = {
        "grep -r": lambda d: ["grep", "-r", "-c", "zzz_no_match_zzz", str(d)],
        "find + stat": lambda d: ["find", str(d), "-type", "f", "-printf", "%s\n"],
    }
    setups = [("native", None, None), ("read-only", "read-only", "off"),
              ("agent-safe, audit off", "agent-safe", "off"),
              ("agent-safe, audit all", "agent-safe", "all")]
    results = {}
    for label, preset, audit in setups:
        fence = Fence(tree, preset, audit, work) if preset else None
        root = fence.mnt if fence else tree
        try:
            for w, cmd in workloads.items():
                results[(label, w)] = timed(cmd(root), runs)
        finally:
            if fence:
                fence.close()
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'setup':<24} " + " ".join(f"{w:>32}" for w in workloads))
    for label, _, _ in setups:
        cells = []
        for w in workloads:
            xs = results[(label, w)]
            base = statistics.median(results[("native", w)])
            m = statistics.median(xs)
            cells.append(f"{m:7.3f} [{min(xs):.3f},{max(xs):.3f}] {m / base:5.1f}x")
        print(f"{label:<24} " + " ".join(f"{c:>32}" for c in cells))
    for w in workloads:
        on = statistics.median(results[("agent-safe, audit all", w)])
        off = statistics.median(results[("agent-safe, audit off", w)])
        print(f"audit all vs off, {w}: {on / off:.2f}x")


if __name__ == "__main__":
    main()
