"""End-to-end harness: real Docker, containerd (ctr) and podman, driving runc and agentfense-runc.

Nothing here is skipped silently: an engine that is missing or does not answer fails the run.
The harness registers the freshly built binary as Docker runtime `agentfense` (merging into
/etc/docker/daemon.json and restoring it afterwards), builds a busybox test image locally (no
registry is reachable) and imports it into containerd and podman.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AGENTFENSE_BIN", REPO / "target" / "release" / "agentfense-runc")).resolve()
RUNC = shutil.which("runc") or "/usr/sbin/runc"
# Debian's docker.io client matches its daemon; a newer client elsewhere on PATH may not.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
PODMAN = shutil.which("podman") or "/usr/bin/podman"
IMAGE = "agentfense-test/busybox:latest"
CTR_IMAGE = "docker.io/" + IMAGE
CTR_NS = "agentfense-test"
DAEMON_JSON = Path("/etc/docker/daemon.json")
RUNTIMES = ("runc", "agentfense")
# podman on this VM lacks CAP_SYS_RESOURCE: it must not try to raise rlimits.
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def sh(args, check=False, timeout=120, input=None, env=None):
    """Runs a command; returns CompletedProcess with text stdout/stderr."""
    p = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def unique(prefix="af"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def ctr_address():
    for a in ("/run/containerd/containerd.sock", "/run/docker/containerd/containerd.sock"):
        if os.path.exists(a):
            return a
    pytest.fail("no containerd socket: start dockerd or containerd (integration/host.sh start)")


@pytest.fixture(scope="session")
def agentfense_bin():
    if not BIN.is_file():
        pytest.fail(f"{BIN} is missing: build it first (make build)")
    return BIN


@pytest.fixture(scope="session")
def docker_engine(agentfense_bin):
    """Docker with runtime `agentfense` registered (and `agentfense-cfg`, which passes
    runtimeArgs, as administrators configure defaults), both by `agentfense-runc configure
    docker`. daemon.json is restored afterwards, and the backups configure made removed."""
    if sh([DOCKER, "info"], timeout=30).returncode != 0:
        pytest.fail("Docker does not answer: dockerd must be running (integration/host.sh start)")
    original = DAEMON_JSON.read_text() if DAEMON_JSON.exists() else None
    backups_before = set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*"))
    admin_cfg = Path(tempfile.mkdtemp(prefix="af-admin-")) / "config.json"
    admin_cfg.write_text("{}\n")
    for name, args in (("agentfense", []),
                       ("agentfense-cfg", ["--agentfense-config", str(admin_cfg)])):
        configure_docker(name, agentfense_bin, args)
    reload_dockerd()
    wait_for(lambda: "agentfense-cfg" in sh([DOCKER, "info", "--format", "{{json .Runtimes}}"]).stdout,
             "dockerd to load the agentfense runtimes")
    yield DOCKER
    if original is None:
        DAEMON_JSON.unlink()
    else:
        DAEMON_JSON.write_text(original)
    for b in set(DAEMON_JSON.parent.glob(DAEMON_JSON.name + ".agentfense-backup.*")) - backups_before:
        b.unlink()
    reload_dockerd()


def configure_docker(name, path, runtime_args=()):
    """Registers `path` as Docker runtime `name` in daemon.json, through `agentfense-runc
    configure docker` (dockerd is not reloaded here)."""
    sh([BIN, "configure", "docker", "--config", DAEMON_JSON, "--name", name, "--runtime-path", path,
        *[f"--runtime-arg={a}" for a in runtime_args]], check=True)


def reload_dockerd():
    pid = None
    for f in ("/var/run/docker.pid", "/run/docker.pid"):
        if os.path.exists(f):
            pid = int(Path(f).read_text().strip())
            break
    if pid is None:
        pytest.fail("dockerd's pid file is missing")
    os.kill(pid, signal.SIGHUP)


def wait_for(pred, what, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def image(docker_engine):
    """The busybox test image, in Docker, containerd and podman."""
    if sh([DOCKER, "image", "inspect", IMAGE]).returncode != 0:
        build_image()
    tar = Path(tempfile.mkdtemp(prefix="af-img-")) / "busybox.tar"
    sh([DOCKER, "save", "-o", tar, IMAGE], check=True)
    sh([CTR, "-a", ctr_address(), "-n", CTR_NS, "images", "import", tar], check=True, timeout=300)
    sh([PODMAN, "load", "-i", tar], check=True, timeout=300)
    shutil.rmtree(tar.parent)
    return IMAGE


def build_image():
    busybox = shutil.which("busybox") or "/bin/busybox"
    out = sh(["file", "-L", busybox]).stdout if shutil.which("file") else "static"
    if "dynamically" in out:
        pytest.fail(f"{busybox} is not static: install busybox-static")
    root = Path(tempfile.mkdtemp(prefix="af-rootfs-"))
    try:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "root", "data"):
            (root / d).mkdir()
        os.chmod(root / "tmp", 0o1777)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = sh([busybox, "--list"], check=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", root / "bin" / a)
        (root / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
        )
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        # Image content for fencing a workspace that is not a bind mount.
        (root / "srv" / "app").mkdir(parents=True)
        (root / "srv" / "app" / "public.txt").write_text("public\n")
        (root / "srv" / "app" / "secret.txt").write_text("secret\n")
        tar = root.parent / (root.name + ".tar")
        sh(["tar", "-C", root, "-cf", tar, "."], check=True)
        sh([DOCKER, "import", "-c", "ENV PATH=/bin", "-c", 'CMD ["sh"]', tar, IMAGE], check=True)
        tar.unlink()
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="session")
def ctr_engine(image):
    if sh([CTR, "-a", ctr_address(), "version"]).returncode != 0:
        pytest.fail("containerd does not answer")
    return ctr_address()


@pytest.fixture(scope="session")
def podman_engine(image):
    if sh([PODMAN, "version"]).returncode != 0:
        pytest.fail("podman does not work")
    return PODMAN


def runtime_path(rt):
    return RUNC if rt == "runc" else str(BIN)


@pytest.fixture
def cleanup_docker():
    names = []
    yield names
    for n in names:
        sh([DOCKER, "rm", "-f", n])


def export_rootfs(dest):
    """The busybox test image's file system, unpacked at dest (for driving the runtime
    directly, without an engine)."""
    dest.mkdir(parents=True, exist_ok=True)
    cid = sh([DOCKER, "create", IMAGE, "true"], check=True).stdout.strip()
    try:
        sh(["sh", "-c", f"{DOCKER} export {cid} | tar -C {dest} -x"], check=True)
    finally:
        sh([DOCKER, "rm", cid])
    return dest


def make_bundle(tmp_path, args, annotations, workspace=None, rootfs=None):
    """An OCI bundle over the test image's rootfs (read-only) running `args`, with the given
    annotations and, when `workspace` is a host directory, a bind mount of it at /workspace."""
    rootfs = rootfs or export_rootfs(tmp_path / "rootfs")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    sh([BIN, "spec", "--bundle", bundle], check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    if workspace is not None:
        cfg["mounts"].append({"destination": "/workspace", "type": "bind", "source": str(workspace),
                              "options": ["rbind", "rw"]})
    cfg["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


class DirectFence:
    """A fence mounted by the daemon itself, no engine or container: over `base` (None: the
    workspace `upper` is changed in place, delta=off), delta in `upper`, mounted at `mnt`.
    `umask` and `nofile` set the daemon's umask and descriptor limit at start (`nofile`: N, or
    "SOFT:HARD")."""

    def __init__(self, base, upper, mnt, policy, cid="direct", umask=None, nofile=None):
        self.mnt = Path(mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.upper = Path(upper)
        self.upper.mkdir(parents=True, exist_ok=True)
        cfg = {"container_id": cid, "base": str(base) if base is not None else None,
               "upper": str(upper), "mountpoint": str(self.mnt), "read_only": False,
               "policy": policy, "audit_level": "off", "audit_path": None}
        self.cfg = Path(str(self.mnt) + ".json")
        self.cfg.write_text(json.dumps(cfg))
        self.err = open(str(self.mnt) + ".stderr", "w+")
        if nofile and ":" not in str(nofile):
            nofile = f"{nofile}:{nofile}"
        limit = ["prlimit", f"--nofile={nofile}"] if nofile else []
        self.proc = subprocess.Popen(
            [*limit, str(BIN), "fence-daemon", str(self.cfg)], stdout=subprocess.PIPE,
            stderr=self.err, text=True,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            self.err.seek(0)
            pytest.fail(f"fence daemon did not mount {self.mnt}: {line!r} {self.err.read()}")

    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", self.mnt], capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        self.err.close()


# ------------------------------------------------------------------ figures at the end of a run

# Lines the security and reliability suites report (attack attempts, pjdfstest counts, soak
# operations), printed together at the end of the run with the fault-injection count.
FIGURES = []
FAULTS = {"passed": 0, "failed": 0}


def figure(line):
    """Records a line for the end-of-run summary (and prints it where it happened, too)."""
    FIGURES.append(line)
    print(line)


def pytest_runtest_logreport(report):
    if report.when == "call" and "test_faults.py" in report.nodeid:
        FAULTS["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter):
    if not FIGURES and not any(FAULTS.values()):
        return
    terminalreporter.write_sep("=", "agentfense security and reliability figures")
    if any(FAULTS.values()):
        terminalreporter.write_line(
            f"fault injection: {FAULTS['passed']} scenarios passed, {FAULTS['failed']} failed "
            f"(integration/test_faults.py)")
    for line in FIGURES:
        terminalreporter.write_line(line)
