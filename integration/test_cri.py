"""Kubernetes through containerd's CRI: the gRPC calls kubelet makes (RunPodSandbox,
CreateContainer, StartContainer, ExecSync, StopPodSandbox, RemovePodSandbox), against a
containerd of the test's own (its own root, state, socket and config; the containerd that
dockerd uses is never touched).

That containerd's configuration is config-examples/containerd-config-v2.toml as shipped, with
BinaryName pointed at the binary under test and the runtime's state (the shim's Root) kept in the
test's directory, plus what a node has and the example cannot know: the sandbox (pause) image,
here a local busybox image whose command sleeps; an empty CNI configuration (the pods use the
node's network, as kubelet asks for hostNetwork pods); and, on a host without CAP_SYS_RESOURCE,
restrict_oom_score_adj. The pod is config-examples/runtimeclass.yaml's: its runtimeClassName picks
the RuntimeClass, whose handler picks the containerd runtime; its annotations, container command
and volume mounts are what is sent, with the hostPath pointed at a sample repository.

The CRI client is the `container-runtime-interface-api` package's generated stubs over grpcio
(`integration/host.sh install` installs them).
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from conftest import BIN, CTR, REPO, sh, unique, wait_for

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
EXAMPLE_CONFIG = REPO / "config-examples" / "containerd-config-v2.toml"
EXAMPLE_POD = REPO / "config-examples" / "runtimeclass.yaml"
EXAMPLE_BINARY = "/usr/local/bin/agentfense-runc"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
# The namespace CRI works in; images must be imported there.
K8S_NS = "k8s.io"
IMAGE = "docker.io/agentfense-test/cri-busybox:latest"
STATE = Path("/var/lib/agentfense/containers")
# Each CRI call is answered in well under this; a hung containerd fails the test, not CI.
RPC_TIMEOUT = 60


def cri_api():
    try:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc
    except ImportError as e:
        pytest.fail(f"the CRI client is missing ({e}): run integration/host.sh install")
    return grpc, api_pb2, api_pb2_grpc


def load_yaml_docs(path):
    try:
        import yaml
    except ImportError as e:
        pytest.fail(f"PyYAML is missing ({e}): run integration/host.sh install")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---------------------------------------------------------------- the examples, as run


def example_handler():
    """The example's runtime handler: (name, its table)."""
    cfg = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert cfg.get("version") == 2, "containerd 1.x reads config version 2"
    runtimes = cfg["plugins"][CRI_PLUGIN]["containerd"]["runtimes"]
    fenced = {n: r for n, r in runtimes.items()
              if r.get("options", {}).get("BinaryName") == EXAMPLE_BINARY}
    assert len(fenced) == 1, f"{EXAMPLE_CONFIG}: expected one runtime with BinaryName {EXAMPLE_BINARY}"
    return next(iter(fenced.items()))


def example_pod():
    """The RuntimeClass and the Pod of runtimeclass.yaml; the pod's class must be that one."""
    docs = load_yaml_docs(EXAMPLE_POD)
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RuntimeClass"}
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert len(pods) == 1, f"{EXAMPLE_POD}: expected one Pod"
    pod = pods[0]
    cls = classes[pod["spec"]["runtimeClassName"]]
    return cls["handler"], pod


CAP_SYS_RESOURCE = 24


def has_cap(cap):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def containerd_config(tmp):
    """The example with BinaryName pointed at the binary under test (and the runtime's state
    kept under `tmp`), and the node's part (sandbox image, CNI directories) added in the CRI
    plugin's own table."""
    text = EXAMPLE_CONFIG.read_text()
    line = f'BinaryName = "{EXAMPLE_BINARY}"'
    assert text.count(line) == 1, f"{EXAMPLE_CONFIG}: expected one `{line}`"
    # The shim's runtime state (runc's --root) under the test's directory too, beside it.
    text = text.replace(line, f"BinaryName = {json.dumps(str(BIN))}\n"
                              f"    Root = {json.dumps(str(tmp / 'runtime'))}")
    # A host without CAP_SYS_RESOURCE (some VMs) cannot lower oom_score_adj, which CRI does for
    # sandboxes (-998): such a node keeps it at containerd's own, as rootless nodes do.
    restrict_oom = "true" if not has_cap(CAP_SYS_RESOURCE) else "false"
    (tmp / "cni" / "net.d").mkdir(parents=True)
    (tmp / "cni" / "bin").mkdir(parents=True)
    text += f"""
# Added by integration/test_cri.py: what a node sets and the example cannot know.
[plugins."{CRI_PLUGIN}"]
  sandbox_image = {json.dumps(IMAGE)}
  restrict_oom_score_adj = {restrict_oom}
  [plugins."{CRI_PLUGIN}".cni]
    conf_dir = {json.dumps(str(tmp / "cni" / "net.d"))}
    bin_dir = {json.dumps(str(tmp / "cni" / "bin"))}

# Added by integration/test_cri.py: nothing of this containerd outside the test's directory.
[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(str(tmp / "opt"))}
"""
    cfg = tomllib.loads(text)  # the whole file must still be one valid TOML document
    name, handler = example_handler()
    options = cfg["plugins"][CRI_PLUGIN]["containerd"]["runtimes"][name]["options"]
    assert options["BinaryName"] == str(BIN) and options["Root"] == str(tmp / "runtime")
    assert handler["runtime_type"] == "io.containerd.runc.v2"
    path = tmp / "config.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- a busybox image, no registry


def oci_image_tar(dest, ref):
    """An OCI image layout tarball (what `ctr images import` reads) of one layer: the host's
    static busybox with its applets, whose default command sleeps (a pause container)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if shutil.which("file") and "dynamically" in sh(["file", "-L", busybox]).stdout:
        pytest.fail(f"{busybox} is not static: install busybox-static")
    applets = sh([busybox, "--list"], check=True).stdout.split()

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add_dir(name, mode=0o755):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, mode
            t.addfile(ti)

        def add_file(name, data, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), mode
            t.addfile(ti, io.BytesIO(data))

        for d in ("bin", "etc", "proc", "sys", "dev", "root"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for a in applets:
            if a != "busybox":
                ti = tarfile.TarInfo(f"bin/{a}")
                ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(ti)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    layer = layer_buf.getvalue()

    blobs = {}

    def blob(data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sleep", "86400"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": ref,
                                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}

    with tarfile.open(dest, "w") as t:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            t.addfile(ti, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return dest


# ---------------------------------------------------------------- our containerd


def mounts_under(prefix):
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mnt = line.split()[1].replace("\\040", " ")
        if mnt == str(prefix) or mnt.startswith(str(prefix) + "/"):
            out.append(mnt)
    return out


def pids_with(fragment):
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            out.append((int(d.name), cmd))
    return out


class Containerd:
    """A containerd with CRI of the test's own, and a CRI client for it."""

    def __init__(self, tmp):
        self.grpc, self.api, stubs = cri_api()
        self.tmp = tmp
        self.root, self.state = tmp / "root", tmp / "state"
        self.sock = tmp / "containerd.sock"
        self.config = containerd_config(tmp)
        self.log = open(tmp / "containerd.log", "w+")
        self.proc = subprocess.Popen(
            [CONTAINERD, "--config", self.config, "--root", self.root, "--state", self.state,
             "--address", self.sock, "--log-level", "info"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.channel = self.grpc.insecure_channel(f"unix://{self.sock}")
        self.rt = stubs.RuntimeServiceStub(self.channel)
        self.images = stubs.ImageServiceStub(self.channel)
        try:
            wait_for(lambda: self.proc.poll() is not None or self._answers(),
                     "containerd's CRI to answer", timeout=60)
            if self.proc.poll() is not None:
                pytest.fail(f"containerd exited {self.proc.returncode}:\n{self.logs()}")
        except BaseException:
            print(f"containerd's log:\n{self.logs()}")
            self.stop()
            raise

    def _answers(self):
        if not self.sock.exists():
            return False
        try:
            self.rt.Version(self.api.VersionRequest(), timeout=5)
            return True
        except self.grpc.RpcError as e:
            if e.code() == self.grpc.StatusCode.UNIMPLEMENTED:
                # containerd serves once every plugin is loaded: CRI's failed to.
                why = [l for l in self.logs(tail=10**6).splitlines() if f"plugin {CRI_PLUGIN}" in l]
                pytest.fail(f"containerd's CRI plugin did not load: {why}")
            return False

    def logs(self, tail=60):
        self.log.flush()
        return "\n".join((self.tmp / "containerd.log").read_text().splitlines()[-tail:])

    def call(self, method, request, service=None):
        try:
            return getattr(service or self.rt, method)(request, timeout=RPC_TIMEOUT)
        except self.grpc.RpcError as e:
            raise AssertionError(f"CRI {method} failed: {e.code()}: {e.details()}\n"
                                 f"containerd's log:\n{self.logs()}") from None

    def exec_sync(self, cid, cmd, timeout=30):
        r = self.call("ExecSync", self.api.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout))
        return r.exit_code, r.stdout.decode(), r.stderr.decode()

    def import_image(self, ref):
        tar = oci_image_tar(self.tmp / "image.tar", ref)
        sh([CTR, "-a", self.sock, "-n", K8S_NS, "images", "import", tar], check=True, timeout=120)
        tar.unlink()
        st = self.call("ImageStatus", self.api.ImageStatusRequest(image=self.api.ImageSpec(image=ref)),
                       self.images)
        assert st.image.id, f"CRI does not see the imported image {ref}"

    def remove_all_pods(self):
        for p in self.call("ListPodSandbox", self.api.ListPodSandboxRequest()).items:
            self.call("StopPodSandbox", self.api.StopPodSandboxRequest(pod_sandbox_id=p.id))
            self.call("RemovePodSandbox", self.api.RemovePodSandboxRequest(pod_sandbox_id=p.id))

    def stop(self):
        """Stops containerd and its shims, unmounts what it left, removes its directories."""
        try:
            self.channel.close()
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()
        # Shims outlive containerd only while their containers run; all pods were removed.
        shims = pids_with(f" -address {self.sock} ")
        assert not shims, f"containerd's shims still run: {shims}"
        left = mounts_under(self.tmp)
        for m in reversed(left):
            subprocess.run(["umount", m], capture_output=True)
        still = mounts_under(self.tmp)
        assert not still, f"cannot unmount {still}: {self.tmp} not removed"
        shutil.rmtree(self.tmp)
        assert not left, f"containerd left mounts under its directories: {left}"


@pytest.fixture(scope="module")
def containerd(agentfense_bin):
    if not os.access(CONTAINERD, os.X_OK):
        pytest.fail(f"containerd is missing ({CONTAINERD}): run integration/host.sh install")
    tmp = Path(tempfile.mkdtemp(prefix="af-cri-"))
    c = Containerd(tmp)
    try:
        c.import_image(IMAGE)
        yield c
    finally:
        try:
            c.remove_all_pods()
        finally:
            c.stop()
        assert not tmp.exists()


# ---------------------------------------------------------------- a pod, as kubelet makes it


@pytest.fixture(scope="module")
def sample_repo():
    r = Path(tempfile.mkdtemp(prefix="af-cri-repo-"))
    files = {
        ".env": "API_KEY=sk-live-123\n",
        "src/main.py": "print('hello')\n",
        "output/.keep": "",
    }
    for name, text in files.items():
        p = r / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    os.chmod(r, 0o755)
    yield r
    shutil.rmtree(r)


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


class Pod:
    """The example pod, run through CRI: RunPodSandbox (host network: no CNI), then its one
    container, CreateContainer + StartContainer, with the command replaced by one that waits
    for SIGTERM (the example's own command is run with ExecSync) and hostPath volumes pointed
    at `host_dir`. `remove` does what kubelet does when the pod is deleted."""

    def __init__(self, cd, host_dir, annotations=None):
        self.cd, api = cd, cd.api
        self.handler, spec = example_pod()
        self.example = spec
        self.annotations = dict(spec["metadata"].get("annotations") or {})
        if annotations is not None:
            self.annotations = annotations
        name = unique("pod")
        # kubelet's for a hostNetwork pod: the node's network, the pod's IPC, a PID namespace
        # per container (no shareProcessNamespace).
        namespaces = api.NamespaceOption(network=api.NODE, ipc=api.POD, pid=api.CONTAINER)
        logs = cd.tmp / "logs" / name
        logs.mkdir(parents=True)
        self.sandbox_config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=unique("uid"), namespace="default"),
            # kubelet sets no hostname for a host-network pod (the node's is shared).
            log_directory=str(logs),
            annotations=self.annotations,
            linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
                namespace_options=namespaces)),
        )
        self.sandbox_id = cd.call("RunPodSandbox", api.RunPodSandboxRequest(
            config=self.sandbox_config, runtime_handler=self.handler)).pod_sandbox_id
        self.removed = False
        (c,) = spec["spec"]["containers"]
        self.example_command = c["command"]
        volumes = {v["name"]: v for v in spec["spec"]["volumes"]}
        mounts = []
        for vm in c.get("volumeMounts", []):
            assert "hostPath" in volumes[vm["name"]], "the example's volumes are hostPath volumes"
            mounts.append(api.Mount(container_path=vm["mountPath"], host_path=str(host_dir),
                                    readonly=bool(vm.get("readOnly"))))
        assert mounts, f"{EXAMPLE_POD}: the pod mounts no workspace"
        self.workspace = mounts[0].container_path
        self.container_id = cd.call("CreateContainer", api.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id,
            config=api.ContainerConfig(
                metadata=api.ContainerMetadata(name=c["name"]),
                image=api.ImageSpec(image=IMAGE),
                # Runs until kubelet's SIGTERM (StopContainer), then exits 0.
                command=["sh", "-c", "trap 'kill $!; exit 0' TERM; sleep 86400 & wait"],
                mounts=mounts,
                log_path=f"{c['name']}.log",
                linux=api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
                    namespace_options=namespaces)),
            ),
            sandbox_config=self.sandbox_config,
        )).container_id
        cd.call("StartContainer", api.StartContainerRequest(container_id=self.container_id))

    def exec(self, *cmd):
        return self.cd.exec_sync(self.container_id, list(cmd))

    def stop_container(self, grace=10):
        api = self.cd.api
        self.cd.call("StopContainer", api.StopContainerRequest(container_id=self.container_id,
                                                                timeout=grace))

    def container_status(self):
        api = self.cd.api
        return self.cd.call("ContainerStatus", api.ContainerStatusRequest(
            container_id=self.container_id)).status

    def remove(self):
        if not self.removed:
            api = self.cd.api
            self.stop_container()
            self.cd.call("RemoveContainer", api.RemoveContainerRequest(container_id=self.container_id))
            self.cd.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=self.sandbox_id))
            self.cd.call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=self.sandbox_id))
            self.removed = True

    def forget_state(self):
        """The app container's kept delta and audit trail (delta=keep) are removed at the end."""
        shutil.rmtree(STATE / self.container_id, ignore_errors=True)


@pytest.fixture(scope="module")
def pod(containerd, sample_repo):
    before = snapshot(sample_repo)
    p = Pod(containerd, sample_repo)
    p.host_before = before
    yield p
    try:
        p.remove()
    finally:
        p.forget_state()


def fence_mounts(cid):
    return [l for l in Path("/proc/mounts").read_text().splitlines() if f"agentfense:{cid} " in l]


def fence_daemons(cid):
    return [(pid, cmd) for pid, cmd in pids_with("fence-daemon") if f"/{cid}/" in cmd]


# ---------------------------------------------------------------- tests


def test_the_example_runtime_class_names_the_example_handler():
    name, handler = example_handler()
    pod_handler, pod = example_pod()
    assert pod_handler == name, f"{EXAMPLE_POD} uses handler {pod_handler}, {EXAMPLE_CONFIG} defines {name}"
    assert handler["runtime_type"] == "io.containerd.runc.v2"
    assert "agentfense.io/*" in handler.get("pod_annotations", [])
    assert any(k.startswith("agentfense.io/") for k in pod["metadata"].get("annotations", {}))


def test_listing_hides_the_env_file(pod):
    code, out, err = pod.exec("ls", "-a", pod.workspace)
    assert code == 0, err
    names = out.split()
    assert ".env" not in names and "src" in names and "output" in names, names
    # The example pod's own command (`ls -la /workspace`) sees the same.
    code, out, err = pod.exec(*pod.example_command)
    assert code == 0 and "src" in out and ".env" not in out, (out, err)


def test_hidden_file_does_not_exist(pod):
    code, out, err = pod.exec("cat", f"{pod.workspace}/.env")
    assert code != 0
    assert "No such file or directory" in err, err
    assert "sk-live" not in out


def test_sources_are_readable_not_writable(pod):
    assert pod.exec("cat", f"{pod.workspace}/src/main.py") == (0, "print('hello')\n", "")
    code, _, err = pod.exec("sh", "-c", f"echo hacked >> {pod.workspace}/src/main.py")
    assert code != 0
    assert "Permission denied" in err, err


def test_output_is_writable_and_the_host_copy_unchanged(pod, sample_repo):
    code, out, err = pod.exec("sh", "-c", f"echo report > {pod.workspace}/output/report.txt && "
                                          f"cat {pod.workspace}/output/report.txt")
    assert (code, out) == (0, "report\n"), err
    assert snapshot(sample_repo) == pod.host_before


def bundle_annotations(cd, cid):
    """The annotations of the OCI spec containerd handed the runtime for `cid`."""
    bundle = cd.state / "io.containerd.runtime.v2.task" / K8S_NS / cid
    return json.loads((bundle / "config.json").read_text()).get("annotations", {})


def test_the_app_container_is_fenced_and_its_sandbox_is_not(pod):
    cid, sid = pod.container_id, pod.sandbox_id
    # containerd handed both containers the pod's agentfense.io/ annotations (pod_annotations),
    # and marked which one is the sandbox.
    for c, kind in ((sid, "sandbox"), (cid, "container")):
        ann = bundle_annotations(pod.cd, c)
        assert ann.get("io.kubernetes.cri.container-type") == kind, ann
        assert {k: v for k, v in ann.items() if k.startswith("agentfense.io/")} == pod.annotations, ann
    assert (STATE / cid).is_dir(), f"no fence state for the app container {cid}"
    assert len(fence_mounts(cid)) == 1, fence_mounts(cid)
    assert fence_daemons(cid), f"no fence daemon for {cid}"
    # The sandbox (pause) container got the pod's annotations too, and is never fenced.
    assert not (STATE / sid).exists(), f"the sandbox container {sid} has fence state"
    assert not fence_mounts(sid) and not fence_daemons(sid)
    listed = pod.cd.call("ListContainers", pod.cd.api.ListContainersRequest(
        filter=pod.cd.api.ContainerFilter(pod_sandbox_id=sid))).containers
    assert [c.id for c in listed] == [cid]


def test_stop_and_remove_leave_no_fence(pod):
    cid, sid = pod.container_id, pod.sandbox_id
    api = pod.cd.api
    assert pod.container_status().state == api.CONTAINER_RUNNING
    assert pod.exec("sh", "-c", f"echo done > {pod.workspace}/output/done.txt")[0] == 0
    # kubelet deleting the pod: StopContainer (SIGTERM, then SIGKILL after the grace period),
    # RemoveContainer, StopPodSandbox, RemovePodSandbox. The fence goes with the container's
    # task, which containerd deletes as soon as it exits.
    start = time.monotonic()
    pod.stop_container(grace=30)
    assert time.monotonic() - start < 10, "the container did not stop on SIGTERM"
    st = pod.container_status()
    assert (st.state, st.exit_code) == (api.CONTAINER_EXITED, 0), st
    assert not fence_mounts(cid) and not fence_daemons(cid)
    pod.remove()
    assert not fence_mounts(cid), fence_mounts(cid)
    assert not fence_daemons(cid), fence_daemons(cid)
    assert not [l for l in Path("/proc/mounts").read_text().splitlines()
                if "agentfense" in l and (cid in l or sid in l)]
    # What the container wrote is in its kept delta (agentfense.io/delta defaults to keep).
    diff = sh([BIN, "diff", cid], check=True).stdout.split("\n")
    assert f"A {pod.workspace}/output/done.txt" in diff, diff


@pytest.fixture
def pods(containerd, sample_repo):
    """Further pods of a test, over the sample repository; removed (and their state) after it."""
    made = []

    def make(annotations):
        p = Pod(containerd, sample_repo, annotations=annotations)
        made.append(p)
        return p

    yield make
    for p in made:
        try:
            p.remove()
        finally:
            p.forget_state()


def test_an_inline_policy_annotation_reaches_the_runtime(pods, sample_repo):
    """agentfense.io/policy's JSON value travels through kubelet's pod annotations unchanged."""
    before = snapshot(sample_repo)
    policy = {"preset": "read-only", "rules": [{"pattern": "/src/**", "permission": "none"}]}
    pod = pods({"agentfense.io/policy": json.dumps(policy), "agentfense.io/delta": "discard"})
    assert pod.exec("cat", f"{pod.workspace}/.env") == (0, "API_KEY=sk-live-123\n", "")
    code, out, err = pod.exec("ls", f"{pod.workspace}/src")
    assert code != 0 and "No such file or directory" in err, (code, out, err)
    code, _, err = pod.exec("sh", "-c", f"echo x > {pod.workspace}/output/x.txt")
    assert code != 0 and "Permission denied" in err, err
    cid = pod.container_id
    assert fence_mounts(cid) and not (STATE / pod.sandbox_id).exists()
    pod.remove()
    assert not fence_mounts(cid) and not fence_daemons(cid)
    assert snapshot(sample_repo) == before


def test_a_pod_without_annotations_runs_unfenced(pods, sample_repo):
    pod = pods({})
    assert pod.exec("cat", f"{pod.workspace}/.env") == (0, "API_KEY=sk-live-123\n", "")
    for cid in (pod.container_id, pod.sandbox_id):
        assert not (STATE / cid).exists() and not fence_mounts(cid) and not fence_daemons(cid)
    # Unfenced, the workspace is the host's directory itself.
    assert pod.exec("sh", "-c", f"echo hi > {pod.workspace}/output/unfenced.txt")[0] == 0
    assert (sample_repo / "output" / "unfenced.txt").read_text() == "hi\n"
    (sample_repo / "output" / "unfenced.txt").unlink()
