"""Exceptions raised by the SDK. Each carries the runtime's own message."""

from typing import Optional, Sequence


class AgentfenseError(Exception):
    """Base class of every error the SDK raises.

    ``message`` is the runtime's (or Docker's) message when there is one; ``stderr`` the whole
    standard error of the failing command, ``command`` its argument vector.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Optional[Sequence[str]] = None,
        stderr: str = "",
        exit_code: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.command = list(command) if command is not None else None
        self.stderr = stderr
        self.exit_code = exit_code


class PolicyError(AgentfenseError, ValueError):
    """The policy (rules, preset, default level) or a fencing setting (delta mode, audit level)
    was refused: nothing was created and nothing ran. The runtime never fails open."""


class SandboxError(AgentfenseError):
    """The sandbox could not be created, started, used or removed (the runtime, Docker or the
    binary failed), or it is in the wrong state for the call (e.g. ``run`` after ``close``)."""


class CommandTimeout(AgentfenseError):
    """A command ran longer than its ``timeout``: the whole process tree was killed.

    ``stdout`` and ``stderr`` hold what it printed before it was killed; ``timeout`` the limit
    in seconds.
    """

    def __init__(self, message: str, *, timeout: float, stdout: str = "", stderr: str = "",
                 command: Optional[Sequence[str]] = None) -> None:
        super().__init__(message, command=command, stderr=stderr)
        self.timeout = timeout
        self.stdout = stdout
