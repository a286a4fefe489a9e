#!/usr/bin/env python3
"""Fence benchmark: the same workloads on the native directory, kernel overlayfs, bindfs,
fuse-overlayfs and agentfense-runc's fence, and containers under runc and agentfense-runc,
printed as one table with every figure beside the native figure measured in the same run.

    python3 benches/fence_bench.py [--quick] [--tree DIR] [--runs N] [--scale N] ...

Run as root (mounts, drop_caches, Docker). Workloads:

  tree    grep -r over a real tree (default: the machine's cargo registry sources), warm and
          cold cache (echo 3 > /proc/sys/vm/drop_caches before each cold run, where
          permitted); find . -type f | wc -l; find with a stat of every file
  git     git status in a git checkout of a slice of the tree (made once, cached under
          --cache); fences use read-only and full-access there (agent-safe hides .git/**)
  read    sequential read of a 1 GiB file (dd bs=1M), warm cache
  write   10,000 small files written, and tar x of 10,000 files, into a writable area
          (for fences: agent-safe's /output, i.e. the delta; read-only cannot write); the
          writable areas live on a tmpfs mounted for the purpose (--write-dir DIR: on DIR's
          file system instead)
  memory  the FUSE daemons' resident size (VmRSS) and Pss, idle and after grep -r
  containers
          docker run --rm IMAGE true, and docker exec latency, under runc, agentfense-runc
          unfenced (as youki's runtime: no daemon, no mount) and fenced (agent-safe)
  scale   N fenced containers started and kept running at once, each running a grep and
          answering one through docker exec: time to start them all, host memory used,
          and a clean teardown (no container, mount or daemon left)

Setups are mounted as in real life: `mount -t overlay` (lower = the tree, upper and work in
a scratch directory), `bindfs TREE MNT`, `fuse-overlayfs -o lowerdir=,upperdir=,workdir=
MNT`, and the fence daemon started directly (`agentfense-runc fence-daemon CFG`, the config
the runtime writes) for file system workloads, through Docker `--runtime` for containers.

Figures are medians of --runs runs after one warm-up (cold runs and writes: no warm-up),
with min and max. Within a group every setup is mounted at once and the runs are
interleaved (setup order rotated at each run), so that a busy machine's changing load weighs
on all setups alike. The goals are printed next to the measured ratios with a pass/MISS
marker; nothing is asserted. Exit status: 0 if every workload ran, 1 if any could not (a mount, a command or a
container failed, or teardown left something behind), 2 on bad usage.

--quick (CI): the repository's src/ as the tree, 2 runs, 64 MiB read, 1,000 files, 5
containers. Every mount is unmounted, every container removed and every scratch directory
deleted at the end, also on failure or SIGINT/SIGTERM.
"""

import argparse
import glob
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fencebench import containers as C  # noqa: E402
from fencebench import fixtures as F  # noqa: E402
from fencebench import mounts as M  # noqa: E402
from fencebench.fsbench import FsBench, Result  # noqa: E402
from fencebench.report import Report  # noqa: E402
from fencebench.util import Cleanup, WorkloadError, log, meminfo, mounts_under  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AGENTFENSE_BIN", REPO / "target" / "release" / "agentfense-runc"))
GROUPS = ("tree", "git", "read", "write", "containers", "scale")
MiB = 1 << 20


class Cfg:
    pass


def default_tree():
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    trees = sorted(glob.glob(os.path.join(home, "registry", "src", "*")))
    return trees[0] if trees else str(REPO / "src")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CI: src/ as the tree, 2 runs, 64 MiB, 1,000 files, 5 containers")
    ap.add_argument("--tree", help="directory for grep/find (default: the cargo registry sources)")
    ap.add_argument("--runs", type=int, help="timed runs per figure (default 3; quick 2)")
    ap.add_argument("--cold-runs", type=int, help="cold-cache runs (default 2)")
    ap.add_argument("--git-files", type=int, default=5000,
                    help="about how many files of the tree the git checkout holds (default 5000)")
    ap.add_argument("--read-mib", type=int, help="size of the sequential read (default 1024; quick 64)")
    ap.add_argument("--files", type=int, help="small files written / in the tar (default 10000; quick 1000)")
    ap.add_argument("--scale", type=int, help="fenced containers at once (default 50; quick 5). "
                    "Each costs some 10-25 MiB of host memory (daemon, shim, Docker's bookkeeping)")
    ap.add_argument("--parallel", type=int, default=8, help="docker commands at once (scale)")
    ap.add_argument("--only", help=f"comma-separated groups to run: {','.join(GROUPS)}")
    ap.add_argument("--skip", help="comma-separated groups to leave out")
    ap.add_argument("--write-dir", help="put the write workloads' writable areas (bases, upper "
                    "directories, deltas) under DIR (default: a tmpfs mounted for the purpose)")
    ap.add_argument("--cache", default="/var/cache/agentfense-bench",
                    help="where the git checkout, the large file and the tar are kept")
    ap.add_argument("--image", default="agentfense-test/busybox:latest")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else set(GROUPS)
    skip = set(a.skip.split(",")) if a.skip else set()
    bad = (only | skip) - set(GROUPS)
    if bad:
        ap.error(f"unknown group(s) {', '.join(sorted(bad))}; groups: {', '.join(GROUPS)}")
    a.groups = [g for g in GROUPS if g in only and g not in skip]
    q = a.quick
    a.tree = a.tree or (str(REPO / "src") if q else default_tree())
    a.runs = a.runs or (2 if q else 3)
    a.cold_runs = a.cold_runs or min(a.runs, 2)
    a.read_bytes = (a.read_mib or (64 if q else 1024)) * MiB
    a.files = a.files or (1000 if q else 10000)
    a.scale = a.scale if a.scale is not None else (5 if q else 50)
    return a


def main():
    a = parse()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, drop_caches, Docker)")
    if not BIN.is_file():
        sys.exit(f"{BIN} is missing: build it first (make build), or set AGENTFENSE_BIN")
    for tool in ("bindfs", "fuse-overlayfs", "git", "tar", "dd", "grep", "find"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (bindfs and fuse-overlayfs: integration/host.sh install)")
    t_start = time.monotonic()
    cleanup = Cleanup()
    cleanup.install_signals()
    cfg = Cfg()
    cfg.binary, cfg.runs, cfg.cold_runs, cfg.image = BIN, a.runs, a.cold_runs, a.image
    cfg.write_dir = a.write_dir
    cfg.can_drop = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    cfg.scratch = tempfile.mkdtemp(prefix="agentfense-bench-")

    def rm_scratch():
        left = mounts_under(cfg.scratch)
        if left:
            raise WorkloadError(f"not removing {cfg.scratch}: {left} still mounted")
        shutil.rmtree(cfg.scratch, ignore_errors=True)
    cleanup.push(f"scratch directory {cfg.scratch}", rm_scratch)

    results, memory, failures = {}, {}, []
    ws = {}
    scale = None
    info = {}
    fs = FsBench(cfg, cleanup, results, memory)
    def group(name, fn):
        """Runs one group; a group that cannot run is a failure, and the next one runs."""
        if name not in a.groups:
            return
        try:
            fn()
        except (WorkloadError, OSError) as e:
            failures.append(f"{name}: {e}")

    def git():
        co = F.git_checkout(a.cache, a.tree, a.git_files)
        info["git"] = (co, F.tree_stats(co)[0] - F.tree_stats(co / ".git")[0])
        ws["git"] = fs.git(co)

    def docker():
        nonlocal scale
        workspace = Path(cfg.scratch) / "workspace"
        shutil.copytree(REPO / "src", workspace, symlinks=True)
        d = C.Docker(cfg, cleanup)
        d.check()
        # Container starts vary by tens of milliseconds from one to the next: more runs there.
        group("containers", lambda: C.startup(d, workspace, max(cfg.runs, 3) * 3 if not a.quick
                                              else cfg.runs, results, Result))

        def scale_():
            nonlocal scale
            log(f"scale: {a.scale} fenced containers, {a.parallel} docker commands at once")
            scale, errs = C.scale(d, workspace, a.scale, a.parallel)
            failures.extend(errs)
        group("scale", scale_)

    try:
        F.ensure_cache(a.cache)
        info["tree"] = F.tree_stats(a.tree)
        log(f"tree {a.tree}: {info['tree'][0]:,} files, {info['tree'][1] / MiB:.0f} MiB; "
            f"groups {','.join(a.groups)}")
        group("tree", lambda: ws.__setitem__("tree", fs.tree(a.tree)))
        group("git", git)
        group("read", lambda: ws.__setitem__(
            "read", fs.read(F.big_file(a.cache, a.read_bytes), a.read_bytes)))
        group("write", lambda: ws.__setitem__(
            "write", fs.write(F.small_files_tar(a.cache, a.files), a.files)))
        if "containers" in a.groups or "scale" in a.groups:
            try:
                docker()
            except (WorkloadError, OSError) as e:
                failures.append(f"docker: {e}")
    except (WorkloadError, OSError) as e:
        failures.append(str(e))
    finally:
        failures += [f"cleanup: {f}" for f in cleanup.run_all()]

    by_error = {}
    for (key, label), r in sorted(results.items()):
        if r.error:
            by_error.setdefault((label, r.error), []).append(key)
    for (label, err), keys in by_error.items():
        failures.append(f"{', '.join(keys)} / {label}: {err}")

    rep = Report()
    mi = meminfo()
    rep.out(f"agentfense-runc benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"{os.cpu_count()} CPUs, {mi['MemTotal'] / 1024 / 1024:.1f} GiB RAM, Linux {platform.release()}"
            f"{' (quick)' if a.quick else ''}")
    rep.out(f"binary {BIN}; tree {a.tree} ({info.get('tree', (0, 0))[0]:,} files, "
            f"{info.get('tree', (0, 0))[1] / MiB:.0f} MiB)")
    rep.out(f"{cfg.runs} timed runs per figure after one warm-up (writes: no warm-up; cold cache: "
            f"{cfg.cold_runs} runs, caches dropped before each"
            f"{'' if cfg.can_drop else ' - NOT PERMITTED here, skipped'}"
            f"{'' if a.quick else f'; container start and exec: {max(cfg.runs, 3) * 3} runs'}); "
            "median, min, max; runs interleaved across setups; ratio = median / native median of this run")
    rep.out("rows read-only, agent-safe, full-access: agentfense-runc's fence daemon with that preset "
            "(audit level as labelled)")
    if "tree" in ws:
        for w in ws["tree"]:
            rep.timing(w.title, w.key, M.BASELINES + M.FENCES, results)
    if "git" in ws:
        co, n = info["git"]
        rep.timing(f"git status in a checkout of {n:,} files ({co}), warm cache", "git-status",
                   M.BASELINES + M.GIT_FENCES, results,
                   notes=["fences: read-only and full-access, since agent-safe hides .git/**; "
                          "full-access lets git refresh its index (into the delta), read-only "
                          "does not, so git re-reads every file whose stat data differs from the "
                          "index's", "bindfs writes through: it runs over its own copy of the "
                          "checkout (its index refreshed by its warm-up run)"])
    if "read" in ws:
        for w in ws["read"]:
            rep.timing(w.title, w.key, M.BASELINES + M.FENCES, results, nbytes=w.throughput_bytes,
                       notes=["ratio: throughput over native throughput (higher is better)"])
    if "write" in ws:
        for w in ws["write"]:
            rep.timing(w.title + " into a writable area", w.key, M.BASELINES + M.WRITE_FENCES, results,
                       notes=[f"writable areas on {a.write_dir or 'a tmpfs'} (bases, upper and work "
                              "directories, deltas); fences: into agent-safe's /output (the delta); "
                              "read-only: n/a, nothing is writable"])
            rep.timing(w.title + ", ratio to kernel overlayfs", w.key,
                       [M.OVERLAY, M.FUSE_OVERLAY] + M.WRITE_FENCES, results, base_label="overlayfs")
    if memory:
        rep.section("memory of the FUSE daemon serving the tree (MiB; RSS = VmRSS, PSS from smaps_rollup)")
        rep.out(f"{'setup':<26} {'idle RSS':>10} {'idle PSS':>10} {'after grep -r RSS':>18} "
                f"{'after grep -r PSS':>18}")
        f = lambda d, k: f"{d[k] / 1024:.1f}" if d.get(k) is not None else "-"  # noqa: E731
        for s in M.BASELINES + M.FENCES:
            idle, after = memory.get((s.label, "idle")), memory.get((s.label, "after grep -r"))
            if idle is None and after is None:
                continue
            idle, after = idle or {}, after or {}
            rep.out(f"{s.label:<26} {f(idle, 'VmRSS'):>10} {f(idle, 'Pss'):>10} "
                    f"{f(after, 'VmRSS'):>18} {f(after, 'Pss'):>18}")
        rep.out("  (idle: right after mounting; native and kernel overlayfs have no daemon; PSS splits "
                "the pages shared with the other daemons mounted at the same time, e.g. the binary)")
    if ("docker-run", "runc") in results:
        variants = ["runc", "agentfense, unfenced", "agentfense, agent-safe"]
        rep.timing(f"docker run --rm {cfg.image} true (-v workspace:/workspace)", "docker-run",
                   variants, results, base_label="runc",
                   notes=["unfenced: agentfense-runc with no fencing asked for (as youki's runtime); "
                          "agent-safe: fenced, audit all, the delta kept"])
        rep.timing("docker exec CONTAINER true", "docker-exec", variants, results, base_label="runc")
    if scale is not None:
        s = scale
        rep.section(f"scale: {a.scale} fenced containers (read-only, audit all) over one workspace, "
                    f"each running a grep and answering one through docker exec")
        mib = lambda k: f"{s[k] / 1024:.0f} MiB" if s.get(k) is not None else "-"  # noqa: E731
        rep.out(f"{'started (docker run -d)':<40} {s.get('started', 0)} in {s.get('start_all_s', 0):.1f} s "
                f"({a.parallel} at once)")
        rep.out(f"{'all greps answered':<40} {s.get('answered', 0)} after {s.get('answer_all_s', 0):.1f} s")
        rep.out(f"{'alive at once':<40} {s.get('alive', 0)} containers, {s.get('daemons', 0)} fence "
                f"daemons, {s.get('mounts', 0)} mounts")
        if s.get("daemon_rss_mean_kib") is not None:
            rep.out(f"{'fence daemon memory':<40} RSS mean {s['daemon_rss_mean_kib'] / 1024:.1f} MiB, max "
                    f"{s['daemon_rss_max_kib'] / 1024:.1f} MiB; PSS total {mib('daemon_pss_total_kib')}")
        if s.get("memavail_drop_kib") is not None and s.get("started"):
            rep.out(f"{'host memory used (MemAvailable drop)':<40} {mib('memavail_drop_kib')} "
                    f"({s['memavail_drop_kib'] / 1024 / s['started']:.1f} MiB per container, Docker "
                    f"included); Shmem {round(s['shmem_growth_kib'] / 1024):+d} MiB; still used after "
                    f"teardown {round(s['memavail_after_kib'] / 1024):+d} MiB (other work on the "
                    "machine moves these)")
        try:
            inotify = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        except (OSError, ValueError):
            inotify = None
        if inotify is not None and a.scale > inotify // 2:
            rep.out(f"{'note':<40} fs.inotify.max_user_instances is {inotify}; fence daemons watch "
                    "the base with inotify (without it they fall back to short cache lifetimes)")
        clean = not (s.get("left_mounts") or s.get("left_daemons") or s.get("left_containers")
                     or s.get("left_state"))
        rep.out(f"{'teardown (docker rm -f)':<40} {s.get('started', 0)} in {s.get('teardown_s', 0):.1f} s; "
                f"clean: {'yes (no container, mount, fence daemon or state directory left)' if clean else 'NO'}")
    rep.goals_section(results, memory, scale, a.scale if "scale" in a.groups else None)
    rep.out()
    rep.out(f"total time {time.monotonic() - t_start:.0f} s")
    if failures:
        rep.out()
        rep.out(f"{len(failures)} workload(s) could not run:")
        for f_ in failures:
            rep.out(f"  - {f_[:400]}")
    print(rep.text(), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
