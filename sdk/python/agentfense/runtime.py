"""The ``agentfense-runc`` binary: finding it, and its own commands (policy check, audit, diff,
commit, export) with their JSON output parsed."""

import json
import os
import shutil
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .errors import PolicyError, SandboxError

DEFAULT_BINARY = "/usr/local/bin/agentfense-runc"

#: What ``delta`` may be: what happens to a sandbox's copy-on-write delta when it is closed.
DELTA_MODES = ("keep", "commit", "discard", "off")
#: What ``audit`` may be.
AUDIT_LEVELS = ("off", "deny", "write", "all")
#: The levels a rule may grant.
LEVELS = ("none", "view", "read", "write")


def find_binary(binary: Optional[Union[str, "os.PathLike[str]"]] = None) -> str:
    """The ``agentfense-runc`` to use: ``binary`` if given, else ``$AGENTFENSE_RUNC``, else
    ``agentfense-runc`` on ``PATH``, else ``/usr/local/bin/agentfense-runc``."""
    if binary:
        return os.fspath(binary)
    env = os.environ.get("AGENTFENSE_RUNC")
    if env:
        return env
    return shutil.which("agentfense-runc") or DEFAULT_BINARY


def _message(p: "subprocess.CompletedProcess[str]") -> str:
    text = (p.stderr or "").strip() or (p.stdout or "").strip()
    return text or f"exited with status {p.returncode}"


class Runtime:
    """The ``agentfense-runc`` binary's own commands.

    ``binary``: see :func:`find_binary`. ``config``: the administrator's settings file
    (``--agentfense-config``), for a non-default state directory; normally ``None``.
    """

    def __init__(self, binary: Optional[Union[str, "os.PathLike[str]"]] = None,
                 config: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        self.binary = find_binary(binary)
        self.config = os.fspath(config) if config else None

    def command(self, sub: Sequence[str], *rest: str) -> List[str]:
        """The argument vector of subcommand ``sub`` (one word or several, e.g. ``["audit",
        "summary"]``) with ``--agentfense-config`` when set, then ``rest``."""
        args = [self.binary, *sub]
        if self.config:
            args += ["--agentfense-config", self.config]
        return args + list(rest)

    def call(self, sub: Sequence[str], *rest: str, input: Optional[str] = None,
             ok: Tuple[int, ...] = (0,), timeout: Optional[float] = 300
             ) -> "subprocess.CompletedProcess[str]":
        """Runs a subcommand; raises :class:`SandboxError` (with the runtime's message) unless
        it exits with one of ``ok``."""
        args = self.command(sub, *rest)
        try:
            p = subprocess.run(args, input=input, capture_output=True, text=True,
                               timeout=timeout)
        except FileNotFoundError:
            raise SandboxError(f"agentfense-runc not found at {self.binary} (pass binary=, set "
                               "AGENTFENSE_RUNC, or install it on PATH)", command=args) from None
        except PermissionError as e:
            raise SandboxError(f"cannot run {self.binary}: {e}", command=args) from None
        if p.returncode not in ok:
            raise SandboxError(_message(p), command=args, stderr=p.stderr,
                               exit_code=p.returncode)
        return p

    # --- policies ---------------------------------------------------------------------------

    def check_policy(self, policy: Optional[Union[Dict[str, Any], List[Any]]] = None,
                     preset: Optional[str] = None) -> None:
        """Validates a policy (a rule list or ``{"preset", "rules", "default"}``) or a preset
        with ``agentfense-runc policy check``; raises :class:`PolicyError` with every problem
        the runtime found."""
        if policy is not None:
            args, text = ["--policy", "-"], json.dumps(policy)
        elif preset is not None:
            args, text = ["--preset", preset], None
        else:
            raise PolicyError("no policy: give permissions, a preset or a policy")
        try:
            self.call(["policy", "check"], *args, input=text)
        except SandboxError as e:
            lines = []
            for line in e.message.splitlines():
                for prefix in ("error: ", "<stdin>: "):
                    if line.startswith(prefix):
                        line = line[len(prefix):]
                lines.append(line)
            msg = "\n".join(lines)
            raise PolicyError(msg, command=e.command, stderr=e.stderr,
                              exit_code=e.exit_code) from None

    # --- audit ------------------------------------------------------------------------------

    def audit(self, sandbox_id: str, decision: Optional[str] = None) -> List[Dict[str, Any]]:
        """The sandbox's audit trail: one dict per record (``ts``, ``seq``, ``container``,
        ``event``; accesses add ``op``, ``path``, ``decision``, ``rule``, ``pid``, ``uid``...).
        ``decision``: only access records with this decision (``allow``, ``deny``,
        ``hidden``)."""
        rest = [sandbox_id, "--format", "json"]
        if decision:
            rest += ["--decision", decision]
        p = self.call(["audit"], *rest)
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

    def audit_summary(self, sandbox_id: str) -> Dict[str, Any]:
        """What the sandbox read, wrote, created, deleted, was refused, probed, and which of
        its grants it never used (``agentfense-runc audit summary``)."""
        p = self.call(["audit", "summary"], sandbox_id, "--format", "json")
        return json.loads(p.stdout)

    def session_summary(self, sandbox_id: str) -> Dict[str, Any]:
        """Like :meth:`audit_summary`, but over every run of the trail's latest policy (the
        runtime summarises its latest run only; a native sandbox makes one run per command,
        a Docker one per start)."""
        latest = self.audit_summary(sandbox_id)
        return summarise_runs(self.audit(sandbox_id), latest)

    def audit_verify(self, sandbox_id: str) -> Tuple[bool, str]:
        """Checks the audit trail's hash chain: ``(intact, message)``."""
        p = self.call(["audit", "verify"], sandbox_id, ok=(0, 1))
        return p.returncode == 0, (p.stdout.strip() or p.stderr.strip())

    # --- delta ------------------------------------------------------------------------------

    def diff(self, sandbox_id: str) -> List[Dict[str, str]]:
        """What the sandbox changed: ``[{"kind": "A"|"C"|"D", "path": ...}]``, paths as the
        container sees them (``/workspace/...``)."""
        p = self.call(["diff"], sandbox_id, "--format", "json")
        return json.loads(p.stdout)

    def commit(self, sandbox_id: str) -> Dict[str, Any]:
        """Applies a deleted sandbox's delta to its base: ``{"added", "changed", "deleted",
        "conflicts"}``. Conflicts (the host changed a path meanwhile) are reported, not raised;
        they stay in the kept delta."""
        p = self.call(["commit"], sandbox_id, "--format", "json", ok=(0, 2))
        out = p.stdout.strip()
        return json.loads(out) if out else {"added": [], "changed": [], "deleted": [],
                                             "conflicts": []}

    def export(self, sandbox_id: str, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the sandbox's delta as an OCI image layer (tar with ``.wh.`` whiteouts)."""
        args = self.command(["export"], sandbox_id)
        with open(path, "wb") as f:
            try:
                p = subprocess.run(args, stdout=f, stderr=subprocess.PIPE, timeout=3600)
            except FileNotFoundError:
                raise SandboxError(f"agentfense-runc not found at {self.binary}",
                                   command=args) from None
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace")
            raise SandboxError(err.strip() or f"export exited {p.returncode}", command=args,
                               stderr=err, exit_code=p.returncode)


_READS = ("open", "readlink", "getxattr", "listxattr")
_CREATES = ("create", "mknod", "mkdir", "symlink")


def summarise_runs(records: List[Dict[str, Any]], latest: Dict[str, Any]) -> Dict[str, Any]:
    """Merges the runs at the end of ``records`` that share the latest run's policy into one
    summary shaped like ``audit summary --format json`` (``latest``, which gives the shape,
    the policy digest and the grants to check for ``untouched``)."""
    runs: List[List[Dict[str, Any]]] = []
    for r in records:
        if r.get("event") == "create" or not runs:
            runs.append([])
        runs[-1].append(r)

    def digest(run: List[Dict[str, Any]]) -> Optional[str]:
        first = run[0] if run else {}
        return (first.get("info") or {}).get("policy_sha256") \
            if first.get("event") == "create" else None

    chosen: List[Dict[str, Any]] = []
    if runs:
        want = digest(runs[-1])
        for run in reversed(runs):
            if digest(run) != want:
                break
            chosen[:0] = run
    sets: Dict[str, set] = {k: set() for k in
                            ("read", "written", "created", "deleted", "listed", "probed")}
    renamed = set()
    refused: Dict[str, set] = {}
    touched = set()
    totals = {"allow": 0, "deny": 0, "hidden": 0, "dropped": 0}
    bytes_read = bytes_written = 0
    for r in chosen:
        if r.get("event") == "daemon-stop":
            totals["dropped"] += int((r.get("info") or {}).get("dropped") or 0)
        if r.get("event") != "access":
            continue
        op, path, decision = r.get("op"), r.get("path"), r.get("decision")
        if decision in totals:
            totals[decision] += 1
        if not op or path is None:
            continue
        if decision == "hidden":
            sets["probed"].add(path)
            continue
        if decision == "deny":
            what = r.get("mode") if op == "open" and r.get("mode") else op
            refused.setdefault(path, set()).add(what)
            continue
        if decision != "allow":
            continue
        if r.get("rule") is not None:
            touched.add(r["rule"])
        bytes_read += int(r.get("bytes_read") or 0)
        bytes_written += int(r.get("bytes_written") or 0)
        if op == "open" and r.get("mode") == "write":
            sets["written"].add(path)
            if int(r.get("bytes_read") or 0) > 0:
                sets["read"].add(path)
        elif op in _READS:
            sets["read"].add(path)
        elif op == "opendir":
            sets["listed"].add(path)
        elif op in _CREATES:
            sets["created"].add(path)
        elif op == "link" and r.get("to"):
            sets["created"].add(r["to"])
        elif op in ("unlink", "rmdir"):
            sets["deleted"].add(path)
        elif op == "rename":
            renamed.add((path, r.get("to") or ""))
        elif op in ("setattr", "setxattr", "removexattr"):
            sets["written"].add(path)
    out = dict(latest)
    out.update({k: sorted(v) for k, v in sets.items()})
    out["renamed"] = [{"from": a, "to": b} for a, b in sorted(renamed)]
    out["refused"] = [{"path": p, "ops": sorted(o)} for p, o in sorted(refused.items())]
    out["untouched"] = [g for g in latest.get("untouched", []) if g.get("rule") not in touched]
    out["records"] = len(chosen)
    out["bytes_read"], out["bytes_written"] = bytes_read, bytes_written
    out["totals"] = totals
    return out
