"""The same scenarios under runc and under agentfense-runc, through Docker, containerd (ctr)
and podman: unfenced containers must behave exactly as under runc.

Each scenario returns what a user observes; the test asserts that runc and agentfense-runc
observe the same thing, and that it is what runc is known to do (so a scenario that broke
under both would not pass either).
"""

import os
import time
from pathlib import Path

import pytest

from conftest import (
    CTR, CTR_IMAGE, CTR_NS, DOCKER, IMAGE, PODMAN, PODMAN_ULIMITS, RUNTIMES, runtime_path, sh, unique,
    wait_for,
)


def both(scenario):
    """Runs scenario(runtime) under runc and agentfense; asserts equal results; returns one."""
    results = {rt: scenario(rt) for rt in RUNTIMES}
    assert results["agentfense"] == results["runc"], results
    return results["runc"]


def drun(rt, *args, timeout=120):
    return sh([DOCKER, "run", "--runtime", rt, *args], timeout=timeout)


def obs(p):
    return (p.returncode, p.stdout, p.stderr)


# ---------------------------------------------------------------- Docker


def test_docker_stdout_stderr_exit_code(docker_engine, image):
    r = both(lambda rt: obs(drun(rt, "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")))
    assert r == (3, "out\n", "err\n")


def test_docker_exit_zero(docker_engine, image):
    assert both(lambda rt: obs(drun(rt, "--rm", IMAGE, "true"))) == (0, "", "")


def test_docker_env_and_cwd(docker_engine, image):
    r = both(lambda rt: obs(drun(rt, "--rm", "-e", "FOO=bar baz", "-w", "/tmp", IMAGE,
                                 "sh", "-c", 'echo "$FOO"; pwd; echo $PATH')))
    assert r == (0, "bar baz\n/tmp\n/bin\n", "")


def test_docker_user_and_hostname(docker_engine, image):
    r = both(lambda rt: obs(drun(rt, "--rm", "-u", "65534:65534", "-h", "fenced", IMAGE,
                                 "sh", "-c", "id -u; id -g; hostname")))
    assert r == (0, "65534\n65534\nfenced\n", "")


def test_docker_stdin_pipe(docker_engine, image):
    r = both(lambda rt: obs(sh([DOCKER, "run", "--runtime", rt, "--rm", "-i", IMAGE, "wc", "-l"],
                               input="a\nb\nc\n")))
    assert r[0] == 0 and r[1].strip() == "3"


def test_docker_tty_run(docker_engine, image):
    r = both(lambda rt: obs(drun(rt, "--rm", "-t", IMAGE, "sh", "-c", "tty >/dev/null && echo tty")))
    assert r[0] == 0 and r[1].strip() == "tty" and r[2] == ""


def test_docker_failing_command_reports_real_error(docker_engine, image):
    results = {}
    for rt in RUNTIMES:
        p = drun(rt, "--rm", IMAGE, "/nonexistent")
        results[rt] = p
        # The real reason reaches the user: which file, and that it does not exist.
        assert "/nonexistent" in p.stderr, (rt, p.stderr)
        assert "no such file or directory" in p.stderr.lower(), (rt, p.stderr)
    # Docker's CLI maps "no such file or directory" to 127 for both.
    assert results["runc"].returncode == results["agentfense"].returncode == 127


def test_docker_exec_with_and_without_tty(docker_engine, image, cleanup_docker):
    def scenario(rt):
        name = unique()
        cleanup_docker.append(name)
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", name, IMAGE, "sleep", "1000"], check=True)
        plain = obs(sh([DOCKER, "exec", name, "sh", "-c", "echo hi; echo e >&2; exit 4"]))
        tty = obs(sh([DOCKER, "exec", "-t", name, "sh", "-c", "tty >/dev/null && echo tty"]))
        env = obs(sh([DOCKER, "exec", "-e", "X=1", "-w", "/etc", name, "sh", "-c", "echo $X; pwd"]))
        user = obs(sh([DOCKER, "exec", "-u", "65534", name, "id", "-u"]))
        sh([DOCKER, "rm", "-f", name], check=True)
        return plain, tty, env, user

    plain, tty, env, user = both(scenario)
    assert plain == (4, "hi\n", "e\n")
    assert tty[0] == 0 and tty[1].strip() == "tty"
    assert env == (0, "1\n/etc\n", "")
    assert user == (0, "65534\n", "")


def test_docker_stop_honours_sigterm_and_kill_is_137(docker_engine, image, cleanup_docker):
    def scenario(rt):
        a, b = unique(), unique()
        cleanup_docker.extend([a, b])
        # A shell as pid 1 ignores SIGTERM unless it traps it.
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", a, IMAGE, "sh", "-c",
            "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"], check=True)
        wait_for(lambda: "ready" in sh([DOCKER, "logs", a]).stdout, "container to start")
        t0 = time.time()
        sh([DOCKER, "stop", "-t", "20", a], check=True)
        stopped_quickly = time.time() - t0 < 15  # SIGTERM honoured, no SIGKILL after the timeout
        stop_code = sh([DOCKER, "inspect", "-f", "{{.State.ExitCode}}", a]).stdout.strip()
        logs = sh([DOCKER, "logs", a]).stdout
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", b, IMAGE, "sleep", "1000"], check=True)
        sh([DOCKER, "kill", b], check=True)
        kill_code = sh([DOCKER, "wait", b]).stdout.strip()
        return stopped_quickly, stop_code, logs, kill_code

    assert both(scenario) == (True, "0", "ready\ngot-term\n", "137")


def test_docker_pause_unpause(docker_engine, image, cleanup_docker):
    def scenario(rt):
        name = unique()
        cleanup_docker.append(name)
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", name, IMAGE, "sleep", "1000"], check=True)
        sh([DOCKER, "pause", name], check=True)
        paused = sh([DOCKER, "inspect", "-f", "{{.State.Status}}", name]).stdout.strip()
        sh([DOCKER, "unpause", name], check=True)
        running = sh([DOCKER, "inspect", "-f", "{{.State.Status}}", name]).stdout.strip()
        after = obs(sh([DOCKER, "exec", name, "echo", "alive"]))
        return paused, running, after

    assert both(scenario) == ("paused", "running", (0, "alive\n", ""))


def test_docker_top(docker_engine, image, cleanup_docker):
    def scenario(rt):
        name = unique()
        cleanup_docker.append(name)
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", name, IMAGE, "sleep", "1234"], check=True)
        p = sh([DOCKER, "top", name])
        return p.returncode, "sleep 1234" in p.stdout, "PID" in p.stdout.splitlines()[0]

    assert both(scenario) == (0, True, True)


def test_docker_update_memory(docker_engine, image, cleanup_docker):
    def scenario(rt):
        name = unique()
        cleanup_docker.append(name)
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", name, IMAGE, "sleep", "1000"], check=True)
        up = sh([DOCKER, "update", "--memory", "64m", "--memory-swap", "128m", name])
        limit = sh([DOCKER, "exec", name, "sh", "-c",
                    "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null"
                    " || cat /sys/fs/cgroup/memory.max"]).stdout.strip()
        return up.returncode, limit

    assert both(scenario) == (0, str(64 * 1024 * 1024))


def test_docker_restart(docker_engine, image, cleanup_docker):
    def scenario(rt):
        name = unique()
        cleanup_docker.append(name)
        sh([DOCKER, "run", "--runtime", rt, "-d", "--name", name, IMAGE, "sh", "-c",
            "echo start; sleep 1000"], check=True)
        wait_for(lambda: "start" in sh([DOCKER, "logs", name]).stdout, "first start")
        r = sh([DOCKER, "restart", "-t", "1", name])
        wait_for(lambda: sh([DOCKER, "logs", name]).stdout.count("start") == 2, "second start")
        status = sh([DOCKER, "inspect", "-f", "{{.State.Status}} {{.RestartCount}}", name]).stdout.strip()
        return r.returncode, status

    # `docker restart` is not a restart-policy restart: RestartCount stays 0.
    assert both(scenario) == (0, "running 0")


def test_docker_bind_mounts_rw_and_ro(docker_engine, image, tmp_path):
    host = tmp_path / "data"
    host.mkdir()
    (host / "in.txt").write_text("from host\n")

    def scenario(rt):
        rw = obs(drun(rt, "--rm", "-v", f"{host}:/data", IMAGE, "sh", "-c",
                      f"cat /data/in.txt; echo from-{rt} > /data/out-{rt}.txt"))
        written = (host / f"out-{rt}.txt").read_text()
        ro = drun(rt, "--rm", "-v", f"{host}:/data:ro", IMAGE, "sh", "-c",
                  "cat /data/in.txt; echo x > /data/new.txt")
        return rw, written == f"from-{rt}\n", ro.returncode, ro.stdout, "Read-only file system" in ro.stderr

    results = {rt: scenario(rt) for rt in RUNTIMES}
    for rt in RUNTIMES:
        assert (host / f"out-{rt}.txt").read_text() == f"from-{rt}\n"
    assert results["runc"] == results["agentfense"]
    assert results["runc"][0] == (0, "from host\n", "")
    assert results["runc"][2:] == (1, "from host\n", True)
    assert not (host / "new.txt").exists()


def test_docker_runtime_args_are_accepted(docker_engine, image):
    """An administrator's runtimeArgs (before runc's global flags) do not break anything."""
    p = drun("agentfense-cfg", "--rm", IMAGE, "echo", "configured")
    assert obs(p) == (0, "configured\n", "")


def test_docker_leaves_no_state_behind(docker_engine, image):
    name = unique()
    p = drun("agentfense", "--name", name, IMAGE, "true")
    assert p.returncode == 0
    sh([DOCKER, "rm", name], check=True)
    state = Path("/run/docker/runtime-runc/moby") / name
    # Docker's runtime root for non-default runtimes is per runtime name.
    for root in Path("/run/docker").glob("runtime-*/moby"):
        for d in root.iterdir():
            assert not d.name.startswith(name), d
    assert not state.exists()


# ---------------------------------------------------------------- containerd


def ctr(engine, *args, timeout=120, input=None):
    return sh([CTR, "-a", engine, "-n", CTR_NS, *args], timeout=timeout, input=input)


def ctr_run(engine, rt, *cmd, extra=()):
    cid = unique("ctr")
    return ctr(engine, "run", "--rm", "--runtime", "io.containerd.runc.v2", "--runc-binary",
               runtime_path(rt), "--annotation", "agentfense.test/k=v", *extra, CTR_IMAGE, cid, *cmd)


def test_ctr_run_with_annotation(ctr_engine):
    r = both(lambda rt: obs(ctr_run(ctr_engine, rt, "sh", "-c", "echo out; echo err >&2; exit 3")))
    # ctr without a tty merges nothing: stdout and stderr arrive apart.
    assert r == (3, "out\n", "err\n")


def test_ctr_env_and_cwd(ctr_engine):
    r = both(lambda rt: obs(ctr_run(ctr_engine, rt, "sh", "-c", 'echo "$A"; pwd',
                                    extra=("--env", "A=1", "--cwd", "/etc"))))
    assert r == (0, "1\n/etc\n", "")


def test_ctr_kill_is_137(ctr_engine):
    import subprocess

    def scenario(rt):
        cid = unique("ctr")
        p = subprocess.Popen([CTR, "-a", ctr_engine, "-n", CTR_NS, "run", "--rm", "--runtime",
                              "io.containerd.runc.v2", "--runc-binary", runtime_path(rt), CTR_IMAGE,
                              cid, "sleep", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        wait_for(lambda: "RUNNING" in ctr(ctr_engine, "task", "ls").stdout.split(cid)[-1][:40]
                 if cid in ctr(ctr_engine, "task", "ls").stdout else False, "ctr task to run")
        execd = obs(ctr(ctr_engine, "task", "exec", "--exec-id", "e1", cid, "echo", "in-exec"))
        ctr(ctr_engine, "task", "kill", "-s", "SIGKILL", cid)
        out, err = p.communicate(timeout=60)
        return p.returncode, execd

    assert both(scenario) == (137, (0, "in-exec\n", ""))


# ---------------------------------------------------------------- podman


def podman_run(rt, *args):
    return sh([PODMAN, "--runtime", runtime_path(rt), "--cgroup-manager", "cgroupfs", "run", "--rm",
               "--network", "none", *PODMAN_ULIMITS, "--annotation", "agentfense.test/k=v", *args])


def test_podman_run_with_annotation(podman_engine):
    r = both(lambda rt: obs(podman_run(rt, IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")))
    assert r == (3, "out\n", "err\n")


def test_podman_env_cwd_user(podman_engine):
    r = both(lambda rt: obs(podman_run(rt, "-e", "A=1", "-w", "/etc", "-u", "65534", IMAGE,
                                       "sh", "-c", 'echo "$A"; pwd; id -u')))
    assert r == (0, "1\n/etc\n65534\n", "")


def test_podman_exec_and_kill(podman_engine):
    def scenario(rt):
        name = unique("pod")
        base = [PODMAN, "--runtime", runtime_path(rt), "--cgroup-manager", "cgroupfs"]
        sh([*base, "run", "-d", "--name", name, "--network", "none", *PODMAN_ULIMITS, IMAGE,
            "sleep", "1000"], check=True)
        execd = obs(sh([*base, "exec", name, "sh", "-c", "echo in-exec; exit 2"]))
        sh([*base, "kill", name], check=True)
        code = sh([*base, "wait", name]).stdout.strip()
        sh([*base, "rm", "-f", name])
        return execd, code

    assert both(scenario) == ((2, "in-exec\n", ""), "137")


def test_podman_failing_command(podman_engine):
    for rt in RUNTIMES:
        p = podman_run(rt, IMAGE, "/nonexistent")
        assert p.returncode in (126, 127), (rt, p.returncode, p.stderr)
        assert "/nonexistent" in p.stderr, (rt, p.stderr)
