"""The benchmark harness works (figures are printed, never asserted)."""

import sys

from conftest import BIN, REPO, sh


def test_fence_bench_quick_prints_its_table(agentfense_bin):
    p = sh([sys.executable, REPO / "benches" / "fence_bench.py", "--quick"], timeout=600,
           env={"AGENTFENSE_BIN": str(BIN), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert p.returncode == 0, p.stderr
    print(p.stdout)
    lines = p.stdout.splitlines()
    for label in ("native", "read-only", "agent-safe, audit off", "agent-safe, audit all"):
        assert any(l.startswith(label) for l in lines), p.stdout
    assert any(l.startswith("audit all vs off, grep -r:") for l in lines), p.stdout
