"""Unix permissions inside a fenced workspace are the kernel's, exactly.

The fence is mounted without the kernel's `default_permissions` (so that root's access(2) agrees
with the policy), which means the daemon decides owner/group/other classes, supplementary
groups, capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN,
CAP_FSETID), sticky directories, protected hard links, chmod/chown/utimes rules, execute-only
programs and set-group-ID inheritance itself. This test runs the same list of single system
calls (integration/probe.c) over the same tree twice, under runc on a plain bind mount and under
agentfense with a policy that allows everything, for root, root without the DAC capabilities, an
ordinary user and an ordinary user with a supplementary group, and requires identical answers.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import DOCKER, IMAGE, sh, unique
from test_fence import no_leftovers, probe  # noqa: F401  (fixture)

ALLOW_ALL = json.dumps([{"pattern": "**", "permission": "write"}])

USERS = {
    "root": ["-u", "0:0"],
    "root-without-dac": ["-u", "0:0", "--cap-drop", "DAC_OVERRIDE", "--cap-drop", "FOWNER",
                         "--cap-drop", "CHOWN", "--cap-drop", "FSETID"],
    "user": ["-u", "1000:1000"],
    "user-in-2000": ["-u", "1000:1000", "--group-add", "2000"],
}


def make_tree(root, probe):
    """Files and directories with a spread of owners and modes."""
    root.mkdir()

    def f(name, uid, gid, mode, content="data\n"):
        p = root / name
        p.write_text(content)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    def d(name, uid, gid, mode, inner=None):
        p = root / name
        p.mkdir()
        if inner:
            q = p / "inner"
            q.write_text("inner\n")
            os.chown(q, *inner[:2])
            os.chmod(q, inner[2])
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    f("secret600", 0, 0, 0o600)
    f("grp640", 0, 2000, 0o640)
    f("grp660", 0, 2000, 0o660)
    f("mine600", 1000, 1000, 0o600)
    f("others666", 0, 0, 0o666)
    f("ro644", 0, 0, 0o644)
    f("group_only_070", 0, 2000, 0o070)
    d("d700", 0, 0, 0o700, (0, 0, 0o644))
    d("d711", 0, 0, 0o711, (0, 0, 0o644))
    d("d755", 0, 0, 0o755, (0, 0, 0o644))
    d("dg770", 0, 2000, 0o770, (0, 2000, 0o664))
    d("mine700", 1000, 1000, 0o700, (1000, 1000, 0o600))
    d("pub", 0, 0, 0o777)
    d("sticky", 0, 0, 0o1777)
    for name, uid in (("rootfile", 0), ("userfile", 1000)):
        p = root / "sticky" / name
        p.write_text("x\n")
        os.chown(p, uid, uid)
        os.chmod(p, 0o666)
    d("sg", 0, 2000, 0o2777)
    for name, mode in (("exe711", 0o711), ("exe744", 0o744), ("exe644", 0o644)):
        shutil.copy(probe, root / name)
        os.chown(root / name, 0, 0)
        os.chmod(root / name, mode)
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)


CHECKS = [
    # reading, by class
    "read W/secret600", "read W/grp640", "read W/mine600", "read W/others666",
    "read W/group_only_070",
    "access_r W/secret600", "access_r W/grp640", "access_w W/ro644", "access_w W/others666",
    "access_w W/grp660", "eaccess_w W/ro644", "access_x W/exe744", "access_x W/exe711",
    "access_x W/exe644", "access_x W/d700", "access_w W/d755",
    # directories: search and list
    "stat W/d700/inner", "read W/d700/inner", "listed W/d700 inner", "opendir W/d711",
    "stat W/d711/inner", "read W/d711/inner", "opendir W/dg770", "read W/dg770/inner",
    "chdir W/d700", "chdir W/d711", "read W/mine700/inner", "listed W/mine700 inner",
    # programs
    "exec W/exe711", "exec W/exe744", "exec W/exe644",
    # writing
    "write W/others666", "write W/ro644", "write W/grp660", "truncate W/ro644",
    "truncate W/others666", "fallocate W/grp660",
    # attributes
    "chmod W/ro644", "chmod W/mine600", "chown W/mine600 1000:2000", "chown W/mine600 0:-1",
    "chown W/ro644 -1:2000", "utime_now W/others666", "utime_set W/others666",
    "utime_set W/mine600", "utime_now W/ro644", "setxattr W/others666", "setxattr W/ro644",
    "getxattr W/secret600", "getxattr W/others666",
    # names
    "create W/pub/new1", "create W/d755/new2", "mkdir W/dg770/nd", "create W/newtop",
    "unlink W/sticky/rootfile", "unlink W/sticky/userfile", "rename W/pub/new1 W/d755/x",
    "link W/ro644 W/pub/hl", "link W/others666 W/pub/hl2", "link W/mine600 W/pub/hl3",
    "mkdir W/pub/dd", "chmod_arg W/pub/dd 555", "rename W/pub/dd W/sticky/dd",
    "create W/pub/r1", "rename W/pub/r1 W/sticky/rootfile", "create W/pub/r2",
    "rename W/pub/r2 W/sticky/userfile", "exchange W/pub/r2 W/sticky/rootfile",
    "symlink W/d755/s", "mkfifo W/pub/fifo", "rmdir W/dg770/nd",
    # set-group-ID directories and files
    "create W/sg/f", "mkdir W/sg/sd", "mode W/sg/sd 2755", "mode W/sg/sd 2775",
    "chmod_arg W/sg/f 2755", "mode W/sg/f 2755", "mode W/sg/f 755",
    "chmod_arg W/mine600 2700", "mode W/mine600 2700",
]


def run_checks(runtime, tree, probe, user_args, extra):
    checks = [c.replace("W/", "/workspace/") for c in CHECKS]
    name = unique()
    try:
        p = sh([DOCKER, "run", "--name", name, "--runtime", runtime, *user_args, *extra,
                "-v", f"{tree}:/workspace", "-v", f"{probe}:/probe:ro", IMAGE,
                "/probe", "-a", *checks], timeout=120)
        assert p.returncode == 0, (runtime, p.stdout, p.stderr)
        got = p.stdout.splitlines()
        assert len(got) == len(checks), (runtime, got)
        return got
    finally:
        sh([DOCKER, "rm", "-f", name])


@pytest.mark.parametrize("who", list(USERS))
def test_fenced_answers_are_the_kernels(docker_engine, image, probe, tmp_path, who):
    native_tree, fenced_tree = tmp_path / "native", tmp_path / "fenced"
    make_tree(native_tree, probe)
    make_tree(fenced_tree, probe)
    native = run_checks("runc", native_tree, probe, USERS[who], [])
    fenced = run_checks("agentfense", fenced_tree, probe, USERS[who],
                        ["-e", "AGENTFENSE_POLICY=" + ALLOW_ALL, "-e", "AGENTFENSE_AUDIT=off"])
    diff = [f"{n!r} natively, {f!r} fenced" for n, f in zip(native, fenced) if n != f]
    assert not diff, f"{who}:\n" + "\n".join(diff)
    # The run is not vacuous: this user was both allowed and refused something.
    results = {line.rsplit(" ", 1)[1] for line in native}
    assert "ok" in results and results & {"EACCES", "EPERM"}, native
    no_leftovers()


def test_root_access_agrees_with_the_policy(docker_engine, image, probe, tmp_path):
    """Root, with CAP_DAC_OVERRIDE, is told by access(2) and faccessat(AT_EACCESS) that it may
    not write what the policy makes read-only, and may write what it makes writable."""
    tree = tmp_path / "t"
    (tree / "src").mkdir(parents=True)
    (tree / "out").mkdir()
    for p in (tree / "src" / "a.py", tree / "out" / "b.txt"):
        p.write_text("x\n")
        os.chown(p, 1000, 1000)
        os.chmod(p, 0o644)
    policy = json.dumps([{"pattern": "**", "permission": "read"},
                         {"pattern": "/out/**", "permission": "write"}])
    checks = ["access_w /workspace/src/a.py", "eaccess_w /workspace/src/a.py",
              "access_r /workspace/src/a.py", "write /workspace/src/a.py",
              "access_w /workspace/out/b.txt", "eaccess_w /workspace/out/b.txt",
              "write /workspace/out/b.txt", "access_w /workspace/src"]
    name = unique()
    try:
        p = sh([DOCKER, "run", "--name", name, "--runtime", "agentfense", "-u", "0:0",
                "-e", "AGENTFENSE_POLICY=" + policy, "-v", f"{tree}:/workspace",
                "-v", f"{probe}:/probe:ro", IMAGE, "/probe", "-a", *checks], timeout=60)
    finally:
        sh([DOCKER, "rm", "-f", name])
    assert p.stdout.splitlines() == [
        "access_w /workspace/src/a.py EACCES", "eaccess_w /workspace/src/a.py EACCES",
        "access_r /workspace/src/a.py ok", "write /workspace/src/a.py EACCES",
        "access_w /workspace/out/b.txt ok", "eaccess_w /workspace/out/b.txt ok",
        "write /workspace/out/b.txt ok", "access_w /workspace/src EACCES",
    ], p.stdout + p.stderr
    assert (tree / "out" / "b.txt").read_text() == "x\n", "the base changed"
    no_leftovers()
