"""The printed table: per workload, each setup's median, min and max beside the native figure
of the same run and their ratio; then memory, scale, and the goals with a pass/miss marker."""

from . import mounts as M
from .util import median

W_LABEL = 26
MiB = 1 << 20


def _secs(x):
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.3f} s"


def _mibps(nbytes, t):
    return f"{nbytes / MiB / t:,.0f} MiB/s" if t else "-"


class Report:
    def __init__(self):
        self.lines = []
        self.goals = []

    def out(self, s=""):
        self.lines.append(s)

    def section(self, title):
        self.out()
        self.out(f"== {title}")

    def timing(self, title, key, setups, results, base_label="native", nbytes=None, notes=()):
        """Rows of one workload. nbytes: also a throughput workload (ratio = throughput)."""
        self.section(title)
        head = "native" if base_label == "native" else base_label
        if nbytes:
            self.out(f"{'setup':<{W_LABEL}} {'median':>11} {'min':>11} {'max':>11} "
                     f"{head + ' median':>16} {'throughput vs ' + head:>24}")
        else:
            self.out(f"{'setup':<{W_LABEL}} {'median':>10} {'min':>10} {'max':>10} "
                     f"{head + ' median':>16} {'vs ' + head:>10}")
        base = results.get((key, base_label))
        bm = median(base.values) if base and base.values else None
        for s in setups:
            label = s if isinstance(s, str) else s.label
            r = results.get((key, label))
            if r is None:
                continue
            if r.error:
                self.out(f"{label:<{W_LABEL}} FAILED: {r.error[:300]}")
                continue
            if r.skipped:
                self.out(f"{label:<{W_LABEL}} skipped: {r.skipped}")
                continue
            m = median(r.values)
            if nbytes:
                ratio = f"{bm / m:.2f}x" if bm else "-"
                self.out(f"{label:<{W_LABEL}} {_mibps(nbytes, m):>11} {_mibps(nbytes, max(r.values)):>11} "
                         f"{_mibps(nbytes, min(r.values)):>11} {_mibps(nbytes, bm):>16} {ratio:>24}")
            else:
                ratio = f"{m / bm:.2f}x" if bm else "-"
                self.out(f"{label:<{W_LABEL}} {_secs(m):>10} {_secs(min(r.values)):>10} "
                         f"{_secs(max(r.values)):>10} {_secs(bm):>16} {ratio:>10}")
        for n in notes:
            self.out(f"  ({n})")

    # -- goals --------------------------------------------------------------------------

    def goal(self, name, setup, value, goal_text, ok, unit="x", present=True):
        """value None: not measured (failed); not present: its workload was not run (no row)."""
        if not present:
            return
        if value is None:
            measured, mark = "-", "n/a"
        else:
            measured = (f"{value:.2f}x" if unit == "x" else f"{int(value)}" if unit == ""
                        else f"{value:.1f}{unit}")
            mark = "pass" if ok(value) else "MISS"
        self.goals.append(f"{name:<36} {setup:<{W_LABEL}} {measured:>10}   {goal_text:<12} {mark}")

    def ratio(self, results, key, label, base_label):
        a, b = results.get((key, label)), results.get((key, base_label))
        if not a or not b or not a.values or not b.values or a.error or b.error:
            return None
        return median(a.values) / median(b.values)

    @staticmethod
    def ran(results, key):
        return any(k == key for k, _ in results)

    def goals_section(self, results, memory, scale, scale_n):
        r = self.ratio
        for key, name in (("grep-warm", "grep -r warm:"), ("find-stat", "find + stat warm:")):
            for s in M.FENCES:
                self.goal(name, s.label, r(results, key, s.label, "native"), "<= 1.5x", lambda v: v <= 1.5,
                          present=self.ran(results, key))
        for s in M.GIT_FENCES:
            self.goal("git status warm:", s.label, r(results, "git-status", s.label, "native"),
                      "<= 1.5x", lambda v: v <= 1.5, present=self.ran(results, "git-status"))
        for s in M.FENCES:
            v = r(results, "seq-read", s.label, "native")
            self.goal("sequential read, throughput:", s.label, 1 / v if v else None, ">= 0.9x",
                      lambda v: v >= 0.9, present=self.ran(results, "seq-read"))
        for s in M.WRITE_FENCES:
            self.goal("tar x into the delta vs overlayfs:", s.label,
                      r(results, "tar-x", s.label, "overlayfs"), "<= 1.5x", lambda v: v <= 1.5,
                      present=self.ran(results, "tar-x"))
        self.goal("docker run --rm true vs runc:", "agentfense, agent-safe",
                  r(results, "docker-run", "agentfense, agent-safe", "runc"), "<= 1.15x",
                  lambda v: v <= 1.15, present=self.ran(results, "docker-run"))
        for key, name in (("grep-warm", "grep -r"), ("find-stat", "find + stat"),
                          ("tar-x", "tar x"), ("write-small", "small writes")):
            self.goal(f"audit all vs off, {name}:", "agent-safe",
                      r(results, key, M.FENCE_SAFE_ALL.label, M.FENCE_SAFE_OFF.label), "<= 1.10x",
                      lambda v: v <= 1.10, present=self.ran(results, key))
        for s in M.FENCES:
            m = memory.get((s.label, "idle"), {}).get("VmRSS")
            self.goal("idle fence daemon RSS:", s.label, m / 1024 if m else None, "<= 4 MiB",
                      lambda v: v <= 4, unit=" MiB", present=self.ran(results, "grep-warm"))
        if scale is None:
            self.goal(">= 500 fenced containers alive:", "agentfense, read-only", None, ">= 500",
                      lambda v: True, present=scale_n is not None)
        else:
            alive = min(scale.get("alive", 0), scale.get("answered", 0))
            if scale_n < 500:
                self.goals.append(f"{'>= 500 fenced containers alive:':<36} {'agentfense, read-only':<{W_LABEL}} "
                                  f"{alive:>10}   {'>= 500':<12} n/a (ran {scale_n}; --scale 500 to check)")
            else:
                self.goal(">= 500 fenced containers alive:", "agentfense, read-only", alive, ">= 500",
                          lambda v: v >= 500, unit="")
        self.section("goals (ratios to native measured in this run; printed, never asserted)")
        self.out(f"{'goal':<36} {'setup':<{W_LABEL}} {'measured':>10}   {'goal':<12} mark")
        self.lines.extend(self.goals)

    def text(self):
        return "\n".join(self.lines)
