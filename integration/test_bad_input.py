"""Malformed and hostile fencing requests, through the engines (SPEC §2, §3: "a policy that
does not parse, names an unknown preset or level, or has an invalid pattern is refused: the
container is not created, the error says what and where. Never fail open.").

Every case of the table is tried through Docker (environment form: Docker 20.10 has no
--annotation) and through containerd (`ctr run --annotation`). For each: the engine fails,
its error carries the runtime's own one-line message (`agentfense: ...`) naming the key and
what is wrong; the container's command never ran (it would create a file in a bind-mounted
directory that is never fenced); and no fence mount or daemon is left.

Values the command line cannot carry (NUL bytes, more than the kernel's 128 KiB per
argument) go through the Docker API (as `docker run` sends them) and through `ctr run
--config` (a whole OCI spec), so they still reach the runtime through the engine.
"""

import http.client
import json
import socket
import uuid
from dataclasses import dataclass, field

import pytest

from conftest import BIN, CTR, CTR_IMAGE, CTR_NS, DOCKER, IMAGE, export_rootfs, sh, unique
from test_fence import no_leftovers

KEYS = ("policy", "preset", "policy-name", "workspace", "delta", "audit")
# Longest value passed on a command line (the kernel's limit is 128 KiB per argument).
ARGV_MAX = 100_000
MB = 1 << 20


def env_name(key):
    return "AGENTFENSE_" + key.upper().replace("-", "_")


def annotation_name(key):
    return "agentfense.io/" + key


@dataclass
class Case:
    """A fencing request and the fragments its refusal must contain. Keys are SPEC §2's
    (`policy`, ..., or an unknown one), or (annotation, variable) pairs given as written. In
    `expect`, `{policy}` etc. stand for the key as the engine's form names it, `{key}` for the
    first key, and `{unknown}` for "unknown annotation" / "unknown environment variable"."""
    id: str
    settings: list
    expect: list
    engines: tuple = ("docker", "ctr")
    marks: list = field(default_factory=list)


def policy(rules):
    return json.dumps(rules)


def rule(pattern="**", permission="read", **kw):
    return {"pattern": pattern, "permission": permission, **kw}


P = "{policy}: "
R0 = "{policy}: rule 0: "
PRESETS = "expected one of agent-safe, read-only, full-access, development, view-only"
NAME_RULE = "a name (never a path) is 1 to 128 letters"

CASES = [
    # ---- the policy document: JSON that does not parse, or is not a policy
    Case("json-truncated", [("policy", '[{"pattern": "**", ')], [P + "invalid JSON: EOF while parsing"]),
    Case("json-empty", [("policy", "")], [P + "invalid JSON: EOF while parsing a value"]),
    Case("json-trailing", [("policy", "[] []")], [P + "invalid JSON: trailing characters"]),
    Case("json-single-quotes", [("policy", "[{'pattern': '**'}]")], [P + "invalid JSON: key must be a string"]),
    Case("json-scalar", [("policy", '"read-only"')], [P + "a policy is a JSON array of rules or an object", "not a string"]),
    Case("json-null", [("policy", "null")], [P + "a policy is a JSON array of rules or an object", "not null"]),
    Case("json-duplicate-key", [("policy", '[{"pattern": "**", "permission": "none", "permission": "write"}]')],
         [P + "invalid JSON: duplicate", "permission"]),
    Case("json-deep-nesting", [("policy", "[" * 100_000)], [P + "invalid JSON: recursion limit exceeded"]),
    Case("rule-not-object", [("policy", '["**"]')], [R0 + "expected an object", "not a string"]),
    Case("rule-unknown-field", [("policy", policy([rule(perms="write")]))],
         [R0 + 'unknown field "perms"; expected one of pattern, permission, type, priority']),
    Case("rule-missing-permission", [("policy", '[{"pattern": "**"}]')], [R0 + 'missing field "permission"']),
    Case("rule-missing-pattern", [("policy", '[{"permission": "read"}]')], [R0 + 'missing field "pattern"']),
    Case("object-unknown-field", [("policy", '{"rules": [], "extends": "agent-safe"}')],
         [P + 'unknown field "extends" in the policy object']),
    Case("object-rules-not-array", [("policy", '{"rules": {"pattern": "**"}}')],
         [P + "rules: expected an array of rules, not an object"]),
    Case("two-bad-rules-both-reported", [("policy", policy([rule("a["), rule(permission="rw")]))],
         [R0 + 'invalid pattern "a["', P + 'rule 1: unknown permission "rw"']),
    # ---- huge values (through the Docker API and `ctr run --config`)
    Case("huge-10MB-pattern", [("policy", policy([rule("a" * (10 * MB))]))],
         [R0 + f"pattern is {10 * MB} bytes long; at most 4096 are allowed"]),
    Case("huge-100k-rules", [("policy", policy([rule(f"/p{i}") for i in range(100_000)]))],
         [P + "the policy has 100000 rules; at most 10000 are allowed"]),
    Case("huge-10MB-garbage", [("policy", "[" + "x" * (10 * MB))], [P + "invalid JSON: expected value at line 1 column 2"]),
    Case("huge-10MB-nesting", [("policy", "[" * (10 * MB))], [P + "invalid JSON: recursion limit exceeded"]),
    # ---- NUL bytes: as JSON escapes (any engine), raw (Docker API, ctr --config)
    Case("nul-in-pattern", [("policy", '[{"pattern": "a\\u0000b", "permission": "read"}]')],
         [R0 + 'invalid pattern "a\\u{0}b": contains a NUL byte']),
    Case("nul-after-policy", [("policy", policy([rule()]) + "\0" + policy([rule(permission="write")]))],
         [P + "invalid JSON: trailing characters"]),
    Case("nul-in-preset", [("preset", "read-only\0")], ['{preset}: unknown preset "read-only\\u{0}"']),
    Case("nul-in-policy-name", [("policy-name", "agent\0safe")], ['{policy_name}: invalid policy name "agent\\u{0}safe"']),
    Case("nul-in-workspace", [("preset", "read-only"), ("workspace", "/workspace\0/x")],
         ['{workspace}: "/workspace\\u{0}/x" contains a NUL byte']),
    Case("nul-in-delta", [("preset", "read-only"), ("delta", "keep\0")], ['{delta}: unknown delta mode "keep\\u{0}"']),
    # ---- unknown keys: never ignored, even next to a valid request
    Case("unknown-key", [("bogus", "1")], ['{unknown} "{key}"']),
    Case("unknown-key-with-valid-preset", [("preset", "read-only"), ("bogus", "1")], ['{unknown} "{bogus}"']),
    Case("typo-key", [("policyname", "x")], ['{unknown} "{key}"']),
    Case("wrong-case-key", [(("agentfense.io/Preset", "AGENTFENSE_Preset"), "read-only")], ['{unknown} "{key}"']),
    # ---- policy names are names, never paths
    Case("name-dotdot-path", [("policy-name", "../../etc/passwd")], ['{policy_name}: invalid policy name "../../etc/passwd"', NAME_RULE]),
    Case("name-absolute", [("policy-name", "/etc/passwd")], ['{policy_name}: invalid policy name "/etc/passwd"', NAME_RULE]),
    Case("name-with-slash", [("policy-name", "a/b")], ['{policy_name}: invalid policy name "a/b"', NAME_RULE]),
    Case("name-empty", [("policy-name", "")], ['{policy_name}: invalid policy name ""', NAME_RULE]),
    Case("name-dotdot", [("policy-name", "..")], ['{policy_name}: invalid policy name ".."']),
    Case("name-hidden-file", [("policy-name", ".agent")], ['{policy_name}: invalid policy name ".agent"']),
    Case("name-too-long", [("policy-name", "a" * 129)], ["{policy_name}: invalid policy name", NAME_RULE]),
    Case("name-not-installed", [("policy-name", "no-such-policy")],
         ["{policy_name}: cannot read the administrator's policy \"no-such-policy\""]),
    # ---- presets
    Case("preset-unknown", [("preset", "agent-unsafe")], ['{preset}: unknown preset "agent-unsafe"; ' + PRESETS]),
    Case("preset-wrong-case", [("preset", "Agent-Safe")], ['{preset}: unknown preset "Agent-Safe"']),
    Case("preset-empty", [("preset", "")], ['{preset}: unknown preset ""']),
    Case("preset-list", [("preset", "agent-safe,full-access")], ['{preset}: unknown preset "agent-safe,full-access"']),
    Case("preset-unknown-in-policy", [("policy", '{"preset": "nope", "rules": []}')], [P + 'unknown preset "nope"']),
    # ---- patterns
    Case("glob-unclosed-class", [("policy", policy([rule("a[")]))], [R0 + 'invalid pattern "a["']),
    Case("glob-unclosed-alternates", [("policy", policy([rule("{a,b")]))], [R0 + 'invalid pattern "{a,b"']),
    Case("glob-trailing-backslash", [("policy", policy([rule("a\\")]))], [R0 + 'invalid pattern "a\\\\"']),
    Case("glob-empty", [("policy", policy([rule("")]))], [R0 + "empty pattern"]),
    Case("glob-dotdot", [("policy", policy([rule("../x")]))], [R0 + 'invalid pattern "../x"']),
    Case("directory-dotdot", [("policy", policy([rule("/a/../b", type="directory")]))],
         [R0 + 'invalid pattern "/a/../b": a directory pattern cannot contain ".."']),
    Case("pattern-too-long", [("policy", policy([rule("a" * 5000)]))], [R0 + "pattern is 5000 bytes long; at most 4096"]),
    # ---- levels, types, priorities
    Case("level-rw", [("policy", policy([rule(permission="rw")]))],
         [R0 + 'unknown permission "rw"; expected one of none, view, read, write']),
    Case("level-upper-case", [("policy", policy([rule(permission="WRITE")]))], [R0 + 'unknown permission "WRITE"']),
    Case("level-empty", [("policy", policy([rule(permission="")]))], [R0 + 'unknown permission ""']),
    Case("level-number", [("policy", policy([rule(permission=3)]))], [R0 + "permission: expected a string", "not a number"]),
    Case("default-level", [("policy", '{"preset": "read-only", "default": "all"}')], [P + 'default: unknown permission "all"']),
    Case("type-unknown", [("policy", policy([rule(type="symlink")]))], [R0 + 'unknown type "symlink"; expected one of glob, directory, file']),
    Case("priority-string", [("policy", policy([rule(priority="high")]))], [R0 + "priority: expected an integer, not a string"]),
    Case("priority-fraction", [("policy", policy([rule(priority=1.5)]))], [R0 + "priority: 1.5 is not an integer"]),
    Case("priority-overflow", [("policy", '[{"pattern": "**", "permission": "read", "priority": 9223372036854775808}]')],
         [R0 + "priority: 9223372036854775808 is not an integer"]),
    # ---- sources that contradict each other (a policy with a preset is fine: SPEC §2)
    # (docker, ctr): the environment form takes one policy source only (an image's ENV must
    # not add to the user's), annotations say what contradicts what.
    Case("preset-and-policy-name", [("preset", "read-only"), ("policy-name", "team")],
         [("{preset} and {policy_name} are both given in the environment; give one of them",
           "{preset} and {policy_name} are both given; give one of them")]),
    Case("policy-preset-vs-preset", [("policy", '{"preset": "read-only"}'), ("preset", "full-access")],
         [("{policy} and {preset} are both given in the environment; give one of them",
           '{policy} names preset "read-only" but {preset} is "full-access"; give one preset')]),
    Case("workspace-without-policy", [("workspace", "/workspace")],
         ["{workspace} given but no {policy}, {preset} or {policy_name}: fencing is off without a policy"]),
    Case("delta-without-policy", [("delta", "discard")], ["{delta} given but no {policy}"]),
    Case("audit-without-policy", [("audit", "off")], ["{audit} given but no {policy}"]),
    Case("annotation-and-env", [(("agentfense.io/preset", None), "read-only"), ((None, "AGENTFENSE_PRESET"), "full-access")],
         ["fencing is requested both by annotations (agentfense.io/preset) and by environment variables "
          "(AGENTFENSE_PRESET); use one or the other"], engines=("ctr",)),
    # Docker keeps the last of two -e with one name; ctr passes both.
    Case("env-twice", [((None, "AGENTFENSE_PRESET"), "read-only"), ((None, "AGENTFENSE_PRESET"), "full-access")],
         ["environment variable AGENTFENSE_PRESET is given more than once"], engines=("ctr",)),
    # ---- workspaces
    Case("workspace-relative", [("preset", "read-only"), ("workspace", "workspace")], ['{workspace}: "workspace" is not an absolute path']),
    Case("workspace-dotdot", [("preset", "read-only"), ("workspace", "/workspace/../etc")], ['{workspace}: "/workspace/../etc" must not contain ".."']),
    Case("workspace-bare-dotdot", [("preset", "read-only"), ("workspace", "..")], ['{workspace}: ".." is not an absolute path']),
    Case("workspace-empty", [("preset", "read-only"), ("workspace", "")], ['{workspace}: empty path in the list ""']),
    Case("workspace-empty-item", [("preset", "read-only"), ("workspace", "/workspace,,/data")], ["{workspace}: empty path in the list"]),
    Case("workspace-root", [("preset", "read-only"), ("workspace", "//")], ['{workspace}: the container\'s root "/" cannot be a workspace']),
    Case("workspace-twice", [("preset", "read-only"), ("workspace", "/workspace,/workspace/")], ['{workspace}: "/workspace" is listed twice']),
    Case("workspace-nested", [("preset", "read-only"), ("workspace", "/workspace,/workspace/sub")],
         ['{workspace}: "/workspace" and "/workspace/sub" are nested']),
    Case("workspace-too-many", [("preset", "read-only"), ("workspace", ",".join(f"/w{i}" for i in range(33)))],
         ["{workspace}: more than 32 workspaces"]),
    Case("workspace-proc", [("preset", "read-only"), ("workspace", "/proc")],
         ["/proc is the destination of a mount that is not a bind mount"]),
    # ---- delta and audit
    Case("delta-unknown", [("preset", "read-only"), ("delta", "maybe")],
         ['{delta}: unknown delta mode "maybe"; expected one of keep, commit, discard, off']),
    Case("delta-empty", [("preset", "read-only"), ("delta", "")], ['{delta}: unknown delta mode ""']),
    Case("delta-upper-case", [("preset", "read-only"), ("delta", "KEEP")], ['{delta}: unknown delta mode "KEEP"']),
    Case("audit-unknown", [("preset", "read-only"), ("audit", "verbose")],
         ['{audit}: unknown audit level "verbose"; expected one of off, deny, write, all']),
    Case("audit-empty", [("preset", "read-only"), ("audit", "")], ['{audit}: unknown audit level ""']),
    Case("audit-number", [("preset", "read-only"), ("audit", "0")], ['{audit}: unknown audit level "0"']),
]


# ------------------------------------------------------------------ driving the engines


def names(key, engine):
    """The name `key` has in `engine`'s form (None: the case gives it only in the other)."""
    if isinstance(key, tuple):
        ann, env = key
        return (ann if ann is not None else env) if engine == "ctr" else env
    return annotation_name(key) if engine == "ctr" else env_name(key)


def split_settings(settings, engine):
    """(annotations, env) for `engine`: Docker has only the environment form."""
    ann, env = [], []
    for key, value in settings:
        if isinstance(key, tuple) and engine == "ctr":
            (ann if key[0] is not None else env).append((key[0] or key[1], value))
        elif engine == "ctr":
            ann.append((annotation_name(key), value))
        else:
            env.append((key[1] if isinstance(key, tuple) else env_name(key), value))
    return ann, env


def expected(case, engine):
    labels = {k.replace("-", "_"): names(k, engine) for k in (*KEYS, "bogus")}
    labels["key"] = names(case.settings[0][0], engine)
    labels["unknown"] = "unknown annotation" if engine == "ctr" else "unknown environment variable"
    out = []
    for e in case.expect:
        if isinstance(e, tuple):
            e = e[0] if engine == "docker" else e[1]
        for k, v in labels.items():
            e = e.replace("{" + k + "}", v)
        out.append(e)
    return out


def needs_spec_file(settings):
    return any("\0" in v or len(v) > ARGV_MAX for _, v in settings)


class DockerAPI(http.client.HTTPConnection):
    """Docker's API on its Unix socket (what `docker run` talks to)."""

    def __init__(self):
        super().__init__("localhost", timeout=300)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/var/run/docker.sock")


def docker_api(method, url, body=None):
    c = DockerAPI()
    try:
        c.request(method, url, body=None if body is None else json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def run_docker(settings, repo, mark):
    """`docker run --runtime agentfense` (the API for values argv cannot carry): (ok, error)."""
    _, env = split_settings(settings, "docker")
    name = unique("bad")
    if not needs_spec_file(settings):
        args = [DOCKER, "run", "--rm", "--name", name, "--runtime", "agentfense"]
        for k, v in env:
            args += ["-e", f"{k}={v}"]
        args += ["-v", f"{repo}:/workspace", "-v", f"{mark}:/mark", IMAGE, "touch", "/mark/ran"]
        try:
            p = sh(args, timeout=120)
        finally:
            sh([DOCKER, "rm", "-f", name])
        return p.returncode == 0, p.stderr
    status, body = docker_api("POST", f"/containers/create?name={name}", {
        "Image": IMAGE, "Cmd": ["touch", "/mark/ran"], "Env": [f"{k}={v}" for k, v in env],
        "HostConfig": {"Runtime": "agentfense", "Binds": [f"{repo}:/workspace", f"{mark}:/mark"]},
    })
    assert status == 201, (status, body[:2000])
    try:
        status, body = docker_api("POST", f"/containers/{name}/start")
    finally:
        docker_api("DELETE", f"/containers/{name}?force=1")
    if status == 204:
        return True, ""
    return False, json.loads(body)["message"] if body.startswith("{") else body


def run_ctr(ctr_engine, settings, repo, mark, spec_dir, rootfs):
    """`ctr run --annotation ... --runc-binary agentfense-runc` (`--config` with a whole OCI
    spec for values argv cannot carry): (ok, error)."""
    ann, env = split_settings(settings, "ctr")
    cid = unique("bad")
    base = [CTR, "-a", ctr_engine, "-n", CTR_NS, "run", "--rm", "--runtime", "io.containerd.runc.v2",
            "--runc-binary", BIN]
    if not needs_spec_file(settings):
        args = list(base)
        for k, v in ann:
            args += ["--annotation", f"{k}={v}"]
        for k, v in env:
            args += ["--env", f"{k}={v}"]
        args += ["--mount", f"type=bind,src={repo},dst=/workspace,options=rbind:rw",
                 "--mount", f"type=bind,src={mark},dst=/mark,options=rbind:rw",
                 CTR_IMAGE, cid, "touch", "/mark/ran"]
    else:
        spec = json.loads((spec_dir / "config.json").read_text())
        spec["root"] = {"path": str(rootfs), "readonly": True}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["touch", "/mark/ran"]
        spec["process"]["env"] += [f"{k}={v}" for k, v in env]
        spec["mounts"] += [
            {"destination": "/workspace", "type": "bind", "source": str(repo), "options": ["rbind", "rw"]},
            {"destination": "/mark", "type": "bind", "source": str(mark), "options": ["rbind", "rw"]},
        ]
        spec["annotations"] = dict(ann)
        path = mark.parent / f"spec-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(spec))
        args = [*base, "--config", path, cid]
    try:
        p = sh(args, timeout=120)
    finally:
        sh([CTR, "-a", ctr_engine, "-n", CTR_NS, "containers", "rm", cid])
    return p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def ctr_bundle(ctr_engine, tmp_path_factory):
    """A spec template and the test image's rootfs, for `ctr run --config`."""
    d = tmp_path_factory.mktemp("ctr-spec")
    sh([BIN, "spec", "--bundle", d], check=True)
    return d, export_rootfs(d / "rootfs")


@pytest.fixture
def dirs(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".env").write_text("SECRET=1\n")
    mark = tmp_path / "mark"
    mark.mkdir()
    return repo, mark


def attempt(engine, settings, dirs, request):
    repo, mark = dirs
    if engine == "docker":
        request.getfixturevalue("docker_engine")
        request.getfixturevalue("image")
        return run_docker(settings, repo, mark)
    spec_dir, rootfs = request.getfixturevalue("ctr_bundle")
    return run_ctr(request.getfixturevalue("ctr_engine"), settings, repo, mark, spec_dir, rootfs)


def params():
    return [pytest.param(c, engine, id=f"{c.id}-{engine}", marks=c.marks)
            for c in CASES for engine in c.engines]


# ------------------------------------------------------------------ the table


@pytest.mark.parametrize("case,engine", params())
def test_bad_input_is_refused(case, engine, dirs, request):
    ran, err = attempt(engine, case.settings, dirs, request)
    repo, mark = dirs
    assert not ran, f"{case.id}: the engine ran the container"
    # The runtime's message, as the engine shows it: one line, short, naming what is wrong.
    lines = [line for line in err.splitlines() if "agentfense: " in line]
    assert len(lines) == 1, f"expected one line with the runtime's message; stderr:\n{err[:4000]}"
    line = lines[0]
    assert "OCI runtime create failed" in line, line
    assert len(err) < 4096, f"{len(err)} bytes of error output: {err[:500]}..."
    for want in expected(case, engine):
        assert want in line, f"{want!r} not in {line!r}"
    assert not (mark / "ran").exists(), "the container's command ran"
    assert (repo / ".env").read_text() == "SECRET=1\n"
    no_leftovers()


@pytest.mark.parametrize("engine", ["docker", "ctr"])
def test_policy_with_preset_is_accepted(engine, dirs, request):
    """The control: a valid request (a preset with rules added: SPEC §2; in one inline policy,
    as the environment form wants one policy source) does run the command, so the cases above
    fail because of their input alone."""
    settings = [("policy", json.dumps({"preset": "read-only",
                                       "rules": [rule("/extra/**", "write", priority=10)]}))]
    ran, err = attempt(engine, settings, dirs, request)
    assert ran, err
    assert (dirs[1] / "ran").exists()
    no_leftovers()


# ------------------------------------------------------------------ the image's own environment

LOOSEN = json.dumps([rule("**/*", "write", priority=1000)])
IMAGE_ENVS = {
    # The fence moves to a directory of the image; the user's bind mount is not fenced.
    "redirects-the-workspace": ["ENV AGENTFENSE_WORKSPACE=/srv/app"],
    # Rules added to the user's preset grant everything; writes go to the host; no audit.
    "loosens-the-policy": [f"ENV AGENTFENSE_POLICY='{LOOSEN}'", "ENV AGENTFENSE_DELTA=commit",
                           "ENV AGENTFENSE_AUDIT=off"],
}


# The environment form cannot tell the user's -e from the image's ENV (the engine merges them):
# the runtime refuses two policy sources in the environment, and a workspace list that leaves
# the directory mounted at /workspace unfenced.
@pytest.mark.parametrize("what", sorted(IMAGE_ENVS))
def test_image_env_cannot_change_the_users_fence(docker_engine, image, dirs, what):
    """The user asks for agent-safe over its repository (Docker 20.10: -e); the image it runs
    sets AGENTFENSE_* variables of its own. The user's fence must hold: refused, or `.env`
    hidden and the repository untouched."""
    repo, _ = dirs
    name = f"agentfense-test/hostile-{what}:latest"
    cid = sh([DOCKER, "create", image, "true"], check=True).stdout.strip()
    try:
        sh([DOCKER, "commit", *(a for c in IMAGE_ENVS[what] for a in ("-c", c)), cid, name], check=True)
    finally:
        sh([DOCKER, "rm", cid])
    try:
        p = sh([DOCKER, "run", "--rm", "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=agent-safe",
                "-v", f"{repo}:/workspace", name, "sh", "-c",
                "cat /workspace/.env; echo changed > /workspace/.env"])
    finally:
        sh([DOCKER, "rmi", name])
    no_leftovers()
    assert "SECRET" not in p.stdout, f"the image's ENV exposed a file agent-safe hides: {p.stdout!r}"
    assert (repo / ".env").read_text() == "SECRET=1\n", "the image's ENV let the container change the host"
