"""A fenced workspace and the commands run over it."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import CommandTimeout, PolicyError, SandboxError
from .runtime import AUDIT_LEVELS, DELTA_MODES, LEVELS, Runtime

_SANDBOX_PREFIX = "agentfense-runc sandbox: "
# The runtime's own error line (logrus text format), as `agentfense-runc` writes it on stderr.
_RUNTIME_ERROR = re.compile(r'^time="[^"]*" level=(?:error|fatal) msg="(.*)"\s*$')

#: Where the workspace appears inside the sandbox (and the commands' working directory).
WORKSPACE = "/workspace"

PathLike = Union[str, "os.PathLike[str]"]
Command = Union[str, Sequence[str]]
Rule = Mapping[str, Any]


class RuntimeType(str, Enum):
    """How commands are isolated.

    ``NATIVE`` (alias ``BWRAP``): ``agentfense-runc sandbox`` runs each command fenced, over a
    read-only view of the host's system directories; no Docker needed. ``DOCKER``: one
    long-lived container of runtime ``agentfense`` (``docker run --runtime agentfense``), one
    ``docker exec`` per command.
    """

    NATIVE = "native"
    BWRAP = "native"
    DOCKER = "docker"

    @classmethod
    def coerce(cls, value: Union["RuntimeType", str]) -> "RuntimeType":
        """A ``RuntimeType`` from itself or its name (``"native"``, ``"bwrap"``,
        ``"docker"``, any case)."""
        if isinstance(value, RuntimeType):
            return value
        v = str(value).strip().lower()
        if v in ("native", "bwrap"):
            return cls.NATIVE
        if v == "docker":
            return cls.DOCKER
        raise ValueError(f"unknown runtime {value!r}: expected native (bwrap) or docker")


class _DefaultPreset(str):
    """The default ``preset`` argument, told apart from an explicit ``"agent-safe"``."""


DEFAULT_PRESET: str = _DefaultPreset("agent-safe")


@dataclass
class ExecResult:
    """What a command did: its ``stdout``, ``stderr`` (text, undecodable bytes replaced),
    ``exit_code`` (128 + N when killed by signal N) and ``duration`` in seconds."""

    stdout: str
    stderr: str
    exit_code: int
    duration: float
    command: Command = field(default="", repr=False)

    @property
    def output(self) -> str:
        """Alias of ``stdout``."""
        return self.stdout

    @property
    def success(self) -> bool:
        """Whether the command exited with status 0."""
        return self.exit_code == 0


def build_policy(permissions: Optional[Sequence[Rule]], preset: Optional[str],
                 default: Optional[str] = None,
                 policy: Optional[Union[Mapping[str, Any], Sequence[Rule], str]] = None):
    """``(preset, policy)``: what to ask the runtime for.

    - ``policy`` (a rule list, a ``{"preset", "rules", "default"}`` object, or its JSON text)
      is used as it is;
    - else ``permissions`` (rule dicts, SPEC section 3) form the policy, with ``default``
      (``none`` unless given) for paths no rule covers; a ``preset`` given explicitly
      (not the default argument) is added beneath them;
    - else the ``preset`` alone.
    """
    if policy is not None:
        if isinstance(policy, str):
            try:
                policy = json.loads(policy)
            except ValueError as e:
                raise PolicyError(f"policy is not JSON: {e}") from None
        if isinstance(policy, Mapping):
            return None, dict(policy)
        return None, [dict(r) for r in policy]
    if permissions is not None:
        if isinstance(permissions, (str, bytes)) or not all(
                isinstance(r, Mapping) for r in permissions):
            raise PolicyError("permissions must be a list of rule dicts "
                              '({"pattern": ..., "permission": ...})')
        for i, r in enumerate(permissions):
            lvl = r.get("permission")
            if lvl is not None and lvl not in LEVELS:
                raise PolicyError(f"rule {i}: unknown permission {lvl!r}; expected one of "
                                  + ", ".join(LEVELS))
        obj: Dict[str, Any] = {"rules": [dict(r) for r in permissions],
                               "default": default or "none"}
        if preset and not isinstance(preset, _DefaultPreset):
            obj["preset"] = str(preset)
        return None, obj
    if default is not None:
        return None, {"preset": str(preset), "rules": [], "default": default} if preset else \
            {"rules": [], "default": default}
    if not preset:
        raise PolicyError("no policy: give permissions, a preset or a policy")
    return str(preset), None


def _argv(command: Command) -> List[str]:
    argv = ["sh", "-c", command] if isinstance(command, str) else [str(a) for a in command]
    if not argv:
        raise ValueError("empty command")
    return argv


def _env_pairs(env: Mapping[str, str]) -> List[str]:
    pairs = []
    for k, v in env.items():
        if not k or "=" in k or "\0" in k:
            raise ValueError(f"invalid environment variable name {k!r}")
        if k.startswith("AGENTFENSE_"):
            raise ValueError(f"{k}: fencing is set with the sandbox's arguments, not env")
        pairs.append(f"{k}={v}")
    return pairs


def _input(stdin: Optional[Union[str, bytes]]) -> Optional[bytes]:
    if stdin is None:
        return None
    return stdin.encode() if isinstance(stdin, str) else bytes(stdin)


def _text(b: Optional[bytes]) -> str:
    return (b or b"").decode("utf-8", errors="replace")


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


class Sandbox:
    """A workspace (a host directory) fenced at ``/workspace`` by a policy, and the commands
    run over it. Use it as a context manager::

        with Sandbox.from_local("./repo", preset="agent-safe") as sandbox:
            print(sandbox.run("ls -la").stdout)

    Successive ``run`` calls share one copy-on-write delta (one sandbox id); the host
    directory is never changed while the sandbox is open (unless ``delta="off"``). On
    :meth:`close` (the end of the ``with`` block, also on an exception) the sandbox is torn
    down and the delta settled per ``delta``: ``keep`` (default) leaves it in the runtime's
    state directory (see :meth:`diff`, :meth:`commit`, :meth:`export`), ``commit`` applies it
    to the host directory (the report is kept in :attr:`commit_report`), ``discard`` drops it.
    The audit trail stays in every case, and :meth:`audit`, :meth:`diff`, :meth:`commit`,
    :meth:`export` keep working after ``close``.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        permissions: Optional[Sequence[Rule]] = None,
        preset: Optional[str] = DEFAULT_PRESET,
        runtime: Union[RuntimeType, str] = RuntimeType.NATIVE,
        image: Optional[str] = None,
        delta: str = "keep",
        audit: str = "all",
        default: Optional[str] = None,
        policy: Optional[Union[Mapping[str, Any], Sequence[Rule], str]] = None,
        sandbox_id: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        binary: Optional[PathLike] = None,
        agentfense_config: Optional[PathLike] = None,
        docker: Optional[str] = None,
        docker_runtime: str = "agentfense",
        docker_args: Sequence[str] = (),
        network: Optional[str] = None,
        native_args: Sequence[str] = (),
    ) -> None:
        """See :meth:`from_local`."""
        self.path = os.path.abspath(os.fspath(path))
        self.runtime_type = RuntimeType.coerce(runtime)
        if delta not in DELTA_MODES:
            raise PolicyError(f"unknown delta mode {delta!r}; expected one of "
                              + ", ".join(DELTA_MODES))
        if audit not in AUDIT_LEVELS:
            raise PolicyError(f"unknown audit level {audit!r}; expected one of "
                              + ", ".join(AUDIT_LEVELS))
        self.delta = delta
        self.audit_level = audit
        self.preset, self.policy = build_policy(permissions, preset, default, policy)
        self.env: Dict[str, str] = dict(env or {})
        _env_pairs(self.env)
        self.network = network
        self.native_args = list(native_args)
        self._lock = threading.Lock()
        self.runtime = Runtime(binary, agentfense_config)
        #: After ``close`` with ``delta="commit"``: what was applied and what conflicted.
        self.commit_report: Optional[Dict[str, Any]] = None
        #: The :class:`~agentfense.SandboxClient` codebase it runs over, if any.
        self.codebase_id: Optional[str] = None
        self._state = "created"  # created -> running <-> stopped -> closed
        self._policy_file: Optional[str] = None
        self._ran = False
        self._created = False
        self._container: Optional[str] = None
        if self.runtime_type is RuntimeType.DOCKER:
            self.image = image or os.environ.get("AGENTFENSE_IMAGE")
            if not self.image:
                raise SandboxError("RuntimeType.DOCKER needs an image: pass image=... or set "
                                   "AGENTFENSE_IMAGE (it needs /bin/sh and `sleep`)")
            self.docker = docker or os.environ.get("AGENTFENSE_DOCKER") or \
                shutil.which("docker") or "docker"
            self.docker_runtime = docker_runtime
            self.docker_args = list(docker_args)
            self._id: Optional[str] = None
        else:
            self.image = None
            self._id = sandbox_id or "afsb-" + uuid.uuid4().hex[:16]

    @classmethod
    def from_local(
        cls,
        path: PathLike,
        permissions: Optional[Sequence[Rule]] = None,
        preset: Optional[str] = DEFAULT_PRESET,
        runtime: Union[RuntimeType, str] = RuntimeType.NATIVE,
        image: Optional[str] = None,
        delta: str = "keep",
        audit: str = "all",
        **kwargs: Any,
    ) -> "Sandbox":
        """A sandbox over the host directory ``path`` (started by ``with`` or the first
        :meth:`run`).

        - ``permissions``: rule dicts ``{"pattern", "permission", "type", "priority"}``; when
          given they are the policy, and paths no rule covers do not exist (``default``
          ``none``; pass ``default=`` to change it). Patterns are relative to the workspace
          root: ``/src/**`` is ``/workspace/src/**``.
        - ``preset``: used when no ``permissions`` are given (``agent-safe``, ``read-only``,
          ``full-access``, ``development``, ``view-only``); given explicitly together with
          ``permissions``, the rules are added to the preset's.
        - ``runtime``: :class:`RuntimeType` ``NATIVE`` (default) or ``DOCKER``.
        - ``image``: the Docker image (``DOCKER`` only; default ``$AGENTFENSE_IMAGE``); it
          must have ``/bin/sh`` and ``sleep``.
        - ``delta``: what happens to the sandbox's writes at close: ``keep``, ``commit``,
          ``discard``, or ``off`` (no delta: writes go straight to ``path``).
        - ``audit``: ``all``, ``write``, ``deny`` or ``off``.

        Other keywords: ``default`` (level of uncovered paths), ``policy`` (a whole policy,
        used as is), ``sandbox_id`` (``NATIVE``: reuse an id and its kept delta), ``env``
        (environment of every command), ``binary`` (the ``agentfense-runc`` to use),
        ``agentfense_config`` (the administrator's settings file), ``docker`` (the docker
        client), ``docker_runtime`` (the runtime's name in Docker, ``agentfense``),
        ``docker_args`` (more ``docker create`` arguments), ``native_args`` (more
        ``agentfense-runc sandbox`` arguments, e.g. ``["--ro-bind", "/opt/tool"]``),
        ``network`` (native: ``none``, the default, loopback only, or ``host``; Docker: any
        ``--network`` value, default Docker's bridge).
        """
        return cls(path, permissions=permissions, preset=preset, runtime=runtime, image=image,
                   delta=delta, audit=audit, **kwargs)

    # --- identity and state -----------------------------------------------------------------

    @property
    def id(self) -> Optional[str]:
        """The sandbox's id in the runtime (its state is
        ``/var/lib/agentfense/containers/<id>/``): Docker's full container id (known once
        created), or the ``--id`` of ``agentfense-runc sandbox``."""
        return self._id

    @property
    def status(self) -> str:
        """``created``, ``running``, ``stopped`` or ``closed``."""
        return self._state

    def __repr__(self) -> str:
        return (f"Sandbox(id={self._id!r}, path={self.path!r}, "
                f"runtime={self.runtime_type.value}, status={self._state})")

    def __enter__(self) -> "Sandbox":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _validate(self) -> None:
        if not os.path.isdir(self.path):
            raise SandboxError(f"{self.path} is not a directory")
        self.runtime.check_policy(self.policy, self.preset)

    def create(self) -> "Sandbox":
        """Validates the policy (raising :class:`PolicyError`) and, for Docker, creates the
        container (``docker create``), which gives the sandbox its id. Nothing runs yet."""
        if self._state == "closed":
            raise SandboxError("the sandbox is closed")
        if self._state != "created" or self._created:
            return self
        self._validate()
        if self.runtime_type is RuntimeType.DOCKER:
            self._docker_create()
        else:
            self._write_policy_file()
        self._created = True
        return self

    def start(self) -> "Sandbox":
        """Creates the sandbox if needed and starts it (Docker: ``docker start``; the runtime
        mounts the fence then, and refuses a bad policy). A stopped sandbox starts again with
        its delta as it left it."""
        if self._state == "closed":
            raise SandboxError("the sandbox is closed")
        if self._state == "running":
            return self
        self.create()
        if self.runtime_type is RuntimeType.DOCKER:
            self._docker_start()
        self._state = "running"
        return self

    def stop(self) -> None:
        """Stops the sandbox without settling anything it will need again: Docker stops the
        container (the fence is unmounted, the delta kept for the next :meth:`start`);
        native has nothing running between commands."""
        if self._state != "running":
            return
        if self.runtime_type is RuntimeType.DOCKER and self._container:
            p = self._docker(["stop", "--time", "0", self._container])
            if p.returncode != 0:
                raise SandboxError(_text(p.stderr).strip(), command=p.args,
                                   stderr=_text(p.stderr), exit_code=p.returncode)
        self._state = "stopped"

    def close(self) -> None:
        """Tears the sandbox down and settles its delta per ``delta``. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        try:
            if self.runtime_type is RuntimeType.DOCKER:
                if self._container:
                    p = self._docker(["rm", "-f", self._container])
                    err = _text(p.stderr)
                    if p.returncode != 0 and "No such container" not in err:
                        raise SandboxError(err.strip() or "docker rm failed", command=p.args,
                                           stderr=err, exit_code=p.returncode)
            if self._ran and self.delta == "commit":
                self.commit_report = self.runtime.commit(self._id) if self._id else None
            elif self._ran and self.delta == "discard" and \
                    self.runtime_type is RuntimeType.NATIVE:
                self._native_discard()
        finally:
            if self._policy_file:
                shutil.rmtree(os.path.dirname(self._policy_file), ignore_errors=True)
                self._policy_file = None

    # --- running commands -------------------------------------------------------------------

    def run(self, cmd: Command, timeout: Optional[float] = None,
            env: Optional[Mapping[str, str]] = None,
            stdin: Optional[Union[str, bytes]] = None) -> ExecResult:
        """Runs ``cmd`` in the workspace (``/workspace``, the working directory): a string
        goes to ``sh -c``, a list is the argument vector. Its output and exit status are
        returned, whatever the status; a sandbox that cannot run it raises
        :class:`SandboxError`. ``timeout`` (seconds): the whole command (every process it
        started) is killed and :class:`CommandTimeout` raised. ``env``: more environment
        variables for this command. ``stdin``: text or bytes fed to it (else it reads
        nothing)."""
        if self._state == "closed":
            raise SandboxError("the sandbox is closed")
        if self._state != "running":
            self.start()
        merged = {**self.env, **(env or {})}
        if self.runtime_type is RuntimeType.DOCKER:
            return self._docker_run(cmd, timeout, merged, stdin)
        # One sandbox id runs one command at a time (the runtime refuses a second).
        with self._lock:
            return self._native_run(cmd, timeout, merged, stdin)

    exec = run

    # --- audit and delta --------------------------------------------------------------------

    def _need_id(self) -> str:
        if not self._id:
            raise SandboxError("the sandbox has not been created yet")
        return self._id

    def audit(self, decision: Optional[str] = None) -> List[Dict[str, Any]]:
        """The audit trail: one dict per record (``ts``, ``seq``, ``event``; accesses add
        ``op``, ``path`` as the sandbox sees it, ``decision`` allow/deny/hidden, ``rule``,
        ``pid``, ``uid``...). ``decision`` filters access records. Records are written
        asynchronously: the last command's may take a moment to appear."""
        return self.runtime.audit(self._need_id(), decision)

    def audit_summary(self, latest_run_only: bool = False) -> Dict[str, Any]:
        """What the sandbox read, wrote, created, deleted, renamed, listed, was refused
        (``refused``) and probed (hidden paths asked for: ``probed``), and which granted rules
        it never used (``untouched``), over every command it ran (every run under its id with
        the same policy). ``latest_run_only``: the runtime's own summary of its latest run (a
        native sandbox makes one run per command; a Docker one, one per start)."""
        if latest_run_only:
            return self.runtime.audit_summary(self._need_id())
        return self.runtime.session_summary(self._need_id())

    def audit_verify(self) -> bool:
        """Whether the audit trail's hash chain is intact."""
        return self.runtime.audit_verify(self._need_id())[0]

    def diff(self) -> List[Dict[str, str]]:
        """What the sandbox changed: ``[{"kind": "A"|"C"|"D", "path": "/workspace/..."}]``."""
        return self.runtime.diff(self._need_id())

    def commit(self) -> Dict[str, Any]:
        """Applies the kept delta to the host directory; returns ``{"added", "changed",
        "deleted", "conflicts"}`` (a path the host changed meanwhile is a conflict: the host's
        version stays, the sandbox's stays in the delta). Only once nothing runs: after
        :meth:`close` (Docker: the runtime refuses while the container exists) or, native,
        between commands."""
        return self.runtime.commit(self._need_id())

    def export(self, path: PathLike) -> None:
        """Writes the delta to ``path`` as an OCI image layer tar."""
        self.runtime.export(self._need_id(), path)

    # --- native -----------------------------------------------------------------------------

    def _write_policy_file(self) -> None:
        if self.policy is None or self._policy_file:
            return
        d = tempfile.mkdtemp(prefix="agentfense-policy-")
        f = os.path.join(d, "policy.json")
        with open(f, "w") as fh:
            json.dump(self.policy, fh)
        self._policy_file = f

    def _native_args(self, argv: Sequence[str], delta: str,
                     env: Optional[Mapping[str, str]] = None) -> List[str]:
        rest = ["--id", self._need_id()]
        if self._policy_file:
            rest += ["--policy", self._policy_file]
        else:
            rest += ["--preset", str(self.preset)]
        rest += ["--delta", delta, "--audit", self.audit_level]
        if self.network:
            rest += ["--network", self.network]
        for pair in _env_pairs(env or {}):
            rest += ["--env", pair]
        rest += [*self.native_args, self.path, "--", *argv]
        return self.runtime.command(["sandbox"], *rest)

    def _native_run(self, cmd: Command, timeout: Optional[float], env: Mapping[str, str],
                    stdin: Optional[Union[str, bytes]]) -> ExecResult:
        # commit and discard settle once, at close: every run keeps (or writes through).
        delta = "off" if self.delta == "off" else "keep"
        args = self._native_args(_argv(cmd), delta, env)
        data = _input(stdin)
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE if data is not None else
                                    subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise SandboxError(f"agentfense-runc not found at {self.runtime.binary}",
                               command=args) from None
        self._ran = True
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self._native_kill(proc)
            raise CommandTimeout(f"command timed out after {timeout} s: {cmd}",
                                 timeout=float(timeout or 0), stdout=_text(out),
                                 stderr=_text(err), command=args) from None
        except BaseException:
            self._native_kill(proc)
            raise
        rc = _exit_code(proc.returncode)
        stderr = _text(err)
        self._raise_native_failure(rc, stderr, args)
        return ExecResult(_text(out), stderr, rc, time.monotonic() - t0, cmd)

    def _raise_native_failure(self, rc: int, stderr: str, args: List[str]) -> None:
        """The sandbox itself failed (not the command): ``agentfense-runc sandbox`` exits 125
        with ``agentfense-runc sandbox: MESSAGE`` as the last line of its standard error (or,
        failing earlier, its ``time=... level=error msg=...`` line). 126 and 127 (the command
        cannot be run, does not exist) are the command's status, as in a shell."""
        if rc == 0 or rc in (126, 127):
            return
        lines = stderr.rstrip("\n").splitlines()
        last = lines[-1] if lines else ""
        msg = None
        if rc == 125 and last.startswith(_SANDBOX_PREFIX):
            msg = last[len(_SANDBOX_PREFIX):]
        else:
            m = _RUNTIME_ERROR.match(last)
            if m:
                msg = m.group(1).replace('\\"', '"').replace("\\\\", "\\")
        if msg is None:
            return
        low = msg.lower()
        policy = any(w in low for w in ("polic", "preset", "rule ", "--delta", "--audit"))
        cls = PolicyError if policy else SandboxError
        raise cls(msg, command=args, stderr=stderr, exit_code=rc)

    def _native_kill(self, proc: "subprocess.Popen[bytes]"):
        """Ends a native command and everything it started: the runtime first (SIGTERM, so
        that it tears its fence down), then the whole process group."""
        try:
            os.kill(proc.pid, signal.SIGTERM)  # passed on; SIGKILL 2 s later if still there
        except ProcessLookupError:
            pass
        try:
            return proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()

    def _native_discard(self) -> None:
        args = self._native_args(["true"], "discard")
        p = subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        if p.returncode != 0:
            err = _text(p.stderr)
            raise SandboxError(err.strip() or "discarding the delta failed", command=args,
                               stderr=err, exit_code=p.returncode)

    # --- docker -----------------------------------------------------------------------------

    def _docker(self, args: Sequence[str], timeout: float = 120,
                input: Optional[bytes] = None) -> "subprocess.CompletedProcess[bytes]":
        try:
            return subprocess.run([self.docker, *args], capture_output=True, timeout=timeout,
                                  input=input)
        except FileNotFoundError:
            raise SandboxError(f"docker client not found ({self.docker})") from None

    def _docker_create(self) -> None:
        env = {"AGENTFENSE_WORKSPACE": WORKSPACE,
               # commit is done by the SDK at close (with a report), so the runtime keeps.
               "AGENTFENSE_DELTA": "keep" if self.delta == "commit" else self.delta,
               "AGENTFENSE_AUDIT": self.audit_level}
        if self.policy is not None:
            env["AGENTFENSE_POLICY"] = json.dumps(self.policy, separators=(",", ":"))
        else:
            env["AGENTFENSE_PRESET"] = str(self.preset)
        args = ["create", "--runtime", self.docker_runtime, "--label", "io.agentfense.sdk=1",
                "-v", f"{self.path}:{WORKSPACE}", "-w", WORKSPACE]
        for k, v in {**env, **self.env}.items():
            args += ["-e", f"{k}={v}"]
        if self.network:
            args += ["--network", self.network]
        args += [*self.docker_args, str(self.image), "sleep", "infinity"]
        p = self._docker(args, timeout=300)
        if p.returncode != 0:
            err = _text(p.stderr)
            raise SandboxError(err.strip(), command=p.args, stderr=err,
                               exit_code=p.returncode)
        self._container = _text(p.stdout).strip().splitlines()[-1]
        self._id = self._container

    def _docker_start(self) -> None:
        assert self._container
        p = self._docker(["start", self._container], timeout=300)
        if p.returncode != 0:
            err = _text(p.stderr)
            cls = SandboxError
            if "agentfense: AGENTFENSE_" in err and any(
                    w in err for w in ("POLICY", "PRESET", "rule ", "DELTA", "AUDIT")):
                cls = PolicyError
            if self._state == "created":
                # Never leave a container that could not start behind.
                self._docker(["rm", "-f", self._container])
                self._container = None
                self._created = False
            raise cls(_docker_error(err), command=p.args, stderr=err, exit_code=p.returncode)
        self._ran = True  # the runtime has fenced it: there is a delta to settle at close

    def _docker_run(self, cmd: Command, timeout: Optional[float], env: Mapping[str, str],
                    stdin: Optional[Union[str, bytes]]) -> ExecResult:
        assert self._container
        data = _input(stdin)
        token = uuid.uuid4().hex
        args = [self.docker, "exec"]
        if data is not None:
            args.append("-i")
        args += ["-e", f"AFSDK_EXEC_TOKEN={token}"]
        for pair in _env_pairs(env):
            args += ["-e", pair]
        args += [self._container, *_argv(cmd)]
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE if data is not None else
                                    subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise SandboxError(f"docker client not found ({self.docker})") from None
        self._ran = True
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self._docker_kill(proc, token)
            raise CommandTimeout(f"command timed out after {timeout} s: {cmd}",
                                 timeout=float(timeout or 0), stdout=_text(out),
                                 stderr=_text(err), command=args) from None
        except BaseException:
            self._docker_kill(proc, token)
            raise
        rc = _exit_code(proc.returncode)
        stderr = _text(err)
        if rc != 0 and stderr.startswith(("Error response from daemon:",
                                          "Error: No such container")):
            raise SandboxError(stderr.strip(), command=args, stderr=stderr, exit_code=rc)
        return ExecResult(_text(out), stderr, rc, time.monotonic() - t0, cmd)

    def _docker_kill(self, proc: "subprocess.Popen[bytes]", token: str):
        """Kills every process of one ``docker exec`` (found by the token in its environment),
        then the client."""
        if not _kill_by_token(token):
            # Not allowed to read other users' /proc/PID/environ: kill from inside.
            script = ('for p in /proc/[0-9]*; do if grep -q "AFSDK_EXEC_TOKEN=$0" '
                      '"$p/environ" 2>/dev/null; then kill -9 "${p#/proc/}"; fi; done')
            self._docker(["exec", self._container or "", "sh", "-c", script, token],
                         timeout=30)
        try:
            return proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()


def _docker_error(err: str) -> str:
    """The runtime's own words in an engine's error (``... OCI runtime create failed:
    agentfense: ...: unknown``), else the whole message."""
    for line in err.splitlines():
        for marker in ("OCI runtime create failed: ", "OCI runtime start failed: "):
            if marker in line:
                msg = line.split(marker, 1)[1].strip()
                return msg[:-len(": unknown")] if msg.endswith(": unknown") else msg
    return err.strip()


def _kill_by_token(token: str) -> bool:
    """SIGKILLs the host's processes whose environment holds ``AFSDK_EXEC_TOKEN=token``;
    whether the search could read them all (else: maybe some were not seen)."""
    needle = f"AFSDK_EXEC_TOKEN={token}".encode()
    complete = True
    for _ in range(3):  # processes may fork while we look
        found = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read()
            except PermissionError:
                complete = False
                continue
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found += 1
                try:
                    os.kill(int(name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            break
    return complete
