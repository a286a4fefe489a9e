"""Scale: 100 fenced containers started together over one shared base (SPEC §1 scenario 3,
per-tenant policies), through Docker (environment form: Docker 20.10 has no --annotation).

Requirement: "100 containers started together over one base, each writing 1 MB into its own
output: each sees only its own output, the base is byte-for-byte unchanged, total extra disk is
the sum of the deltas, and deleting them leaves no mount or daemon behind."

Timings and sizes are printed (run with -s), never asserted.
"""

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import BIN, DOCKER, IMAGE, sh, unique

N = 100
PARALLEL = 16
MB = 1 << 20
STATE = Path("/var/lib/agentfense/containers")
WS = "/workspace"
# Per-container delta bound: the 1 MB written, plus at most 20 %, plus a small constant for
# directories and the few small files each tenant writes.
DELTA_MAX = int(1.2 * MB) + 64 * 1024
# The state directory beside the delta (fence.json, daemon config and log, audit trail).
BOOKKEEPING_MAX = 512 * 1024


def tenant(i):
    return f"t{i:03d}"


def policy_for(t):
    return [{"pattern": "/app/**", "permission": "read"},
            {"pattern": f"/output/{t}/**", "permission": "write", "priority": 10},
            {"pattern": "/output/**", "permission": "none"}]


def tenant_script(t):
    """Runs as the container's main process: writes 1 MB of random data and what it sees into
    its own output, marks it done, then stays alive."""
    o = f"{WS}/output/{t}"
    return (
        "set -e; "
        f"head -c {MB} /dev/urandom > {o}/data; "
        f"sha256sum {o}/data | cut -d' ' -f1 > {o}/data.sha256; "
        f"ls -a {WS}/output > {o}/listing; "
        # Any other tenant's directory this one can see (none expected).
        f"for i in $(seq -w 0 {N - 1}); do n=t0$i; [ $n = {t} ] && continue; "
        f"if ls -d {WS}/output/$n >/dev/null 2>&1; then echo $n; fi; done > {o}/others; "
        f"touch {o}/done; "
        "exec sleep 100000"
    )


def live_check_script(t, other):
    """Run by `docker exec` while all containers are up."""
    o = f"{WS}/output/{t}"
    return (
        f"cd {WS}; ls -a output; echo ---; sha256sum {o}/data | cut -d' ' -f1; wc -c < {o}/data; "
        f"cat {o}/README; echo ---; ls app; cat app/agent.py; echo ---; "
        # Every other tenant's directory: stat must say ENOENT (one line each).
        f"for i in $(seq -w 0 {N - 1}); do n=t0$i; [ $n = {t} ] && continue; "
        f"stat -c %n output/$n 2>&1; done; echo ---; "
        # Reading, and creating, inside one other tenant's directory both fail.
        f"cat output/{other}/README 2>&1; {{ echo x > output/{other}/evil; }} 2>&1 || echo create-refused; "
        f"{{ echo x > app/evil; }} 2>&1 || echo app-create-refused"
    )


def write_base(base):
    app = base / "app"
    (app / "lib").mkdir(parents=True)
    (app / "agent.py").write_text("print('agent')\n")
    for k in range(20):
        (app / "lib" / f"mod{k}.py").write_text(f"def f{k}():\n    return {k}\n" * 50)
    # Large enough that a hidden copy of the base in any delta would break the size bound.
    (app / "model.bin").write_bytes(os.urandom(768 * 1024))
    os.chmod(app / "model.bin", 0o640)
    os.setxattr(app / "model.bin", "user.origin", b"base")
    os.symlink("agent.py", app / "main.py")
    for i in range(N):
        d = base / "output" / tenant(i)
        d.mkdir(parents=True)
        (d / "README").write_text(f"tenant {tenant(i)}\n")
    # Fixed times, so that any later change to the base is visible in the digest.
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (1_500_000_000, 1_500_000_000), follow_symlinks=False)
    os.utime(base, (1_500_000_000, 1_500_000_000))


def base_digest(root):
    """Per entry: name, type, mode, owner, size, mtime, ctime, xattrs and content (or link)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            p = Path(dirpath) / name if name else Path(dirpath)
            if name == "" and p != root:
                continue
            st = p.lstat()
            xattrs = sorted((a, os.getxattr(p, a, follow_symlinks=False))
                            for a in os.listxattr(p, follow_symlinks=False))
            if p.is_symlink():
                body = os.readlink(p)
            elif p.is_file():
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, st.st_ctime_ns, repr(xattrs), body)
    return out


def disk_usage(root):
    """(apparent bytes of regular files, allocated bytes of everything) under root, not
    crossing into other file systems (the state dir's mnt/ holds the fence mount)."""
    dev = root.lstat().st_dev
    apparent = allocated = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).lstat().st_dev == dev]
        allocated += Path(dirpath).lstat().st_blocks * 512
        for f in filenames:
            st = (Path(dirpath) / f).lstat()
            allocated += st.st_blocks * 512
            if os.path.isfile(Path(dirpath) / f) and not os.path.islink(Path(dirpath) / f):
                apparent += st.st_size
    return apparent, allocated


def fence_mounts(ids):
    return [l for l in Path("/proc/mounts").read_text().splitlines()
            if any(cid in l for cid in ids)]


def fence_daemons(ids):
    """{pid: cmdline} of fence daemons serving any of the containers `ids`."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fence-daemon" in cmd:
            line = b" ".join(cmd).decode(errors="replace")
            if any(cid in line for cid in ids):
                found[int(d.name)] = line
    return found


def mem_kib(pid, field, file="status"):
    """VmRSS (status) or Pss (smaps_rollup: shared pages split among their users) of pid."""
    try:
        for l in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if l.startswith(field + ":"):
                return int(l.split()[1])
    except OSError:
        pass
    return None


def meminfo_kib(field):
    for l in Path("/proc/meminfo").read_text().splitlines():
        if l.startswith(field + ":"):
            return int(l.split()[1])
    return 0


def pmap(fn, items):
    with ThreadPoolExecutor(max_workers=PARALLEL) as ex:
        return list(ex.map(fn, items))


def test_100_tenants_over_one_base(docker_engine, image, tmp_path):
    base = tmp_path / "base"
    write_base(base)
    before = base_digest(base)
    tenants = [tenant(i) for i in range(N)]
    prefix = unique("af-scale")
    names = {t: f"{prefix}-{t}" for t in tenants}
    ids = {}  # tenant -> full container id
    st_before = os.statvfs("/var/lib")
    shmem_before, avail_before = meminfo_kib("Shmem"), meminfo_kib("MemAvailable")

    def run(t):
        p = sh([DOCKER, "run", "-d", "--name", names[t], "--runtime", "agentfense",
                "-e", "AGENTFENSE_POLICY=" + json.dumps(policy_for(t)),
                "-v", f"{base}:{WS}", IMAGE, "sh", "-c", tenant_script(t)], timeout=180)
        return t, p

    def rm(t):
        return t, sh([DOCKER, "rm", "-f", names[t]], timeout=180)

    deleted = False
    try:
        # --- Start all 100 together. ---
        t0 = time.monotonic()
        results = pmap(run, tenants)
        t_started = time.monotonic() - t0
        failed = [(t, p.returncode, p.stderr.strip()) for t, p in results if p.returncode != 0]
        assert not failed, f"{len(failed)} of {N} failed to start: {failed[:5]}"
        for t, p in results:
            ids[t] = p.stdout.strip().splitlines()[-1]
        uppers = {}
        for t in tenants:
            rec = json.loads((STATE / ids[t] / "fence.json").read_text())
            assert len(rec["workspaces"]) == 1 and rec["workspaces"][0]["base"] == str(base), rec
            uppers[t] = Path(rec["workspaces"][0]["upper"])
        deadline = time.monotonic() + 180
        pending = set(tenants)
        while pending and time.monotonic() < deadline:
            pending = {t for t in pending if not (uppers[t] / "output" / t / "done").exists()}
            if pending:
                time.sleep(0.5)
        t_written = time.monotonic() - t0
        if pending:
            logs = {t: sh([DOCKER, "logs", names[t]]).stderr[-300:] for t in sorted(pending)[:3]}
            pytest.fail(f"{len(pending)} tenants never finished writing: {sorted(pending)[:10]} {logs}")
        print(f"\n[scale] {N} containers: docker run -d all returned in {t_started:.1f}s "
              f"({PARALLEL} at once); all had written their 1 MB after {t_written:.1f}s")

        # --- All 100 running at the same time, each with its daemon and mount. ---
        def states():
            p = sh([DOCKER, "inspect", "-f", "{{.Name}} {{.State.Running}} {{.State.StartedAt}} "
                    "{{.RestartCount}}", *names.values()], check=True, timeout=120)
            return sorted(p.stdout.split("\n")[:-1])
        first = states()
        assert len(first) == N and all(" true " in s for s in first), first
        running = sh([DOCKER, "ps", "-q", "--filter", f"name={prefix}-"], check=True).stdout.split()
        assert len(running) == N, len(running)
        daemons = fence_daemons(ids.values())
        assert len(daemons) == N, f"{len(daemons)} fence daemons for {N} containers"
        for t in tenants:
            assert sum(ids[t] in c for c in daemons.values()) == 1, (t, ids[t])
        mounts = fence_mounts(ids.values())
        assert len(mounts) == N and all(" fuse" in m for m in mounts), mounts[:3]
        rss = [r for r in (mem_kib(p, "VmRSS") for p in daemons) if r is not None]
        pss = [r for r in (mem_kib(p, "Pss", "smaps_rollup") for p in daemons) if r is not None]
        print(f"[scale] fence daemon RSS: mean {sum(rss) / len(rss) / 1024:.1f} MiB, "
              f"max {max(rss) / 1024:.1f} MiB; PSS: mean {sum(pss) / len(pss) / 1024:.1f} MiB, "
              f"total {sum(pss) / 1024:.0f} MiB for {len(pss)} daemons")
        # Daemons run from the binary on disk (pages shared by all); what still lands in shared
        # memory is the sealed memfd copy (CVE-2019-5736 protection) of each runtime process
        # that starts or enters a container, for as long as it runs (the shims' children).
        shmem = meminfo_kib("Shmem") - shmem_before
        avail = avail_before - meminfo_kib("MemAvailable")
        print(f"[scale] host Shmem grew by {shmem / 1024:.0f} MiB ({shmem / 1024 / N:.1f} MiB per "
              f"container; runtime binary {BIN.stat().st_size / MB:.1f} MiB); MemAvailable fell by "
              f"{avail / 1024:.0f} MiB ({avail / 1024 / N:.1f} MiB per container, all of Docker "
              f"included)")

        # --- Each sees only its own output. ---
        host_sums = {}
        for t in tenants:
            data = uppers[t] / "output" / t / "data"
            assert data.stat().st_size == MB, (t, data.stat().st_size)
            host_sums[t] = hashlib.sha256(data.read_bytes()).hexdigest()
            own = (uppers[t] / "output" / t)
            assert (own / "data.sha256").read_text().strip() == host_sums[t], t
            assert (own / "listing").read_text() == f".\n..\n{t}\n", (t, (own / "listing").read_text())
            assert (own / "others").read_text() == "", (t, (own / "others").read_text())
        assert len(set(host_sums.values())) == N, "two tenants wrote the same data"

        def live(t):
            other = tenant((int(t[1:]) + 1) % N)
            return t, other, sh([DOCKER, "exec", names[t], "sh", "-c", live_check_script(t, other)],
                                timeout=120)
        t1 = time.monotonic()
        for t, other, p in pmap(live, tenants):
            parts = p.stdout.split("---\n")
            assert len(parts) == 5, (t, p.stdout, p.stderr)
            listing, data, app, stats, tail = parts
            assert listing == f".\n..\n{t}\n", (t, listing)
            assert data == f"{host_sums[t]}\n{MB}\ntenant {t}\n", (t, data)
            assert app == "agent.py\nlib\nmain.py\nmodel.bin\nprint('agent')\n", (t, app)
            lines = stats.splitlines()
            assert len(lines) == N - 1, (t, lines[:3])
            bad = [l for l in lines if not l.endswith("No such file or directory")]
            assert not bad, (t, bad[:5])
            tail = tail.splitlines()
            assert len(tail) == 5 and "No such file or directory" in tail[0], (t, tail)
            # Inside a hidden directory: its lookup fails (ENOENT, which busybox sh words as
            # "nonexistent directory"); at a read-only path: EACCES.
            assert "nonexistent directory" in tail[1] and tail[2] == "create-refused", (t, tail)
            assert "Permission denied" in tail[3] and tail[4] == "app-create-refused", (t, tail)
            assert not (uppers[t] / "output" / other).exists(), (t, other)
            assert not (uppers[other] / "output" / other / "evil").exists(), (t, other)
        print(f"[scale] {N} live docker exec checks in {time.monotonic() - t1:.1f}s")
        # Nothing restarted or stopped while they were being checked: all ran together throughout.
        assert states() == first

        # --- Base byte-for-byte unchanged (checked while all are still running, and again below). ---
        assert base_digest(base) == before

        # --- Total extra disk is the sum of the deltas. ---
        deltas, books = {}, {}
        for t in tenants:
            # Only this tenant's output, never the app (the base is not copied up by reading).
            paths = sorted(str(p.relative_to(uppers[t])) for p in uppers[t].rglob("*"))
            assert not any(p == "app" or p.startswith("app/") for p in paths), (t, paths)
            assert all(p == "output" or p.startswith(f"output/{t}") for p in paths), (t, paths)
            apparent, allocated = disk_usage(uppers[t])
            assert MB <= apparent <= MB + 64 * 1024, (t, apparent)
            assert allocated <= DELTA_MAX, (t, allocated, paths)
            deltas[t] = allocated
            _, state_alloc = disk_usage(STATE / ids[t])
            books[t] = state_alloc - allocated
            assert books[t] <= BOOKKEEPING_MAX, (t, books[t], sorted(os.listdir(STATE / ids[t])))
        total = sum(deltas.values())
        assert total <= N * DELTA_MAX
        st_after = os.statvfs("/var/lib")
        fs_delta = (st_before.f_bfree - st_after.f_bfree) * st_after.f_frsize
        print(f"[scale] per-container delta (allocated): min {min(deltas.values()) / MB:.3f} MiB, "
              f"max {max(deltas.values()) / MB:.3f} MiB; sum {total / MB:.1f} MiB for {N}; "
              f"state-dir bookkeeping (audit, configs) max {max(books.values()) / 1024:.0f} KiB, "
              f"sum {sum(books.values()) / MB:.1f} MiB; file system used grew by {fs_delta / MB:.1f} MiB "
              f"(includes Docker's own per-container layers and anything else on the host)")

        # --- Delete all together: no mount, no daemon left. ---
        t2 = time.monotonic()
        rm_results = pmap(rm, tenants)
        t_deleted = time.monotonic() - t2
        print(f"[scale] docker rm -f of all {N} returned in {t_deleted:.1f}s ({PARALLEL} at once)")
        failed = [(t, p.returncode, p.stderr.strip()) for t, p in rm_results if p.returncode != 0]
        assert not failed, failed[:5]
        deleted = True
        # Teardown is synchronous in the runtime's delete: right after `docker rm` returns.
        left_mounts, left_daemons = fence_mounts(ids.values()), fence_daemons(ids.values())
        if left_mounts or left_daemons:
            time.sleep(15)
            late_mounts, late_daemons = fence_mounts(ids.values()), fence_daemons(ids.values())
            pytest.fail(f"after docker rm: {len(left_mounts)} mounts, {len(left_daemons)} daemons "
                        f"left ({left_mounts[:2]}, {list(left_daemons.values())[:2]}); 15 s later "
                        f"{len(late_mounts)} mounts and {len(late_daemons)} daemons")
        print(f"[scale] after delete, host Shmem is {(meminfo_kib('Shmem') - shmem_before) / 1024:+.0f} "
              f"MiB from before the start")
        gone = sh([DOCKER, "ps", "-aq", "--filter", f"name={prefix}-"], check=True).stdout.split()
        assert gone == []
        assert base_digest(base) == before
        # The delta is kept at delete (default `keep`), outside any mount.
        for t in tenants:
            rec = json.loads((STATE / ids[t] / "fence.json").read_text())
            assert rec["live"] is False and rec["workspaces"][0]["daemon"] is None, (t, rec)
            assert hashlib.sha256((uppers[t] / "output" / t / "data").read_bytes()).hexdigest() \
                == host_sums[t], t
    finally:
        if not deleted:
            pmap(rm, tenants)
        mounted = "\n".join(fence_mounts(ids.values()))
        for cid in ids.values():
            d = STATE / cid
            # Never walk into a fence mount that is still there (rmtree crosses mounts).
            if cid in mounted:
                print(f"[scale] NOT removing {d}: still mounted")
            elif d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
