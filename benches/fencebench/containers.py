"""Container workloads through Docker: `docker run --rm IMAGE true` and `docker exec`
latency under runc, agentfense-runc unfenced (what youki's runtime does: no daemon, no
mount) and agentfense-runc fenced; and scale: N fenced containers started and kept running
at once, each answering a grep.

Docker before 24 has no --annotation: fencing is asked for with the AGENTFENSE_* environment
variables, as README.md says. The runtime benchmarked is the binary under test: a runtime
Docker already knows with exactly that path is used, else it is registered as
`agentfense-bench` through `agentfense-runc configure docker` (dockerd reloaded with SIGHUP)
and that entry, and only it, is removed again at the end.
"""

import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .util import WorkloadError, log, meminfo, pids_matching, proc_mem, run

DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else (shutil.which("docker") or "docker")
DAEMON_JSON = Path("/etc/docker/daemon.json")
STATE = Path("/var/lib/agentfense/containers")
BENCH_RUNTIME = "agentfense-bench"
GREP_PATTERN = "fn "


class Docker:
    def __init__(self, cfg, cleanup):
        self.cfg, self.cleanup = cfg, cleanup
        self.prefix = f"afbench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.n = 0
        self.ids = set()
        self.runtime = None
        self.cleanup.push("benchmark containers", self._remove_all)

    def name(self, tag):
        self.n += 1
        return f"{self.prefix}-{tag}-{self.n}"

    # -- setup ------------------------------------------------------------------------

    def check(self):
        run([DOCKER, "info"], timeout=60)
        self.runtime = self._runtime()
        if run([DOCKER, "image", "inspect", self.cfg.image], ok=(0, 1)).returncode != 0:
            self._build_image()

    def _runtimes(self):
        out = run([DOCKER, "info", "--format", "{{json .Runtimes}}"], capture=True, timeout=60).stdout
        return json.loads(out or "{}")

    def _runtime(self):
        want = os.path.realpath(self.cfg.binary)
        for name, r in self._runtimes().items():
            path = r.get("path", "")
            if not path.startswith("/"):
                path = shutil.which(path) or path
            if os.path.realpath(path) == want and not r.get("runtimeArgs"):
                log(f"docker runtime: {name} ({want})")
                return name
        log(f"registering docker runtime {BENCH_RUNTIME} -> {want}")
        backups = set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*"))
        run([self.cfg.binary, "configure", "docker", "--config", DAEMON_JSON, "--name", BENCH_RUNTIME,
             "--runtime-path", want, "--replace"], timeout=60)
        self.cleanup.push(f"docker runtime {BENCH_RUNTIME}", lambda: self._unregister(want, backups))
        self._reload()
        end = time.monotonic() + 30
        while BENCH_RUNTIME not in self._runtimes():
            if time.monotonic() > end:
                raise WorkloadError(f"dockerd did not load runtime {BENCH_RUNTIME}")
            time.sleep(0.3)
        return BENCH_RUNTIME

    def _unregister(self, want, backups_before):
        cfg = json.loads(DAEMON_JSON.read_text())
        r = cfg.get("runtimes", {}).get(BENCH_RUNTIME)
        if r is not None and os.path.realpath(r.get("path", "")) == want:
            del cfg["runtimes"][BENCH_RUNTIME]
            if not cfg["runtimes"]:
                del cfg["runtimes"]
            tmp = DAEMON_JSON.with_name(DAEMON_JSON.name + f".afbench-{os.getpid()}")
            tmp.write_text(json.dumps(cfg, indent=2) + "\n")
            os.chmod(tmp, DAEMON_JSON.stat().st_mode & 0o7777)
            os.rename(tmp, DAEMON_JSON)
            self._reload()
        for b in set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*")) - backups_before:
            b.unlink()

    @staticmethod
    def _reload():
        for f in ("/var/run/docker.pid", "/run/docker.pid"):
            if os.path.exists(f):
                os.kill(int(Path(f).read_text().strip()), signal.SIGHUP)
                return
        raise WorkloadError("dockerd's pid file is missing: cannot reload it")

    def _build_image(self):
        """The busybox test image of integration/conftest.py, from the host's busybox-static."""
        log(f"building image {self.cfg.image}")
        busybox = shutil.which("busybox") or "/bin/busybox"
        root = Path(tempfile.mkdtemp(prefix="afbench-rootfs-"))
        try:
            for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "root", "data"):
                (root / d).mkdir()
            os.chmod(root / "tmp", 0o1777)
            shutil.copy2(busybox, root / "bin" / "busybox")
            for a in run([busybox, "--list"], capture=True).stdout.split():
                if a != "busybox":
                    os.symlink("busybox", root / "bin" / a)
            (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
            (root / "etc" / "group").write_text("root:x:0:\n")
            tar = root.parent / (root.name + ".tar")
            run(["tar", "-C", root, "-cf", tar, "."])
            try:
                run([DOCKER, "import", "-c", "ENV PATH=/bin", "-c", 'CMD ["sh"]', tar, self.cfg.image],
                    timeout=300)
            finally:
                tar.unlink()
        finally:
            shutil.rmtree(root)

    # -- containers ---------------------------------------------------------------------

    def run_args(self, variant, workspace):
        """docker run arguments of a variant: runc, agentfense unfenced, agentfense fenced."""
        args = ["-v", f"{workspace}:/workspace"]
        if variant == "runc":
            return ["--runtime", "runc"] + args
        args = ["--runtime", self.runtime] + args
        if variant == "unfenced":
            return args
        if variant == "fenced":
            return args + ["-e", "AGENTFENSE_PRESET=agent-safe"]
        if variant == "fenced-ro":
            return args + ["-e", "AGENTFENSE_PRESET=read-only", "-e", "AGENTFENSE_DELTA=discard"]
        raise ValueError(variant)

    def run_rm(self, variant, workspace):
        """Seconds of one `docker run --rm IMAGE true`."""
        cidfile = Path(tempfile.mkdtemp(prefix="afbench-cid-")) / "cid"
        try:
            t = time.perf_counter()
            run([DOCKER, "run", "--rm", "--name", self.name("start"), "--cidfile", cidfile,
                 *self.run_args(variant, workspace), self.cfg.image, "true"], timeout=120)
            dt = time.perf_counter() - t
            return dt
        finally:
            if cidfile.exists():
                self.ids.add(cidfile.read_text().strip())
            shutil.rmtree(cidfile.parent, ignore_errors=True)

    def start(self, variant, workspace, cmd, tag="c"):
        name = self.name(tag)
        p = run([DOCKER, "run", "-d", "--name", name, *self.run_args(variant, workspace),
                 self.cfg.image, *cmd], capture=True, timeout=300)
        cid = p.stdout.strip().splitlines()[-1]
        self.ids.add(cid)
        return name, cid

    def rm(self, names):
        if names:
            run([DOCKER, "rm", "-f", *names], timeout=600, ok=(0, 1))

    def _remove_all(self):
        left = run([DOCKER, "ps", "-aq", "--filter", f"name={self.prefix}-"], capture=True,
                   ok=(0, 1), timeout=120).stdout.split()
        if left:
            log(f"removing {len(left)} leftover benchmark containers")
            run([DOCKER, "rm", "-f", *left], ok=(0, 1), timeout=600)
        self.remove_state(self.ids)

    @staticmethod
    def remove_state(ids):
        """The runtime keeps a fenced container's state (delta, audit trail) after delete;
        remove ours, never while anything is mounted in it."""
        mounts = Path("/proc/self/mountinfo").read_text()
        for cid in ids:
            d = STATE / cid
            if d.is_dir() and cid not in mounts:
                shutil.rmtree(d, ignore_errors=True)


def fence_daemons(ids):
    """{pid: container id} of fence daemons serving any of `ids`."""
    out = {}
    for pid in pids_matching(b"fence-daemon"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for cid in ids:
            if cid in cmd:
                out[pid] = cid
    return out


def fence_mounts(ids):
    return [l for l in Path("/proc/self/mountinfo").read_text().splitlines()
            if any(cid in l for cid in ids)]


def startup(d, workspace, runs, results, Result):
    """docker run --rm true, and docker exec latency, per variant; runs interleaved across
    the variants (order rotated at each run)."""
    variants = [("runc", "runc"), ("agentfense, unfenced", "unfenced"),
                ("agentfense, agent-safe", "fenced")]

    def rotated(k):
        return variants[k % len(variants):] + variants[:k % len(variants)]

    log("docker run --rm true: " + ", ".join(l for l, _ in variants))
    for k in ["warm"] + list(range(runs)):
        for label, v in (variants if k == "warm" else rotated(k)):
            r = results.setdefault(("docker-run", label), Result())
            if r.error:
                continue
            try:
                t = d.run_rm(v, workspace)
                if k != "warm":
                    r.values.append(t)
            except WorkloadError as e:
                r.error = str(e)
    log("docker exec true: " + ", ".join(l for l, _ in variants))
    names = {}
    try:
        for label, v in variants:
            r = results.setdefault(("docker-exec", label), Result())
            try:
                names[label], _ = d.start(v, workspace, ["sleep", "1000000"], tag="exec")
            except WorkloadError as e:
                r.error = str(e)
        for k in ["warm"] + list(range(runs)):
            for label, _ in (variants if k == "warm" else rotated(k)):
                r = results[("docker-exec", label)]
                if r.error:
                    continue
                try:
                    t = time.perf_counter()
                    run([DOCKER, "exec", names[label], "true"], timeout=60)
                    if k != "warm":
                        r.values.append(time.perf_counter() - t)
                except WorkloadError as e:
                    r.error = str(e)
    finally:
        try:
            d.rm(list(names.values()))
        except WorkloadError as e:
            for label in names:
                results[("docker-exec", label)].error = f"docker rm: {e}"


def expected_grep(workspace):
    """What `grep -rc PATTERN /workspace` prints, by file (computed on the host)."""
    out = {}
    for dp, _, fs in os.walk(workspace):
        for f in fs:
            p = Path(dp) / f
            n = sum(1 for line in p.read_bytes().split(b"\n") if GREP_PATTERN.encode() in line)
            out["/workspace/" + str(p.relative_to(workspace))] = n
    return out


def parse_grep(text):
    out = {}
    for line in text.splitlines():
        path, _, n = line.rpartition(":")
        out[path] = int(n)
    return out


def scale(d, workspace, n, parallel):
    """N fenced containers (read-only preset, audit all, delta discarded at delete) over one
    workspace, each running a grep as its main process and then staying up; once all are
    up, each answers a `docker exec grep` while all are running. Returns figures and a list
    of failures."""
    fig, failures = {}, []
    expect = expected_grep(workspace)
    script = (f"grep -rc '{GREP_PATTERN}' /workspace > /tmp/grep.out && touch /tmp/grep.done; "
              "exec sleep 1000000")
    names, ids = [], []
    mem0 = meminfo()
    t0 = time.monotonic()

    def start(_i):
        try:
            return d.start("fenced-ro", workspace, ["sh", "-c", script], tag="scale")
        except WorkloadError as e:
            return e

    try:
        with ThreadPoolExecutor(max_workers=parallel) as ex:
            for r in ex.map(start, range(n)):
                if isinstance(r, WorkloadError):
                    failures.append(f"start: {r}")
                else:
                    names.append(r[0])
                    ids.append(r[1])
        fig["start_all_s"] = time.monotonic() - t0
        fig["started"] = len(names)
        log(f"scale: {len(names)} of {n} started in {fig['start_all_s']:.1f}s")

        def answer(name):
            # The main process's own grep, then a live one through docker exec.
            try:
                end = time.monotonic() + 120
                while run([DOCKER, "exec", name, "test", "-e", "/tmp/grep.done"], ok=(0, 1),
                          timeout=60).returncode != 0:
                    if time.monotonic() > end:
                        return f"{name}: its grep did not finish"
                    time.sleep(0.5)
                first = run([DOCKER, "exec", name, "cat", "/tmp/grep.out"], capture=True).stdout
                live = run([DOCKER, "exec", name, "grep", "-rc", GREP_PATTERN, "/workspace"],
                           capture=True, ok=(0, 1), timeout=120).stdout
                for what, text in (("main-process grep", first), ("exec grep", live)):
                    if parse_grep(text) != expect:
                        return f"{name}: {what} answered wrongly ({len(parse_grep(text))} files)"
            except WorkloadError as e:
                return str(e)
            return None

        with ThreadPoolExecutor(max_workers=parallel) as ex:
            bad = [b for b in ex.map(answer, names) if b]
        fig["answered"] = len(names) - len(bad)
        fig["answer_all_s"] = time.monotonic() - t0
        failures += bad
        running = run([DOCKER, "ps", "-q", "--filter", f"name={d.prefix}-scale-"], capture=True).stdout.split()
        fig["alive"] = len(running)
        daemons = fence_daemons(ids)
        fig["daemons"] = len(daemons)
        fig["mounts"] = len(fence_mounts(ids))
        mems = [proc_mem(p) for p in daemons]
        rss = [m["VmRSS"] for m in mems if m["VmRSS"] is not None]
        pss = [m["Pss"] for m in mems if m["Pss"] is not None]
        fig["daemon_rss_mean_kib"] = sum(rss) / len(rss) if rss else None
        fig["daemon_rss_max_kib"] = max(rss) if rss else None
        fig["daemon_pss_total_kib"] = sum(pss) if pss else None
        mem1 = meminfo()
        fig["memavail_drop_kib"] = mem0["MemAvailable"] - mem1["MemAvailable"]
        fig["shmem_growth_kib"] = mem1["Shmem"] - mem0["Shmem"]
        if fig["alive"] != len(names):
            failures.append(f"only {fig['alive']} of {len(names)} containers running at once")
        if fig["daemons"] != len(names):
            failures.append(f"{fig['daemons']} fence daemons for {len(names)} containers")
        log(f"scale: {fig['answered']} answered their grep; {fig['alive']} alive")
    finally:
        t1 = time.monotonic()
        chunks = [names[i:i + 25] for i in range(0, len(names), 25)]
        with ThreadPoolExecutor(max_workers=parallel) as ex:
            errs = [e for e in ex.map(lambda c: _rm(d, c), chunks) if e]
        failures += errs
        fig["teardown_s"] = time.monotonic() - t1
        # Teardown is synchronous in the runtime's delete; allow a few seconds anyway.
        end = time.monotonic() + 10
        while (fence_mounts(ids) or fence_daemons(ids)) and time.monotonic() < end:
            time.sleep(0.2)
        left_m, left_d = fence_mounts(ids), fence_daemons(ids)
        fig["left_mounts"], fig["left_daemons"] = len(left_m), len(left_d)
        left_c = run([DOCKER, "ps", "-aq", "--filter", f"name={d.prefix}-scale-"], capture=True,
                     ok=(0, 1)).stdout.split()
        fig["left_containers"] = len(left_c)
        if left_m or left_d or left_c:
            failures.append(f"teardown left {len(left_c)} containers, {len(left_m)} mounts, "
                            f"{len(left_d)} fence daemons")
        d.remove_state(ids)
        fig["left_state"] = sum((STATE / cid).exists() for cid in ids)
        if fig["left_state"]:
            failures.append(f"{fig['left_state']} state directories could not be removed (mounted?)")
        fig["memavail_after_kib"] = mem0["MemAvailable"] - meminfo()["MemAvailable"]
    return fig, failures


def _rm(d, names):
    try:
        d.rm(names)
    except WorkloadError as e:
        return str(e)
    return None
