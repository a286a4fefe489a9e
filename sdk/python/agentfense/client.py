"""Many sandboxes over shared codebases: the multi-tenant form of the API."""

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .errors import SandboxError
from .sandbox import DEFAULT_PRESET, Command, ExecResult, PathLike, Rule, RuntimeType, Sandbox

DEFAULT_STATE_DIR = "/var/lib/agentfense"


@dataclass
class Codebase:
    """A shared base directory (``path``) that sandboxes fence; it is never changed by them
    (each sandbox writes into its own delta) unless a delta is committed."""

    id: str
    name: str
    owner_id: str
    path: str
    created_at: float


class SandboxClient:
    """Codebases (shared base directories under ``<state_dir>/codebases/<id>``) and the
    sandboxes over them. Each sandbox has its own policy and its own copy-on-write delta, so
    one base serves many tenants whose writes never meet::

        client = SandboxClient()
        base = client.create_codebase(name="base", owner_id="platform")
        client.upload_directory(base.id, "./repo")
        sb = client.create_sandbox(base.id, permissions=[...])
        client.start_sandbox(sb.id)
        print(client.exec(sb.id, "ls").stdout)
        client.destroy_sandbox(sb.id)

    ``state_dir``: where codebases live (default ``/var/lib/agentfense``, next to the
    runtime's own state). ``runtime`` and ``image``: the defaults of :meth:`create_sandbox`.
    Other keywords (``binary``, ``docker``, ...) go to every :class:`Sandbox`. Sandboxes
    belong to the client object (``list_sandboxes`` lists this client's); codebases persist.
    The client is a context manager: leaving it destroys its sandboxes.
    """

    def __init__(self, state_dir: Optional[PathLike] = None,
                 runtime: Union[RuntimeType, str] = RuntimeType.NATIVE,
                 image: Optional[str] = None, **sandbox_options: Any) -> None:
        self.state_dir = os.path.abspath(os.fspath(state_dir or DEFAULT_STATE_DIR))
        self.codebase_dir = os.path.join(self.state_dir, "codebases")
        self.runtime = RuntimeType.coerce(runtime)
        self.image = image
        self.sandbox_options = sandbox_options
        self._sandboxes: Dict[str, Sandbox] = {}
        self._codebase_of: Dict[str, str] = {}

    def __enter__(self) -> "SandboxClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Destroys every sandbox of this client (codebases stay)."""
        errors = []
        for sid in list(self._sandboxes):
            try:
                self.destroy_sandbox(sid)
            except SandboxError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # --- codebases --------------------------------------------------------------------------

    def _meta(self, codebase_id: str) -> str:
        if not codebase_id or "/" in codebase_id or codebase_id.startswith("."):
            raise SandboxError(f"invalid codebase id {codebase_id!r}")
        return os.path.join(self.codebase_dir, codebase_id + ".json")

    def create_codebase(self, name: str, owner_id: str = "") -> Codebase:
        """A new, empty codebase (fill it with :meth:`upload_directory`)."""
        cid = "cb-" + uuid.uuid4().hex[:16]
        path = os.path.join(self.codebase_dir, cid)
        os.makedirs(self.codebase_dir, mode=0o700, exist_ok=True)
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)
        cb = Codebase(cid, name, owner_id, path, time.time())
        with open(self._meta(cid), "w") as f:
            json.dump(asdict(cb), f)
        return cb

    def get_codebase(self, codebase_id: str) -> Codebase:
        """A codebase by id."""
        try:
            with open(self._meta(codebase_id)) as f:
                return Codebase(**json.load(f))
        except FileNotFoundError:
            raise SandboxError(f"no codebase {codebase_id}") from None

    def list_codebases(self) -> List[Codebase]:
        """Every codebase under ``state_dir``."""
        try:
            names = sorted(os.listdir(self.codebase_dir))
        except FileNotFoundError:
            return []
        return [self.get_codebase(n[:-5]) for n in names if n.endswith(".json")]

    def upload_directory(self, codebase_id: str, path: PathLike, dest: str = "") -> None:
        """Copies the tree under ``path`` into the codebase (at ``dest``, a path relative to
        its root; default the root), keeping modes, owners, times, links and extended
        attributes (``cp -a``)."""
        cb = self.get_codebase(codebase_id)
        src = os.path.abspath(os.fspath(path))
        if not os.path.isdir(src):
            raise SandboxError(f"{src} is not a directory")
        target = os.path.normpath(os.path.join(cb.path, dest.lstrip("/")))
        if target != cb.path and not target.startswith(cb.path + os.sep):
            raise SandboxError(f"{dest!r} is outside the codebase")
        os.makedirs(target, exist_ok=True)
        cp = shutil.which("cp")
        if cp:
            p = subprocess.run([cp, "-a", "--", os.path.join(src, "."), target],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SandboxError(p.stderr.strip() or "copy failed", command=p.args,
                                   stderr=p.stderr, exit_code=p.returncode)
        else:
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)

    def delete_codebase(self, codebase_id: str) -> None:
        """Removes a codebase that no sandbox of this client uses."""
        if codebase_id in self._codebase_of.values():
            raise SandboxError(f"codebase {codebase_id} is used by a sandbox")
        cb = self.get_codebase(codebase_id)
        shutil.rmtree(cb.path)
        os.unlink(self._meta(codebase_id))

    # --- sandboxes --------------------------------------------------------------------------

    def create_sandbox(self, codebase_id: str, permissions: Optional[Sequence[Rule]] = None,
                       preset: Optional[str] = DEFAULT_PRESET,
                       runtime: Optional[Union[RuntimeType, str]] = None,
                       image: Optional[str] = None, **options: Any) -> Sandbox:
        """A sandbox over the codebase with its own policy and delta (not started). Its
        ``id`` is the runtime's (Docker: the container's full id). Options as for
        :meth:`Sandbox.from_local` (``delta``, ``audit``, ``default``, ``env``...)."""
        cb = self.get_codebase(codebase_id)
        kw = {**self.sandbox_options, **options}
        rt = RuntimeType.coerce(runtime or self.runtime)
        sb = Sandbox(cb.path, permissions=permissions, preset=preset, runtime=rt,
                     image=image or self.image, **kw)
        sb.create()
        assert sb.id
        sb.codebase_id = codebase_id
        self._sandboxes[sb.id] = sb
        self._codebase_of[sb.id] = codebase_id
        return sb

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        """This client's sandbox by id (or a unique prefix of it)."""
        if sandbox_id in self._sandboxes:
            return self._sandboxes[sandbox_id]
        hits = [s for k, s in self._sandboxes.items() if k.startswith(sandbox_id)]
        if len(hits) != 1:
            raise SandboxError(f"no sandbox {sandbox_id}" if not hits
                               else f"sandbox id {sandbox_id} is ambiguous")
        return hits[0]

    def start_sandbox(self, sandbox_id: str) -> Sandbox:
        """Starts the sandbox (again, after :meth:`stop_sandbox`)."""
        return self.get_sandbox(sandbox_id).start()

    def exec(self, sandbox_id: str, command: Command, timeout: Optional[float] = None,
             env: Optional[Mapping[str, str]] = None,
             stdin: Optional[Union[str, bytes]] = None) -> ExecResult:
        """Runs a command in the sandbox (see :meth:`Sandbox.run`)."""
        return self.get_sandbox(sandbox_id).run(command, timeout=timeout, env=env, stdin=stdin)

    def stop_sandbox(self, sandbox_id: str) -> None:
        """Stops the sandbox; its delta stays for the next start."""
        self.get_sandbox(sandbox_id).stop()

    def destroy_sandbox(self, sandbox_id: str) -> None:
        """Removes the sandbox and settles its delta per its ``delta`` mode (``keep``: the
        delta and audit trail stay in the runtime's state directory)."""
        sb = self.get_sandbox(sandbox_id)
        try:
            sb.close()
        finally:
            self._sandboxes.pop(sb.id or sandbox_id, None)
            self._codebase_of.pop(sb.id or sandbox_id, None)

    def list_sandboxes(self) -> List[Sandbox]:
        """This client's sandboxes (``id``, ``status``, ``codebase_id``, ``path``...)."""
        return list(self._sandboxes.values())
