"""The runtime's own command line, driven directly as an engine would, next to runc.

Every step runs under runc and under agentfense-runc, each with its own --root, and the
observations (exit codes, state transitions, JSON shapes, error wording) must agree.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, RUNC, sh, unique

RUNTIMES = {"runc": RUNC, "agentfense": str(BIN)}


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory, agentfense_bin):
    root = tmp_path_factory.mktemp("rootfs")
    busybox = shutil.which("busybox") or "/bin/busybox"
    for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
        (root / d).mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for a in sh([busybox, "--list"], check=True).stdout.split():
        if a != "busybox":
            os.symlink("busybox", root / "bin" / a)
    return root


def bundle(tmp_path, rootfs, rt, args):
    b = tmp_path / f"bundle-{rt}"
    b.mkdir()
    p = sh([RUNTIMES[rt], "spec", "--bundle", b])
    assert p.returncode == 0, p.stderr
    cfg = json.loads((b / "config.json").read_text())
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def rtc(rt, root, *args, timeout=60):
    return sh([RUNTIMES[rt], "--root", root, *args], timeout=timeout)


def detached(rt, root, *args):
    """create / run --detach: the container keeps the stdio it is given, so give it none."""
    return subprocess.run([str(a) for a in (RUNTIMES[rt], "--root", root, *args)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=60).returncode


def dead(pid):
    """Gone, or a zombie waiting for whichever process adopted it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def both(fn):
    results = {rt: fn(rt) for rt in RUNTIMES}
    assert results["agentfense"] == results["runc"], results
    return results["runc"]


def test_spec_writes_a_usable_default(tmp_path):
    def scenario(rt):
        d = tmp_path / rt
        d.mkdir()
        first = rtc(rt, tmp_path / f"root-{rt}", "spec", "--bundle", d).returncode
        cfg = json.loads((d / "config.json").read_text())
        again = rtc(rt, tmp_path / f"root-{rt}", "spec", "--bundle", d)
        return first, cfg["root"]["path"], cfg["process"]["args"], again.returncode != 0

    assert both(scenario) == (0, "rootfs", ["sh"], True)


def test_run_foreground_exit_code_and_output(tmp_path, rootfs):
    def scenario(rt):
        b = bundle(tmp_path, rootfs, rt, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        p = rtc(rt, tmp_path / f"root-{rt}", "run", "--bundle", b, unique())
        return p.returncode, p.stdout, p.stderr

    assert both(scenario) == (3, "out\n", "err\n")


def test_run_killed_by_signal_is_128_plus_signal(tmp_path, rootfs):
    def scenario(rt):
        root = tmp_path / f"root-{rt}"
        b = bundle(tmp_path, rootfs, rt, ["sleep", "1000"])
        cid = unique()
        p = subprocess.Popen([RUNTIMES[rt], "--root", root, "run", "--bundle", b, cid],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        for _ in range(200):
            st = rtc(rt, root, "state", cid)
            if st.returncode == 0 and json.loads(st.stdout)["status"] == "running":
                break
            time.sleep(0.05)
        rtc(rt, root, "kill", cid, "KILL")
        return p.wait(timeout=60)

    assert both(scenario) == 137


def test_lifecycle(tmp_path, rootfs):
    def scenario(rt):
        root = tmp_path / f"root-{rt}"
        b = bundle(tmp_path, rootfs, rt, ["sleep", "1000"])
        cid = unique()
        seen = {}
        seen["create"] = detached(rt, root, "create", "--bundle", b, "--pid-file", b / "pid", cid)
        st = json.loads(rtc(rt, root, "state", cid).stdout)
        seen["created"] = (st["status"], st["id"] == cid, st["pid"] > 0,
                           int((b / "pid").read_text()) == st["pid"], st["bundle"] == str(b))
        seen["start"] = rtc(rt, root, "start", cid).returncode
        st = json.loads(rtc(rt, root, "state", cid).stdout)
        seen["running"] = st["status"]
        pid = st["pid"]
        lst = json.loads(rtc(rt, root, "list", "--format", "json").stdout)
        seen["list"] = [(c["id"] == cid, c["status"], c["pid"] == pid) for c in lst]
        seen["list-q"] = rtc(rt, root, "list", "-q").stdout.split() == [cid]
        seen["ps"] = json.loads(rtc(rt, root, "ps", "--format", "json", cid).stdout) == [pid]
        ex = rtc(rt, root, "exec", cid, "sh", "-c", "echo in; exit 5")
        seen["exec"] = (ex.returncode, ex.stdout)
        seen["pause"] = rtc(rt, root, "pause", cid).returncode
        seen["paused"] = json.loads(rtc(rt, root, "state", cid).stdout)["status"]
        seen["resume"] = rtc(rt, root, "resume", cid).returncode
        seen["resumed"] = json.loads(rtc(rt, root, "state", cid).stdout)["status"]
        seen["kill"] = rtc(rt, root, "kill", cid, "KILL").returncode
        for _ in range(100):
            if json.loads(rtc(rt, root, "state", cid).stdout)["status"] == "stopped":
                break
            time.sleep(0.05)
        seen["stopped"] = json.loads(rtc(rt, root, "state", cid).stdout)["status"]
        again = rtc(rt, root, "kill", cid, "KILL")
        seen["kill-stopped"] = (again.returncode, "container not running" in again.stderr)
        seen["delete"] = rtc(rt, root, "delete", cid).returncode
        gone = rtc(rt, root, "state", cid)
        seen["state-deleted"] = (gone.returncode, "does not exist" in gone.stderr)
        seen["delete-missing"] = rtc(rt, root, "delete", cid).returncode
        seen["delete-force-missing"] = rtc(rt, root, "delete", "--force", cid).returncode
        seen["process-gone"] = dead(pid)
        return seen

    assert both(scenario) == {
        "create": 0,
        "created": ("created", True, True, True, True),
        "start": 0,
        "running": "running",
        "list": [(True, "running", True)],
        "list-q": True,
        "ps": True,
        "exec": (5, "in\n"),
        "pause": 0,
        "paused": "paused",
        "resume": 0,
        "resumed": "running",
        "kill": 0,
        "stopped": "stopped",
        "kill-stopped": (1, True),
        "delete": 0,
        "state-deleted": (1, True),
        "delete-missing": 1,
        "delete-force-missing": 0,
        "process-gone": True,
    }


def test_json_log_reports_the_error(tmp_path):
    def scenario(rt):
        log = tmp_path / f"{rt}.log"
        p = sh([RUNTIMES[rt], "--root", tmp_path / f"root-{rt}", "--log", log, "--log-format", "json",
                "state", "no-such-container"])
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        errors = [line for line in lines if line["level"] == "error"]
        last = errors[-1]
        return (p.returncode, "does not exist" in last["msg"], "time" in last,
                "does not exist" in p.stderr)

    assert both(scenario) == (1, True, True, True)


def test_delete_force_of_running_container(tmp_path, rootfs):
    def scenario(rt):
        root = tmp_path / f"root-{rt}"
        b = bundle(tmp_path, rootfs, rt, ["sleep", "1000"])
        cid = unique()
        detached(rt, root, "run", "--detach", "--bundle", b, cid)
        pid = json.loads(rtc(rt, root, "state", cid).stdout)["pid"]
        plain = rtc(rt, root, "delete", cid).returncode
        forced = rtc(rt, root, "delete", "--force", cid).returncode
        for _ in range(100):
            if dead(pid):
                break
            time.sleep(0.05)
        return plain != 0, forced, dead(pid), rtc(rt, root, "list", "-q").stdout

    assert both(scenario) == (True, 0, True, "")


def test_features_document(tmp_path):
    def scenario(rt):
        doc = json.loads(sh([RUNTIMES[rt], "features"], check=True).stdout)
        return (doc["ociVersionMin"].startswith("1.0"), "mount" in doc["linux"]["namespaces"],
                doc["linux"]["cgroup"]["v1"], doc["linux"]["seccomp"]["enabled"],
                "nosuid" in doc["mountOptions"])

    assert both(scenario) == (True, True, True, True, True)
