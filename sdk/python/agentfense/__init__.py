"""agentfense: run commands over a fenced workspace with ``agentfense-runc``.

Each path of the workspace is ``none`` (does not exist), ``view`` (listed, not readable),
``read`` or ``write`` (copy-on-write: the host directory is not changed while the sandbox
runs); every access is audited::

    from agentfense import Sandbox, RuntimeType

    with Sandbox.from_local("./repo", preset="agent-safe") as sandbox:
        print(sandbox.run("ls -la").stdout)      # no .env, no *.key
    print(sandbox.audit_summary()["probed"])

Runtimes: ``RuntimeType.NATIVE`` (``agentfense-runc sandbox``, no Docker) and
``RuntimeType.DOCKER`` (a container of Docker runtime ``agentfense``).
"""

from .client import Codebase, SandboxClient
from .errors import AgentfenseError, CommandTimeout, PolicyError, SandboxError
from .runtime import Runtime, find_binary
from .sandbox import ExecResult, RuntimeType, Sandbox, build_policy

__version__ = "0.1.0"

__all__ = [
    "AgentfenseError",
    "Codebase",
    "CommandTimeout",
    "ExecResult",
    "PolicyError",
    "Runtime",
    "RuntimeType",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "build_policy",
    "find_binary",
]
