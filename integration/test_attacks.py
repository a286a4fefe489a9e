"""Adversarial tests: an agent inside a fenced container tries to learn anything about, read or
change what the fence hides or protects, or anything outside the workspace on the host.

Each scenario runs one long-lived container (Docker as root and as uid 1000, a subset through
containerd's `ctr`) and fires attempts at it with `attack` (integration/attack.c: one system
call per attempt, everything it got back printed) or with the shell. Every attempt checks:

- nothing leaked: no byte of a hidden file, of a view-only file's content or of a canary
  outside the workspace appears in any output, and hidden names are never listed;
- the host is unchanged: a digest of the base (names, types, modes, owners, times, contents)
  before and after, the access times of hidden files, and a canary directory outside the base
  watched with inotify;
- the errno SPEC §4 gives (for a hidden path whether or not it exists: the same answer).

The module prints `attacks: N attempts, 0 leaks` at the end.
"""

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import BIN, CTR, CTR_IMAGE, CTR_NS, DOCKER, IMAGE, REPO, figure, sh, unique, wait_for

TOKEN = uuid.uuid4().hex[:10]
SECRET = f"SECRET{TOKEN}"      # in every hidden file (and hidden xattr value)
VIEWONLY = f"VIEWONLY{TOKEN}"  # in view-level files: listed, never read
CANARY = f"HOSTCANARY{TOKEN}"  # outside the workspace on the host
MARKERS = (SECRET, VIEWONLY, CANARY)
FUSE_MAGIC = "65735546"
T0 = 1_000_000_000  # atime/mtime of every base entry (old enough for relatime to update atime)

LONG_VISIBLE = "n" * 255
LONG_HIDDEN = ".env" + "e" * 251          # 255 bytes, hidden by **/.env*
LONG_HIDDEN_ABSENT = ".env" + "e" * 250 + "f"

POLICY = [
    {"pattern": "/write/**", "permission": "write"},
    {"pattern": "/read/**", "permission": "read"},
    {"pattern": "/view/**", "permission": "view"},
    {"pattern": "/none/**", "permission": "none"},
    {"pattern": "/vault/**", "permission": "none"},
    {"pattern": "/vault/pub/granted.txt", "permission": "read", "type": "file", "priority": 10},
    {"pattern": "**/.env*", "permission": "none", "priority": 100},
    {"pattern": "**/secrets/**", "permission": "none", "priority": 100},
    {"pattern": "**/*.key", "permission": "none", "priority": 100},
]

# Names that must never appear in a listing.
HIDDEN_NAMES = {b".env", b".env.local", b".env\nx", LONG_HIDDEN.encode(), b"id.key", b"secrets",
                b"none", b"toplevel.txt", b"private.txt", b"other.txt", b"bad\xff"}

STATS = {"attempts": 0, "leaks": 0}


@pytest.fixture(scope="module", autouse=True)
def attack_summary():
    yield
    figure(f"attacks: {STATS['attempts']} attempts, {STATS['leaks']} leaks")


@pytest.fixture(scope="session")
def attack(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "attack"
    sh(["gcc", "-static", "-O2", "-Wall", "-o", out, REPO / "integration" / "attack.c"], check=True)
    return out


# ------------------------------------------------------------------ encoding, leaks


def enc(s):
    b = s.encode() if isinstance(s, str) else s
    return "".join(chr(c) if 0x21 <= c <= 0x7E and c != 0x25 else f"%{c:02x}" for c in b)


def dec(s):
    return re.sub(rb"%([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), s.encode())


HOST_SHADOW = []
try:
    HOST_SHADOW = [l for l in Path("/etc/shadow").read_text().splitlines() if l.startswith("root:")]
except OSError:
    pass


def leaks_in(text, where):
    """Markers found in `text` (str or bytes); each one counts as a leak."""
    t = text if isinstance(text, str) else text.decode("latin-1")
    found = [m for m in MARKERS if m in t]
    found += ["host /etc/shadow" for l in HOST_SHADOW if l and l in t]
    if found:
        STATS["leaks"] += len(found)
        return [f"LEAK in {where}: {m}" for m in found]
    return []


# ------------------------------------------------------------------ host side


def digest(root):
    """Per path under root: type, mode, owner, size, mtime, inode, xattrs and a hash of the
    content or link target, read with O_NOATIME (taking it leaves atimes alone), never
    following links."""
    snap = {}
    root = Path(root)
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            paths.append(Path(dirpath) / n)
    for p in paths:
        st = p.lstat()
        h = hashlib.sha256()
        try:
            for x in sorted(os.listxattr(p, follow_symlinks=False)):
                h.update(x.encode() + b"=" + os.getxattr(p, x, follow_symlinks=False))
        except OSError:
            pass
        if p.is_symlink():
            h.update(os.fsencode(os.readlink(p)))
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY | os.O_NOATIME)
            try:
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
            finally:
                os.close(fd)
        rel = bytes(p.relative_to(root)) if p != root else b"."
        snap[rel] = (f"{st.st_mode:o}", st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino,
                     h.hexdigest()[:16])
    return snap


def snapshot_diff(before, after):
    out = []
    for k in sorted(set(before) | set(after)):
        if before.get(k) != after.get(k):
            out.append(f"{k!r}: {before.get(k)} -> {after.get(k)}")
    return out


def atimes(paths):
    return {p: os.lstat(p).st_atime_ns for p in paths}


class Inotify:
    """Watches a directory (and the files in it) for any access at all."""

    IN_ALL_EVENTS = 0xFFF

    def __init__(self, *dirs):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        for d in dirs:
            wd = self.libc.inotify_add_watch(self.fd, str(d).encode(), self.IN_ALL_EVENTS)
            assert wd >= 0, ctypes.get_errno()

    def events(self):
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + 16 <= len(data):
            _wd, mask, _cookie, ln = [int.from_bytes(data[i + k:i + k + 4], "little") for k in (0, 4, 8, 12)]
            name = data[i + 16:i + 16 + ln].rstrip(b"\0")
            out.append((hex(mask), name))
            i += 16 + ln
        return out

    def close(self):
        os.close(self.fd)


def make_canary(root):
    """A directory outside every workspace, holding the canary."""
    root.mkdir()
    for n in ("c", "f1", ".env", "shadow"):
        (root / n).write_text(f"{CANARY} {n}\n")
        os.setxattr(root / n, "user.canary", CANARY.encode())
    os.setxattr(root, "user.canary", CANARY.encode())
    (root / "sub").mkdir()
    (root / "sub" / "c").write_text(f"{CANARY} sub\n")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (T0, T0), follow_symlinks=False)
    return root


def write(p, text, mode=0o644):
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.chmod(p, mode)


def finish_tree(root, uid=1000, gid=1000):
    """Owner, modes and old times for everything under root (hidden files' atimes then show
    whether anything ever read them)."""
    for p in [root, *sorted(root.rglob("*"), key=lambda p: -len(p.parts))]:
        os.chown(p, uid, gid, follow_symlinks=False)
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    for p in sorted([root, *root.rglob("*")], key=lambda p: -len(p.parts)):
        os.utime(p, (T0, T0), follow_symlinks=False)


def make_base(root, canary):
    """The workspace an agent attacks. Hidden files hold SECRET; view files VIEWONLY."""
    s = lambda tag: f"{SECRET} {tag}\n"  # noqa: E731
    write(root / "toplevel.txt", s("toplevel"))               # default none
    write(root / "none" / "secret", s("none"))
    write(root / "none" / "linked", "hardlinked-public\n")
    write(root / "vault" / "private.txt", s("vault"))
    write(root / "vault" / "pub" / "granted.txt", "granted\n")
    write(root / "vault" / "pub" / "other.txt", s("vault-other"))
    write(root / "read" / "f", "read-f\n")
    write(root / "read" / ".env", s("read-env"))
    write(root / "read" / "sub" / "g", "read-g\n")
    write(root / "view" / "f", f"{VIEWONLY} view-f\n")
    write(root / "view" / ".env", s("view-env"))
    w = root / "write"
    for n in ("f", "f2", "f3", "f4", "f5", "f6", "f7", "o1", "o2", "o3", "o4"):
        write(w / n, f"write-{n}\n")
    for n in (".env", ".env.local", "id.key", ".env\nx", LONG_HIDDEN):
        write(w / n, s("write " + n[:8]))
    write(w / os.fsdecode(b"bad\xff"), s("not utf-8"))
    write(w / "secrets" / "s", s("write-secrets"))
    write(w / LONG_VISIBLE, "long-visible\n")
    write(w / "sub" / "g", "write-sub-g\n")
    write(w / "nl\nname", "newline-visible\n")
    write(w / "odd\x01\x7f", "odd-visible\n")
    write(w / "hp1", "hardlinked pair\n")
    os.link(w / "hp1", w / "hp2")
    os.link(root / "none" / "linked", w / "hl")
    for name, target in [
        ("lnk_env", ".env"), ("lnk_chain1", "lnk_chain2"), ("lnk_chain2", "lnk_chain3"),
        ("lnk_chain3", ".env"), ("lnk_loop", "lnk_loop"), ("lnk_shadow", "/etc/shadow"),
        ("lnk_canary_abs", str(canary / "c")), ("lnk_canary_rel", "../../canary/c"),
        ("lnk_canary_dir", str(canary)), ("lnk_canary_dir_rel", "../../canary"),
        ("lnk_none", "../none/secret"), ("lnk_vault", "../vault/private.txt"),
        ("lnk_proc", "/proc/self/root/w/write/.env"), ("lnk_key", "id.key"),
    ]:
        os.symlink(target, w / name)
    # Twin directories: the same visible entries; `a` also holds hidden ones.
    for d in ("a", "b"):
        for n in ("x", "y", "z"):
            write(w / d / n, f"{d}-{n}\n")
        (w / d / "sub").mkdir()
    for n in (".env", ".env.local", "id.key"):
        write(w / "a" / n, s("a " + n))
    write(w / "a" / "secrets" / "s", s("a-secrets"))
    # A directory whose entries are all hidden: empty to the container.
    write(w / "onlyhidden" / ".env", s("onlyhidden"))
    write(w / "onlyhidden" / "x.key", s("onlyhidden key"))
    finish_tree(root)
    # Device nodes put there by the host: a null device and one shaped like our whiteouts.
    os.mknod(w / "hostnull", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(w / "hostwh", 0o600 | 0o020000, os.makedev(0, 0))
    for n in ("hostnull", "hostwh"):
        os.chown(w / n, 1000, 1000)
        os.utime(w / n, (T0, T0))
    os.utime(w, (T0, T0))
    # Attributes: a value at view level is content; one on a hidden file is a secret.
    os.setxattr(root / "view" / "f", "user.origin", VIEWONLY.encode())
    os.setxattr(root / "read" / "f", "user.origin", b"xattr-read")
    os.setxattr(w / ".env", "user.origin", SECRET.encode())
    os.utime(root / "view" / "f", (T0, T0))
    return root


def hidden_files(base):
    """Every base file a container must never read (their atimes must not move)."""
    out = []
    for p in Path(base).rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY | os.O_NOATIME)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
            if SECRET.encode() in data or VIEWONLY.encode() in data:
                out.append(p)
    return out


class Host:
    """What must not change on the host during a scenario."""

    def __init__(self, base, canary):
        self.base, self.canary = Path(base), Path(canary)
        self.hidden = hidden_files(base)
        self.hidden_atimes = atimes(self.hidden)
        self.base_digest = digest(base)
        self.canary_digest = digest(canary)
        self.canary_atimes = atimes([self.canary, *self.canary.rglob("*")])
        self.watch = Inotify(self.canary, self.canary / "sub")
        self.closed = False

    def problems(self):
        out = []
        changed = snapshot_diff(self.base_digest, digest(self.base))
        if changed:
            out.append("the base changed: " + "; ".join(changed[:20]))
        moved = [str(p) for p, t in atimes(self.hidden).items() if t != self.hidden_atimes[p]]
        if moved:
            out.append(f"hidden files were read on the host (atime moved): {moved}")
        ev = self.watch.events()
        if ev:
            out.append(f"the canary outside the workspace was touched: {ev[:10]}")
        changed = snapshot_diff(self.canary_digest, digest(self.canary))
        if changed:
            out.append("the canary outside the workspace changed: " + "; ".join(changed[:20]))
        moved = [str(p) for p, t in atimes(self.canary_atimes).items() if t != self.canary_atimes[p]]
        if moved:
            out.append(f"the canary was read (atime moved): {moved}")
        return out

    def close(self):
        if not self.closed:
            self.watch.close()
            self.closed = True


# ------------------------------------------------------------------ attempts


class A:
    """One attempt: `attack` op and arguments, what it must answer, and an optional check of
    the payload (returns a complaint or None)."""

    def __init__(self, op, *args, expect="ok", check=None):
        self.line = " ".join([op, *(enc(a) for a in args)])
        self.op = op
        self.expect = {expect} if isinstance(expect, str) else set(expect)
        self.check = check
        self.result = self.payload = None


def run_attack(prefix, attempts, where, out_dir=None):
    """Runs the attempts through `prefix + [/attack -a ...]`; returns the complaints.

    With `out_dir` (a host directory the container has at /out, outside the fence), the
    answers are written to a file there instead of stdout: `ctr run` has been seen to lose the
    end of a container's stdout on a loaded machine."""
    problems = []
    for i in range(0, len(attempts), 150):
        chunk = attempts[i:i + 150]
        cmd = ["/attack", "-a", *(a.line for a in chunk)]
        if out_dir is not None:
            res_file = Path(out_dir) / "answers"
            res_file.unlink(missing_ok=True)
            cmd = ["/bin/sh", "-c", '"$@" > /out/answers', "sh", *cmd]
        p = sh([*prefix, *cmd], timeout=120)
        if out_dir is not None:
            p = subprocess.CompletedProcess(p.args, p.returncode,
                                            res_file.read_text() if res_file.exists() else "",
                                            p.stdout + p.stderr)
        STATS["attempts"] += len(chunk)
        problems += leaks_in(p.stdout + p.stderr, where)
        lines = p.stdout.splitlines()
        if p.returncode != 0 or len(lines) != len(chunk):
            problems.append(f"{where}: attack exited {p.returncode}: {p.stderr[-2000:]}\n{p.stdout[-2000:]}")
            continue
        for a, l in zip(chunk, lines):
            head, _, rest = l.partition(" => ")
            res, _, payload = rest.partition(" ")
            a.result, a.payload = res, dec(payload)
            if head != a.line:
                problems.append(f"{where}: out of step: {head!r} vs {a.line!r}")
            if res not in a.expect:
                problems.append(f"{where}: `{a.line}`: expected {'|'.join(sorted(a.expect))}, "
                                f"got {res} {payload[:200]}")
            if a.op in ("ls", "getdents", "telldir", "seekdir", "listxattr", "llistxattr", "handles"):
                listed = listed_names(a.op, a.payload)
                bad = sorted(listed & HIDDEN_NAMES)
                if bad:
                    STATS["leaks"] += len(bad)
                    problems.append(f"LEAK in {where}: `{a.line}` lists hidden names {bad}")
                if a.op.endswith("listxattr") and b"agentfense" in a.payload:
                    STATS["leaks"] += 1
                    problems.append(f"LEAK in {where}: `{a.line}` lists our own attributes: {a.payload!r}")
            if a.check and res in a.expect:
                c = a.check(a.payload)
                if c:
                    problems.append(f"{where}: `{a.line}`: {c}")
    return problems


def listed_names(op, payload):
    names = set()
    for e in payload.split(b"/"):
        if not e:
            continue
        if op == "getdents":
            names.add(e.rsplit(b":", 3)[0])
        elif op == "telldir":
            names.add(e.rsplit(b"@", 1)[0])
        elif op == "seekdir":
            names.add(e.split(b":", 1)[1].rsplit(b":", 1)[0])
        elif op.endswith("listxattr"):
            names.update(e.split(b","))
        elif op == "handles":
            names.update(e.split(b":", 1)[-1].split(b","))
        else:
            names.add(e)
    return names


def has(text):
    t = text.encode() if isinstance(text, str) else text
    return lambda p: None if t in p else f"expected {t!r} in {p[:200]!r}"


def starts(text):
    t = text.encode()
    return lambda p: None if p.startswith(t) else f"expected {t!r} at the start of {p[:200]!r}"


def equals(text):
    t = text.encode() if isinstance(text, str) else text
    return lambda p: None if p == t else f"expected {t!r}, got {p[:200]!r}"


def names_are(*names):
    want = sorted(n.encode() for n in names)
    return lambda p: None if sorted(e for e in p.split(b"/") if e) == want else f"expected {want}, got {p!r}"


def field(payload, name):
    m = re.search(rb"(?:^| )" + name.encode() + rb"=(\S+)", payload)
    return m.group(1).decode() if m else None


def nlink1(p):
    return None if field(p, "nlink") == "1" else f"link count reveals other names: {p!r}"


# Twins: a hidden path that exists beside one the same rule hides that does not. Every
# operation must answer both the same way (hidden means absent).
TWINS = [
    # (existing hidden, absent twin, errno for creating there)
    ("/w/write/.env", "/w/write/.env.absent", "EACCES"),
    ("/w/write/.env.local", "/w/write/.env.nothere", "EACCES"),
    (b"/w/write/.env\nx", b"/w/write/.env\ny", "EACCES"),
    ("/w/write/" + LONG_HIDDEN, "/w/write/" + LONG_HIDDEN_ABSENT, "EACCES"),
    ("/w/write/id.key", "/w/write/nothere.key", "EACCES"),
    (b"/w/write/bad\xff", b"/w/write/bad\xfe", "EACCES"),
    ("/w/write/a/secrets", "/w/write/b/secrets", "EACCES"),
    ("/w/write/a/secrets/s", "/w/write/b/secrets/s", "ENOENT"),
    ("/w/write/a/.env", "/w/write/b/.env", "EACCES"),
    ("/w/none", "/w/nowhere", "EACCES"),
    ("/w/none/secret", "/w/nowhere/secret", "ENOENT"),
    ("/w/toplevel.txt", "/w/toplevel2.txt", "EACCES"),
    ("/w/vault/private.txt", "/w/vault/private2.txt", "EACCES"),
    ("/w/vault/pub/other.txt", "/w/vault/pub/other2.txt", "EACCES"),
    ("/w/read/.env", "/w/read/.env.absent", "EACCES"),
    ("/w/view/.env", "/w/view/.env.absent", "EACCES"),
    ("/w/write/onlyhidden/.env", "/w/write/b/.env.x", "EACCES"),
]


def twin_attempts(path, create_errno, n):
    """Every operation on a hidden (or hidden-and-absent) path: what SPEC §4 answers."""
    E, C = "ENOENT", create_errno
    return [
        A("stat", path, expect=E), A("lstat", path, expect=E), A("read", path, expect=E),
        A("opath", path, expect=E), A("readlink", path, expect=E),
        A("getxattr", path, "user.origin", expect=E), A("listxattr", path, expect=E),
        A("access", path, "f", expect=E), A("open", path, "wa", expect=E),
        A("open", path, "rt", expect=E), A("truncate", path, expect=E),
        A("chmod", path, "777", expect=E), A("utimes", path, expect=E),
        A("unlink", path, expect=E), A("rmdir", path, expect=E),
        A("rename", path, f"/w/write/stolen{n}", expect=E),
        A("link", path, f"/w/write/stolen{n}", expect=E),
        A("exchange", path, "/w/write/f7", expect=E), A("exchange", "/w/write/f7", path, expect=E),
        A("setxattr", path, "user.x", "1", expect=E), A("removexattr", path, "user.origin", expect=E),
        A("reopen", path, "r", expect=E), A("ls", path, expect=E),
        A("openat2", "/w", path[3:], "in_root", expect=E),
        A("open", path, "creat", expect=C), A("create", path, expect=C),
        A("mkdir", path, expect=C), A("symlink", "x", path, expect=C),
        A("mknod", path, "p", "0:0", expect=C), A("mknod", path, "c", "0:0", expect=("EPERM", C)),
        A("rename", "/w/write/f7", path, expect=C), A("noreplace", "/w/write/f7", path, expect=C),
        A("link", "/w/write/f7", path, expect=C),
    ]


def attempts_for(user, hostname, canary, full=True):
    """The attempt list (and the differential pairs checked after it runs)."""
    # (Base files belong to uid 1000, so for it as for root the fence, not the kernel's
    # ownership checks, answers most attempts: the same errnos for both.)
    att = []
    # -- hidden means absent: each twin pair must answer identically, as SPEC §4 says.
    twins = []
    for n, (hid, absent, c) in enumerate(TWINS if full else TWINS[:3]):
        x, y = twin_attempts(hid, c, n), twin_attempts(absent, c, n)
        twins.append((x, y))
        att += x + y
    # -- listings: no hidden name, offsets and sizes like a directory without them.
    for d in ("/w", "/w/write", "/w/write/a", "/w/write/b", "/w/vault", "/w/vault/pub",
              "/w/read", "/w/view", "/w/write/onlyhidden"):
        att += [A("ls", d), A("getdents", d), A("telldir", d), A("seekdir", d, "12")]
    att += [
        A("ls", "/w", check=names_are(".", "..", "read", "vault", "view", "write")),
        A("ls", "/w/vault", check=equals("./../pub/")),
        A("ls", "/w/vault/pub", check=equals("./../granted.txt/")),
        A("ls", "/w/write/onlyhidden", check=equals("./../")),
        A("stat", "/w/vault", check=has("size=4096")),
        A("read", "/w/vault/pub/granted.txt", check=equals("granted\n")),
        A("mkdir", "/w/vault/new", expect="EACCES"),
        A("create", "/w/vault/pub/new", expect="EACCES"),
        A("rename", "/w/vault/pub/granted.txt", "/w/write/g", expect="EACCES"),
        A("rmdir", "/w/vault/pub", expect="EACCES"),
        A("rmdir", "/w/write/onlyhidden"),   # empty to the container; hidden entries stay
        A("ls", "/w/write/onlyhidden", expect="ENOENT"),
        A("mkdir", "/w/write/onlyhidden"),
        A("ls", "/w/write/onlyhidden", check=equals("./../")),
        A("read", "/w/write/onlyhidden/.env", expect="ENOENT"),
        A("create", "/w/write/onlyhidden/.env", expect="EACCES"),
    ]
    # -- link counts, sizes, inode numbers.
    att += [
        A("stat", "/w/write/hl", check=nlink1), A("stat", "/w/write/hp1", check=nlink1),
        A("stat", "/w/write/a", check=nlink1), A("stat", "/w/write/b", check=nlink1),
        A("stat", "/w/write", check=nlink1),
        A("link", "/w/write/f4", "/w/write/f4-link"), A("stat", "/w/write/f4", check=nlink1),
        A("statfs", "/w", check=has("type=" + FUSE_MAGIC)),
        A("statfs", "/w/write/a"),
    ]
    inos = [A("create", "/w/write/ino1"), A("stat", "/w/write/.env", expect="ENOENT"),
            A("stat", "/w/write/.env.local", expect="ENOENT"), A("stat", "/w/write/id.key", expect="ENOENT"),
            A("create", "/w/write/ino2"), A("stat", "/w/write/ino1"), A("stat", "/w/write/ino2"),
            A("create", "/w/write/ino3"), A("stat", "/w/write/.env.q", expect="ENOENT"),
            A("stat", "/w/write/.env.r", expect="ENOENT"), A("stat", "/w/write/s.key", expect="ENOENT"),
            A("create", "/w/write/ino4"), A("stat", "/w/write/ino3"), A("stat", "/w/write/ino4")]
    att += inos
    # -- symlinks: to hidden names, chains, loops, the host, /proc.
    att += [
        A("read", "/w/write/lnk_env", expect="ENOENT"),
        A("readlink", "/w/write/lnk_env", check=equals(".env")),  # stored as written
        A("read", "/w/write/lnk_chain1", expect="ENOENT"),
        A("read", "/w/write/lnk_loop", expect="ELOOP"),
        A("read", "/w/write/lnk_shadow", expect="ENOENT"),
        A("read", "/w/write/lnk_canary_abs", expect="ENOENT"),
        A("read", "/w/write/lnk_canary_rel", expect="ENOENT"),
        A("ls", "/w/write/lnk_canary_dir/", expect="ENOENT"),
        A("read", "/w/write/lnk_canary_dir/c", expect="ENOENT"),
        A("read", "/w/write/lnk_canary_dir_rel/c", expect="ENOENT"),
        A("read", "/w/write/lnk_none", expect="ENOENT"),
        A("read", "/w/write/lnk_vault", expect="ENOENT"),
        A("read", "/w/write/lnk_proc", expect="ENOENT"),
        A("read", "/w/write/lnk_key", expect="ENOENT"),
        A("read_nofollow", "/w/write/lnk_env", expect="ELOOP"),
        A("open", "/w/write/lnk_env", "creat", expect="EACCES"),     # creating through a link
        A("open", "/w/write/lnk_key", "creat", expect="EACCES"),
        A("open", "/w/write/lnk_env", "wa", expect="ENOENT"),
        A("open", "/w/write/lnk_canary_rel", "creat", expect="ENOENT"),
        A("open", "/w/write/lnk_canary_abs", "wa", expect="ENOENT"),
        A("stat", "/w/write/lnk_canary_dir", expect="ENOENT"),
        A("lstat", "/w/write/lnk_canary_dir", check=has("mode=120777")),
        A("lgetxattr", "/w/write/lnk_env", "user.origin", expect="ENODATA"),
        # The daemon reads a link's own attributes, never its target's (the canary has some).
        A("lgetxattr", "/w/write/lnk_canary_abs", "user.canary", expect="ENODATA"),
        A("lgetxattr", "/w/write/lnk_canary_rel", "user.canary", expect="ENODATA"),
        A("lgetxattr", "/w/write/lnk_canary_dir", "user.canary", expect="ENODATA"),
        A("llistxattr", "/w/write/lnk_canary_abs", check=lambda p: "lists the target's" if b"canary" in p else None),
        A("llistxattr", "/w/write/lnk_canary_dir_rel", check=lambda p: "lists the target's" if b"canary" in p else None),
        # Changing a link (copied up as a link) never reaches its target.
        A("lchown", "/w/write/lnk_canary_abs", "1000", "1000"),
        A("lutimes", "/w/write/lnk_canary_rel"),
        A("lutimes", "/w/write/lnk_canary_dir"),
        A("lchown", "/w/write/lnk_canary_dir_rel", "0", "0", expect=("ok", "EPERM")),
        A("lsetxattr", "/w/write/lnk_canary_abs", "user.x", "1", expect="EPERM"),
        A("chmod", "/w/write/lnk_canary_abs", "777", expect="ENOENT"),   # follows, in the container
        A("getxattr", "/w/write/lnk_env", "user.origin", expect="ENOENT"),
        # Made in the container, pointing out of the workspace and at hidden names.
        A("symlink", "/etc/shadow", "/w/write/s_shadow"),
        A("read", "/w/write/s_shadow", expect="ENOENT"),
        A("symlink", str(canary / "c"), "/w/write/s_canary"),
        A("read", "/w/write/s_canary", expect="ENOENT"),
        A("symlink", "../../../../../../../.." + str(canary / "c"), "/w/write/s_canary2"),
        A("read", "/w/write/s_canary2", expect="ENOENT"),
        A("symlink", ".env", "/w/write/s_env"), A("read", "/w/write/s_env", expect="ENOENT"),
        A("symlink", "../none/secret", "/w/write/s_none"), A("read", "/w/write/s_none", expect="ENOENT"),
        A("symlink", "/proc/self/root/w/write/.env", "/w/write/s_proc"),
        A("read", "/w/write/s_proc", expect="ENOENT"),
        A("symlink", "/proc/1/root/w/write/.env", "/w/write/s_proc1"),
        A("read", "/w/write/s_proc1", expect=("ENOENT", "EACCES")),
        A("symlink", "s_loop2", "/w/write/s_loop1"), A("symlink", "s_loop1", "/w/write/s_loop2"),
        A("read", "/w/write/s_loop1", expect="ELOOP"),
        A("rename", "/w/write/s_env", "/w/write/.env", expect="EACCES"),
        A("readlink", "/w/write/s_env", check=equals(".env")),
    ]
    # -- .. and names.
    att += [
        A("chdir_read", "/w/write", "../none/secret", expect="ENOENT"),
        A("chdir_read", "/w/write/sub", "../.env", expect=("ENOENT", "ENOENT")),
        A("chdir_read", "/w/write/a/sub", "../../../vault/private.txt", expect="ENOENT"),
        A("fchdir_dotdot", "/w/write/a", "../../none/secret", expect="ENOENT"),
        A("read", "/w/write/../write/.env", expect="ENOENT"),
        A("read", "/w/write/a/../a/.env", expect="ENOENT"),
        A("read", "/w/../w/toplevel.txt", expect="ENOENT"),
        A("read", "/w/vault/pub/../private.txt", expect="ENOENT"),
        A("openat2", "/w/write", "../none/secret", "beneath", expect="EXDEV"),
        A("openat2", "/w/write", "../../none/secret", "in_root", expect="ENOENT"),
        A("openat2", "/w/write", "lnk_env", "beneath", expect="ENOENT"),
        A("openat2", "/w/write", "lnk_env", "no_symlinks", expect="ELOOP"),
        A("openat2", "/w/write", "lnk_canary_abs", "in_root", expect="ENOENT"),
        A("openat2", "/", "proc/self/root/w/write/.env", "no_magiclinks", expect="ELOOP"),
        A("openat2", "/", "proc/self/root/w/write/.env", "beneath", expect="EXDEV"),
        A("openat2", "/w", "read/f", "beneath,no_xdev", check=equals("read-f\n")),
        A("create", "/w/write/" + LONG_VISIBLE[:254] + "m"),
        A("create", "/w/write/" + "m" * 256, expect="ENAMETOOLONG"),
        A("stat", "/w/write/" + "m" * 256, expect="ENAMETOOLONG"),
        A("read", "/w/write/" + LONG_VISIBLE, check=equals("long-visible\n")),
        A("read", b"/w/write/nl\nname", check=equals("newline-visible\n")),
        A("read", b"/w/write/odd\x01\x7f", check=equals("odd-visible\n")),
        A("create", b"/w/write/nl\nname2"), A("create", b"/w/write/.env\n", expect="EACCES"),
        A("create", b"/w/write/.env\t", expect="EACCES"), A("create", b"/w/write/x\n.env"),
        A("create", b"/w/write/bad\x80", expect="EACCES"),
        A("tmpfile", "/w/write", "/w/write/.env", expect=("ENOTSUP", "EACCES")),
        A("tmpfile", "/w/read", "/w/read/t", expect=("ENOTSUP", "EACCES")),
        A("setflags", "/w/read/f", expect=("ENOTTY", "ENOTSUP", "EACCES", "EPERM")),
        A("create", "/w/write/secrets", expect="EACCES"), A("mkdir", "/w/write/sub/secrets", expect="EACCES"),
        A("create", "/w/write/new.key", expect="EACCES"),
    ]
    # -- renames across permission boundaries, onto hidden names, EXCHANGE, NOREPLACE.
    att += [
        A("rename", "/w/write/f", "/w/write/.env", expect="EACCES"),
        A("rename", "/w/write/f", "/w/write/a/.env", expect="EACCES"),
        A("rename", "/w/write/f", "/w/read/f", expect="EACCES"),
        A("rename", "/w/write/f", "/w/view/new", expect="EACCES"),
        A("rename", "/w/read/f", "/w/write/from-read", expect="EACCES"),
        A("rename", "/w/view/f", "/w/write/from-view", expect="EACCES"),
        A("rename", "/w/write/a", "/w/write/a-moved", expect="EXDEV"),   # base content
        A("rename", "/w/write/a/x", "/w/write/b/moved-x"),
        A("mkdir", "/w/write/nd"), A("create", "/w/write/nd/f"),
        A("rename", "/w/write/nd", "/w/write/a/secrets", expect="EACCES"),
        A("rename", "/w/write/nd", "/w/write/secrets", expect="EACCES"),
        A("rename", "/w/write/nd", "/w/write/x.key", expect="EACCES"),
        A("rename", "/w/write/nd", "/w/read/nd", expect="EACCES"),
        A("rename", "/w/write/nd", "/w/vault/nd", expect="EACCES"),
        A("rename", "/w/write/nd", "/w/write/nd2"),
        A("exchange", "/w/write/f2", "/w/write/.env", expect="ENOENT"),
        A("exchange", "/w/write/f2", "/w/read/f", expect="EACCES"),
        A("exchange", "/w/write/f2", "/w/view/f", expect="EACCES"),
        A("exchange", "/w/write/nd2", "/w/write/a/secrets", expect="ENOENT"),
        A("exchange", "/w/write/nd2", "/w/write/b", expect="EXDEV"),
        A("exchange", "/w/write/f2", "/w/write/f3"),
        A("read", "/w/write/f2", check=equals("write-f3\n")),
        A("noreplace", "/w/write/f2", "/w/write/.env", expect="EACCES"),
        A("noreplace", "/w/write/f2", "/w/write/f3", expect="EEXIST"),
        A("noreplace", "/w/write/f2", "/w/write/f2-new"),
        A("whiteout", "/w/write/f5", "/w/write/f5-wo", expect=("EINVAL", "EPERM")),
        A("stat", "/w/write/f5"),
        A("fd_after_rename", "/w/write/f6", "/w/write/f6-moved", "DATA",
          check=equals("rename=ok write=ok")),
        A("read", "/w/write/f6-moved", check=equals("write-f6\nDATA")),
        A("fd_after_rename", "/w/write/f6-moved", "/w/write/.env", "MORE",
          check=equals("rename=EACCES write=ok")),
        A("fd_after_rename", "/w/write/f6-moved", "/w/read/x", "MORE",
          check=equals("rename=EACCES write=ok")),
        A("read", "/w/write/.env", expect="ENOENT"),
        A("rdfd_after_rename", "/w/read/f", "/w/write/r2", check=starts("rename=EACCES write=EBADF read-f")),
        # A directory that looks empty (only hidden entries) can be replaced; they stay.
        A("mkdir", "/w/write/nd3"), A("create", "/w/write/nd3/mine"),
        A("rename", "/w/write/nd3", "/w/write/onlyhidden"),
        A("ls", "/w/write/onlyhidden", check=equals("./../mine/")),
        A("read", "/w/write/onlyhidden/.env", expect="ENOENT"),
    ]
    # -- hard links to hidden, read-only and view files.
    att += [
        A("link", "/w/write/.env", "/w/write/l1", expect="ENOENT"),
        A("link", "/w/read/f", "/w/write/l2", expect="EACCES"),
        A("link", "/w/view/f", "/w/write/l3", expect="EACCES"),
        A("link_opath", "/w/read/f", "/w/write/l4", expect=("EACCES", "ENOENT")),
        A("link_procfd", "/w/view/f", "/w/write/l5", expect=("EACCES", "ENOENT")),
        A("link", "/w/write/f", "/w/write/.env.l", expect="EACCES"),
        A("link", "/w/write/f", "/w/read/l", expect="EACCES"),
        A("stat", "/w/write/l2", expect="ENOENT"),
    ]
    # -- O_PATH, /proc/self/fd reopen, fchmod/fchown through descriptors.
    att += [
        A("opath", "/w/view/f", check=has("mode=100000")),
        A("reopen", "/w/view/f", "r", expect="EACCES"),
        A("reopen", "/w/view/f", "rw", expect="EACCES"),
        A("reopen", "/w/view/f", "wa", expect="EACCES"),
        A("reopen", "/w/read/f", "rw", expect="EACCES"),
        A("reopen", "/w/read/f", "rt", expect="EACCES"),
        A("reopen", "/w/read/f", "r", check=equals("read-f\n")),
        A("reopen", "/w/write/lnk_env", "r", expect="ENOENT"),
        A("fchmod", "/w/read/f", "777", expect="EACCES"),
        A("fchown", "/w/read/f", "1000", "1000", expect="EACCES"),
        A("fchown_opath", "/w/view/f", "1000", "1000", expect="EACCES"),
        A("fchown_opath", "/w/read/sub", "1000", "1000", expect="EACCES"),
        A("chmod", "/w/read/sub", "777", expect="EACCES"),
        A("chmod", "/w/view/f", "644", expect="EACCES"),
        A("utimes", "/w/read/f", expect="EACCES"), A("utimes", "/w/view/f", expect="EACCES"),
        A("fchmod", "/w/write/f3", "600"),
        A("stat", "/w/write/f3", check=has("mode=100600")),
    ]
    # -- a base file held open read-only, then unlinked or renamed over: changing it through
    #    the descriptor must not reach the base (the host digest checks that).
    att += [
        A("orphan_setattr", "/w/write/o1", "unlink", "4755", check=has("gone=ok")),
        A("orphan_setattr", "/w/write/o2", "/w/write/o3", "777", "1234", check=has("gone=ok")),
        A("orphan_chmod_path", "/w/write/o4", "6777", check=has("gone=ok")),
    ]
    # -- device nodes, FIFOs, sockets; whiteout-like devices.
    att += [
        A("mknod", "/w/write/dev0", "c", "0:0", expect="EPERM"),
        A("mknod", "/w/write/null", "c", "1:3", expect="EPERM"),
        A("mknod", "/w/write/loop", "b", "7:0", expect="EPERM"),
        A("unlink", "/w/write/f5"),
        A("mknod", "/w/write/f5", "c", "0:0", expect="EPERM"),  # a whiteout of our own?
        A("stat", "/w/write/f5", expect="ENOENT"),
        A("mknod", "/w/write/fifo", "p", "0:0"),
        A("mknod", "/w/read/fifo", "p", "0:0", expect="EACCES"),
        A("mknod", "/w/write/regular", "f", "0:0"),
        A("bind", "/w/write/sock"),
        A("bind", "/w/write/.env.sock", expect="EACCES"),
        A("bind", "/w/read/sock", expect="EACCES"),
    ]
    # -- host device nodes and sockets in the base; set-uid files made in the container.
    att += [
        A("read", "/w/write/hostnull", expect="EACCES"),
        A("open", "/w/write/hostnull", "wa", expect="EACCES"),
        A("chmod", "/w/write/hostnull", "666", expect=("EPERM", "EACCES")),
        A("stat", "/w/write/hostwh", check=has("rdev=0:0")),         # a device, not a whiteout
        A("read", "/w/write/hostwh", expect="EACCES"),
        A("ls", "/w/write", check=has("/hostwh/")),
        A("connect", "/w/write/host.sock", expect="ECONNREFUSED"),
        A("connect", "/w/write/.env.sock", expect="ENOENT"),
        A("bind", "/w/write/host.sock", expect="EADDRINUSE"),
    ]
    # -- extended attributes: ours, trusted, security, user at view/read.
    att += [
        A("setxattr", "/w/write/f", "trusted.agentfense.opaque", "y", expect="EPERM"),
        A("setxattr", "/w/write/b", "trusted.agentfense.opaque", "y", expect="EPERM"),
        A("getxattr", "/w", "trusted.agentfense.root", expect="ENODATA"),
        A("listxattr", "/w"), A("listxattr", "/w/write"), A("listxattr", "/w/write/b"),
        A("unlink", "/w/write/b/y"), A("rmdir", "/w/write/b/sub"), A("mkdir", "/w/write/b/sub"),
        A("getxattr", "/w/write/b/sub", "trusted.agentfense.opaque", expect="ENODATA"),
        A("listxattr", "/w/write/b/sub"),
        A("removexattr", "/w/write/b/sub", "trusted.agentfense.opaque", expect=("EPERM", "ENODATA")),
        A("getxattr", "/w/view/f", "user.origin", expect="EACCES"),
        A("listxattr", "/w/view/f", check=has("user.origin")),   # names are metadata
        A("getxattr", "/w/view/f", "security.capability", expect="ENODATA"),
        A("getxattr", "/w/read/f", "user.origin", check=equals("xattr-read")),
        A("setxattr", "/w/view/f", "user.x", "1", expect="EACCES"),
        A("setxattr", "/w/read/f", "user.x", "1", expect="EACCES"),
        A("fsetxattr", "/w/read/f", "user.x", "1", expect="EACCES"),
        A("removexattr", "/w/read/f", "user.origin", expect="EACCES"),
        A("setxattr", "/w/read/f", "security.test", "x", expect="EPERM"),   # needs CAP_SYS_ADMIN
        A("setxattr", "/w/read/f", "trusted.x", "1", expect="EPERM"),
        A("setxattr", "/w/write/f", "user.x", "1"),
        A("getxattr", "/w/write/f", "user.x", check=equals("1")),
    ]
    # -- mmap, O_TRUNC, truncate of protected files.
    att += [
        A("mmap_shared_w", "/w/read/f", expect="EACCES"),
        A("mprotect_w", "/w/read/f", expect="EACCES"),
        A("mmap_private_w", "/w/read/f"),
        A("mmap_read", "/w/read/f", check=equals("read-f\n")),
        A("mmap_read", "/w/view/f", expect="EACCES"),
        A("open", "/w/read/f", "rt", expect="EACCES"),
        A("open", "/w/read/f", "wt", expect="EACCES"),
        A("open", "/w/read/f", "rw", expect="EACCES"),
        A("open", "/w/view/f", "rt", expect="EACCES"),
        A("open", "/w/view/f", "creat", expect="EACCES"),
        A("truncate", "/w/read/f", expect="EACCES"),
        A("ftruncate", "/w/read/f", expect=("EINVAL", "EBADF")),
        A("read", "/w/read/f", check=equals("read-f\n")),
        A("mmap_rw", "/w/write/f4"),
        A("read", "/w/write/f4", check=starts("MAPPED")),
        A("open", "/w/write/hl", "wa"),          # hard-linked in the base to a hidden file
        A("read", "/w/write/hl", check=equals("hardlinked-public\nPWNED")),
    ]
    # -- names of the delta's own bookkeeping: ordinary files, changing nothing else.
    att += [
        A("create", "/w/write/.wh.f"), A("stat", "/w/write/f"),
        A("create", "/w/write/b/.wh.z"), A("stat", "/w/write/b/z"),
        A("create", "/w/write/a/.wh..wh..opq"), A("ls", "/w/write/a", check=has("/z/")),
        A("mkdir", "/w/write/.wh.a"), A("stat", "/w/write/a/z"),
        A("symlink", "f", "/w/write/.wh.f7"), A("read", "/w/write/f7", check=equals("write-f7\n")),
        A("mknod", "/w/write/.wh.f3", "p", "0:0"), A("stat", "/w/write/f3"),
        A("create", f"/w/write/.agentfense-commit-{hostname}"),
        A("create", "/w/write/.agentfense-commit-x"), A("stat", "/w/write/f"),
        A("create", "/w/write/.wh..wh.x"), A("create", "/w/write/.wh..env", expect="ok"),
        A("read", "/w/write/.env", expect="ENOENT"),
    ]
    # -- timing and the mount table.
    def no_host_paths(p):
        for bad in (os.fsencode(canary.parent), b"/var/lib/agentfense"):
            if bad in p:
                return f"the mount table names a host path: {p!r}"
        return None
    for _ in range(3):   # interleaved, so that neither gets the warmer daemon
        att += [A("timing", "/w/write/.env", "1000"), A("timing", "/w/write/.env.absent", "1000"),
                A("timing", "/w/write/nothere", "1000")]
    att += [A("read", "/proc/self/mountinfo", check=no_host_paths)]
    return att, twins, inos


def path_ino(path):
    """The inode number the fence gives a visible path (src/fence/nodes.rs path_ino): FNV-1a
    of the path, in [2^62, 2^63)."""
    h = 0xcbf29ce484222325
    for b in path.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return (h >> 2) | (1 << 62)


def differential(att, twins, inos, where):
    """Hidden vs absent, and a directory with hidden entries vs one without."""
    problems = []
    for x, y in twins:
        for a, b in zip(x, y):
            if (a.result, a.payload) != (b.result, b.payload):
                problems.append(f"{where}: hidden and absent differ: `{a.line}` -> {a.result} "
                                f"{a.payload!r} but `{b.line}` -> {b.result} {b.payload!r}")
    att_by_line = {a.line: a for a in att}
    timings = [a for a in att if a.op == "timing"]
    pick = lambda op, d: att_by_line[f"{op} {d}"].payload  # noqa: E731

    def no_ino(p):
        return re.sub(rb"ino=\d+", b"", p)

    if no_ino(pick("stat", "/w/write/a")) != no_ino(pick("stat", "/w/write/b")):
        problems.append(f"{where}: stat of a directory with hidden entries differs: "
                        f"{pick('stat', '/w/write/a')!r} vs {pick('stat', '/w/write/b')!r}")
    for op, arg in (("telldir", ""), ("seekdir", " 12")):
        a, b = pick(op, "/w/write/a" + arg), pick(op, "/w/write/b" + arg)
        if a != b:
            problems.append(f"{where}: {op} differs between a directory with hidden entries and "
                            f"one without: {a!r} vs {b!r}")
    ga, gb = pick("getdents", "/w/write/a"), pick("getdents", "/w/write/b")

    def shape(p, d):
        ents = [e.rsplit(b":", 3) for e in p.split(b"/") if e]
        named = [(n, off, t) for n, off, t, _ in ents]
        # An entry's inode number is a function of its own visible path and nothing else
        # (no counter that hidden entries or probes could move).
        odd = [n for n, _, _, i in ents if n not in (b".", b"..")
               and int(i) != path_ino(f"{d}/{n.decode()}")]
        return named, odd
    (na, odd_a), (nb, odd_b) = shape(ga, "/write/a"), shape(gb, "/write/b")
    if na != nb or odd_a or odd_b:
        problems.append(f"{where}: getdents (names, offsets, types, inode numbers) differ or "
                        f"carry more than the name: {ga!r} vs {gb!r} (odd: {odd_a} {odd_b})")
    ino = lambda a: int(field(a.payload, "ino") or -1)  # noqa: E731
    for a in inos:
        if a.op == "stat" and a.result == "ok":
            want = path_ino(a.line.split()[1][len("/w"):])
            if ino(a) != want:
                problems.append(f"{where}: `{a.line}` has inode {ino(a)}, not the number of its "
                                f"path ({want}): probing hidden names moved something")
    t = {}
    for a in timings:
        t.setdefault(a.line.split()[1], []).append(int(a.payload or 0))
    mean = lambda k: sum(t.get(k, [0])) // max(1, len(t.get(k, [])))  # noqa: E731
    print(f"\n{where}: ENOENT from stat(2), mean ns over {sum(map(len, t.values()))}000 calls: "
          f"hidden (exists) {mean('/w/write/.env')}, hidden (absent) {mean('/w/write/.env.absent')}, "
          f"absent {mean('/w/write/nothere')}")
    return problems


# ------------------------------------------------------------------ shell attempts

SHELL_CMDS = [
    "cat {p}", "head -c1 {p}", "ls {p}", "ls -ld {p}", "stat {p}", "rm {p}", "rm -r {p}",
    "rmdir {p}", "mv {p} /w/write/zz", "cp {p} /tmp/zz", "ln {p} /w/write/zz", "readlink -f {p}",
    "cd {p}", "wc -c < {p}", "test -e {p} && echo exists || echo absent", "find {p}", "du {p}",
    "chmod 600 {p}", "chown 0 {p}", "touch {p}", "mkdir {p}", "ln -s x {p}", "mkfifo {p}",
    "echo x > {p}", "echo x >> {p}", "mv /w/write/f7 {p}", "cp /w/write/f7 {p}",
]
READ_CMDS = SHELL_CMDS[:17]


def shell_sections(prefix, cmds, where):
    script = "".join(f"echo '@@{i}'; {c} 2>&1\n" for i, c in enumerate(cmds))
    p = sh([*prefix, "sh", "-c", script], timeout=120)
    STATS["attempts"] += len(cmds)
    problems = leaks_in(p.stdout + p.stderr, where)
    parts = re.split(r"^@@(\d+)\n", p.stdout, flags=re.M)
    out = {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    return [out.get(i, "") for i in range(len(cmds))], problems


def error_texts(prefix, where):
    """`cat hidden` and `cat nonexistent` (and every other command) say the same."""
    pairs = [("/w/write/.env", "/w/write/.env.absent"), ("/w/write/a/secrets", "/w/write/b/secrets"),
             ("/w/none/secret", "/w/nowhere/secret"), ("/w/toplevel.txt", "/w/toplevel2.txt"),
             ("/w/vault/private.txt", "/w/vault/private2.txt"), ("/w/read/.env", "/w/read/.env.absent"),
             ("/w/write/a/id.key", "/w/write/b/id.key")]
    cmds, expect_same = [], []
    for hid, absent in pairs:
        for c in SHELL_CMDS:
            cmds += [c.format(p=hid), c.format(p=absent)]
            expect_same.append((len(cmds) - 2, len(cmds) - 1, hid, absent))
        parent = hid.rsplit("/", 1)[0]
        if parent in ("/w/none", "/w/nowhere"):
            continue
        plain = parent + "/nothere"
        for c in READ_CMDS:   # and a name in the same directory, that is not there
            cmds += [c.format(p=hid), c.format(p=plain)]
            expect_same.append((len(cmds) - 2, len(cmds) - 1, hid, plain))
    outs, problems = shell_sections(prefix, cmds, where)
    outs = [re.sub(r"line \d+", "line N", o) for o in outs]
    for i, j, hid, absent in expect_same:
        a, b = outs[i], outs[j].replace(absent, hid)
        if a != b:
            problems.append(f"{where}: `{cmds[i]}` says {outs[i]!r} but `{cmds[j]}` says {outs[j]!r}")
    # Everything the container can reach, dumped: no secret, no hidden name.
    dump, p2 = shell_sections(prefix, [
        "ls -laR /w", "find /w -print0", "du -a /w", "find /w -type f -exec cat {} +",
        "tar -cf - -C /w . | od -c | head -c 2000000", "cat /proc/self/mountinfo",
    ], where)
    problems += p2
    found = [p for p in dump[1].split("\0") if p]
    for path in found:
        if path.rsplit("/", 1)[-1].encode() in HIDDEN_NAMES:
            STATS["leaks"] += 1
            problems.append(f"LEAK in {where}: find lists {path!r}")
    if "/w/write/a/z" not in found:
        problems.append(f"{where}: find did not run: {dump[1][:300]!r}")
    if "/var/lib/agentfense" in dump[5]:
        problems.append(f"{where}: the mount table names the host's state directory: {dump[5]!r}")
    if "read-f" not in dump[3] or "granted" not in dump[3] or "0000000" not in dump[4]:
        problems.append(f"{where}: the dumps did not run: {dump[3][:500]!r} {dump[4][:500]!r}")
    return problems


# ------------------------------------------------------------------ containers


def start_docker(base, attack, user="0:0", env=(), extra=(), name=None):
    name = name or unique("atk")
    args = [DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense", "-u", user,
            "-e", "AGENTFENSE_POLICY=" + json.dumps(POLICY), "-e", "AGENTFENSE_WORKSPACE=/w"]
    for e in env:
        args += ["-e", e]
    sh([*args, *extra, "-v", f"{base}:/w", "-v", f"{attack}:/attack:ro", IMAGE, "sleep", "1000"],
       check=True)
    return name


def fence_record(name):
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    return cid, json.loads((Path("/var/lib/agentfense/containers") / cid / "fence.json").read_text())


def remove_and_check_gone(name):
    """Removes the container; its fence daemon and mount are gone afterwards."""
    try:
        _, rec = fence_record(name)
    except Exception:  # noqa: BLE001
        rec = None
    sh([DOCKER, "rm", "-f", name])
    if rec is None:
        return
    for ws in rec["workspaces"]:
        pid, mp = (ws.get("daemon") or {}).get("pid", -1), ws["mountpoint"]

        def gone():
            mounted = any(l.split()[1] == mp for l in Path("/proc/mounts").read_text().splitlines())
            try:
                alive = Path(f"/proc/{pid}/cmdline").read_bytes().find(b"fence-daemon") >= 0
            except OSError:
                alive = False
            return not mounted and not alive
        wait_for(gone, f"the fence of {name} to go away", timeout=15)


class HostSocket:
    """A host service listening on a Unix socket inside the base: connecting to the fence's
    copy of it must never reach it."""

    def __init__(self, path):
        import socket
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.bind(str(path))
        self.s.listen(8)
        self.s.setblocking(False)
        os.chown(path, 1000, 1000, follow_symlinks=False)
        os.utime(path, (T0, T0), follow_symlinks=False)
        os.utime(path.parent, (T0, T0))

    def reached(self):
        try:
            c, _ = self.s.accept()
        except BlockingIOError:
            return False
        c.close()
        return True


@pytest.fixture
def scene(tmp_path):
    base = make_base(tmp_path / "base", tmp_path / "canary")
    sock = HostSocket(base / "write" / "host.sock")
    canary = make_canary(tmp_path / "canary")
    host = Host(base, canary)
    names = []
    yield base, canary, host, names
    for n in names:
        remove_and_check_gone(n)
    host.close()
    assert not sock.reached(), "a container reached a host service through a socket in the base"
    sock.s.close()


# ------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("user", ["root", "1000"])
def test_docker_attacks(docker_engine, image, attack, scene, user):
    """The whole catalogue, through Docker, as root (audit on: every read served by the
    daemon) and as uid 1000 (audit off: reads of read-only files passed through the kernel)."""
    base, canary, host, names = scene
    env = () if user == "root" else ("AGENTFENSE_AUDIT=off",)
    name = start_docker(base, attack, env=env)
    names.append(name)
    hostname = sh([DOCKER, "exec", name, "hostname"], check=True).stdout.strip()
    uid = "0:0" if user == "root" else "1000:1000"
    prefix = [DOCKER, "exec", "-u", uid, name]
    where = f"docker/{user}"
    att, twins, inos = attempts_for(user, hostname, canary)
    problems = run_attack(prefix, att, where)
    problems += differential(att, twins, inos, where)
    problems += error_texts(prefix, where)
    # A set-uid copy made by root in the workspace gives an ordinary user nothing (nosuid).
    p = sh([DOCKER, "exec", "-u", "0:0", name, "sh", "-c",
            "cp /attack /w/write/suid && chown 0:0 /w/write/suid && chmod 4755 /w/write/suid"])
    assert p.returncode == 0, p.stderr
    problems += run_attack([DOCKER, "exec", "-u", "1000:1000", name],
                           [A("exec_whoami", "/w/write/suid", check=has("euid=1000"))], where)
    # The daemon still serves, the base and the canary are as they were.
    assert sh([*prefix, "cat", "/w/read/f"]).stdout == "read-f\n"
    remove_and_check_gone(name)
    problems += host.problems()
    assert not problems, "\n".join(problems)


def test_ctr_attacks(ctr_engine, attack, scene):
    """A subset through containerd (`ctr`, annotations), one run."""
    base, canary, host, _ = scene
    cid = unique("atk-ctr")
    # Outside the scene's directory, whose path must never show in the container's mount table.
    out = Path(tempfile.mkdtemp(prefix="agentfense-attack-answers-", dir="/run"))
    att, twins, inos = attempts_for("root", cid, canary, full=False)
    prefix = [CTR, "-a", ctr_engine, "-n", CTR_NS, "run", "--rm", "--runtime", "io.containerd.runc.v2",
              "--runc-binary", BIN, "--annotation", "agentfense.io/policy=" + json.dumps(POLICY),
              "--annotation", "agentfense.io/workspace=/w",
              "--mount", f"type=bind,src={base},dst=/w,options=rbind:rw",
              "--mount", f"type=bind,src={attack},dst=/attack,options=rbind:ro",
              "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
              CTR_IMAGE, cid]
    problems = run_attack(prefix, att, "ctr", out_dir=out)
    problems += differential(att, twins, inos, "ctr")
    rec = json.loads((Path("/var/lib/agentfense/containers") / cid / "fence.json").read_text())
    assert not rec["live"]
    mp = rec["workspaces"][0]["mountpoint"]
    assert not any(l.split()[1] == mp for l in Path("/proc/mounts").read_text().splitlines())
    problems += host.problems()
    shutil.rmtree(out, ignore_errors=True)
    assert not problems, "\n".join(problems)


def test_host_swaps_a_directory_for_a_symlink(docker_engine, image, attack, scene):
    """While the container reads and lists beneath write/d, writes and creates beneath write/e
    and reads write/g, the host keeps swapping write/d, write/e (and the file write/g) for
    symlinks to the canary outside the base (absolute and relative). The daemon never follows
    them: the canary is never opened, read or changed (inotify, atime, contents, attributes),
    no canary byte reaches the container or its delta, the base ends as it began."""
    base, canary, host, names = scene
    d = base / "write" / "d"      # only read, listed and looked into: never copied up
    e = base / "write" / "e"      # written to: copied up (then the upper copy shadows it)
    for i in range(1, 5):
        write(d / f"f{i}", f"race-base-{i}\n")
        write(e / f"f{i}", f"race-base-{i}\n")
    write(d / ".env", f"{SECRET} race\n")
    write(e / ".env", f"{SECRET} race\n")
    write(base / "write" / "g", "race-g\n")
    for p in [*d.rglob("*"), *e.rglob("*"), d, e, base / "write", base / "write" / "g"]:
        os.chown(p, 1000, 1000, follow_symlinks=False)
        os.utime(p, (T0, T0), follow_symlinks=False)
    host.close()
    host = Host(base, canary)   # with write/d and write/e in the digest
    name = start_docker(base, attack)
    names.append(name)
    loop = r"""
end=$(( $(date +%s) + 4 )); i=0
while [ $(date +%s) -lt $end ]; do
  i=$((i+1))
  cat /w/write/d/f1 /w/write/d/.env /w/write/g /w/write/d/c /w/write/d/sub/c 2>&1
  ls /w/write/d/ /w/write/d/sub 2>&1; stat -c '%n %s' /w/write/d/f2 /w/write/g 2>&1
  /attack -a "read /w/write/d/f3" "getdents /w/write/d" "getxattr /w/write/d/f1 user.x" \
     "read /w/write/g" "listxattr /w/write/d" "readlink /w/write/d" "stat /w/write/d/f4" 2>&1
  echo x$i >> /w/write/e/f$((i % 4 + 1)) 2>&1; touch /w/write/e/new$i 2>&1
  mkdir /w/write/e/dir$i 2>&1; chmod 600 /w/write/e/f2 2>&1
  /attack -a "open /w/write/e/c wa" "setxattr /w/write/e/f1 user.x 1" \
     "rename /w/write/e/new$i /w/write/e/moved$i" "create /w/write/e/sub/c" 2>&1
done
echo "ITERATIONS $i"
"""
    stop = threading.Event()
    swaps = [0]
    dirs = [(base / "write" / n, base / "none" / f"{n}.real") for n in ("d", "e")]
    fpath, freal = base / "write" / "g", base / "none" / "g.real"

    def swapper():
        while not stop.is_set():
            k = swaps[0]
            for dd, real in dirs:
                os.rename(dd, real)
                os.symlink(str(canary) if k % 2 else "../../canary", dd)
            os.rename(fpath, freal)
            os.symlink(str(canary / "f1") if k % 2 else "../../canary/f1", fpath)
            time.sleep(0.001 * (1 + k % 5))
            for dd, real in dirs:
                os.unlink(dd)
                os.rename(real, dd)
            os.unlink(fpath)
            os.rename(freal, fpath)
            swaps[0] += 1
            time.sleep(0.001 * (1 + (k * 7) % 5))

    th = threading.Thread(target=swapper)
    th.start()
    try:
        p = sh([DOCKER, "exec", name, "sh", "-c", loop], timeout=60)
    finally:
        stop.set()
        th.join()
    iterations = int(re.search(r"ITERATIONS (\d+)", p.stdout).group(1))
    STATS["attempts"] += iterations * 23
    problems = leaks_in(p.stdout + p.stderr, "host-swap race")
    # The container's delta holds nothing from the canary.
    _, rec = fence_record(name)
    upper = Path(rec["workspaces"][0]["upper"])
    for f in upper.rglob("*"):
        if f.is_file() and not f.is_symlink() and CANARY.encode() in f.read_bytes():
            problems.append(f"canary content copied into the delta: {f}")
    assert sh([DOCKER, "exec", name, "cat", "/w/read/f"]).stdout == "read-f\n", "the daemon died"
    errors = {}
    for l in (p.stdout + p.stderr).splitlines():
        if "=>" in l:
            l = re.sub(r"\d+", "N", " ".join(l.split(" ")[:2])) + " => " + l.split(" => ", 1)[1].split(" ", 1)[0]
        else:
            l = re.sub(r"\d+", "N", l)
        errors[l] = errors.get(l, 0) + 1
    seen = "\n".join([f"  {n} x {l[:110]}" for l, n in sorted(errors.items(), key=lambda x: -x[1])
                       if not l.startswith(("race-base", "race-g", "f1", "f2", "f3", "f4", "sub"))][:25])
    print(f"\nhost-swap race: {swaps[0]} swaps, {iterations} container iterations; answers:\n{seen}")
    assert swaps[0] > 50 and iterations > 3
    remove_and_check_gone(name)
    # The swaps' renames moved these directories' times: put them back before comparing.
    for dd in (base / "write", base / "none", base / "write" / "d", base / "write" / "e"):
        os.utime(dd, (T0, T0))
    problems += host.problems()
    host.close()
    assert not problems, "\n".join(problems)


def test_two_processes_race_renames(docker_engine, image, attack, scene):
    """One process renames a directory back and forth (and exchanges it with another) while
    others open, list, create under it and try to move things onto hidden names. No hidden
    content leaks, hidden names stay refused, the base is unchanged, the tree stays coherent."""
    base, _, host, names = scene
    name = start_docker(base, attack)
    names.append(name)
    setup = ("mkdir /w/write/r /w/write/r/mine /w/write/r/other && echo mine > /w/write/r/mine/f && "
             "echo other > /w/write/r/other/f")
    assert sh([DOCKER, "exec", name, "sh", "-c", setup]).returncode == 0
    race = r"""
end=$(( $(date +%s) + 4 ))
( n=0; while [ $(date +%s) -lt $end ]; do
    mv /w/write/r/mine /w/write/r/x 2>/dev/null; mv /w/write/r/x /w/write/r/mine 2>/dev/null
    /attack -a "exchange /w/write/r/mine /w/write/r/other" >/dev/null; n=$((n+3)); done; echo "A $n" > /dev/shm/n.A ) &
( n=0; while [ $(date +%s) -lt $end ]; do
    cat /w/write/r/mine/f /w/write/r/x/f /w/write/r/other/f /w/write/.env /w/write/r/mine/.env 2>&1
    ls /w/write/r /w/write/r/mine /w/write/r/x /w/write/a 2>&1
    /attack -a "getdents /w/write/r/mine" "read /w/write/r/x/f" "read /w/write/a/.env"; n=$((n+12)); done; echo "B $n" > /dev/shm/n.B ) &
( n=0; i=0; while [ $(date +%s) -lt $end ]; do i=$((i+1))
    echo c > /w/write/r/mine/c$i 2>/dev/null
    /attack -a "rename /w/write/r/mine/c$i /w/write/.env" "rename /w/write/r/mine /w/write/secrets" \
      "rename /w/write/r/x /w/write/a/secrets" "link /w/write/r/mine/f /w/write/.env.x" \
      "rename /w/write/r/other/f /w/write/r/.env" "rename /w/write/r/mine /w/read/m"
    rm -f /w/write/r/mine/c$i 2>/dev/null; n=$((n+8)); done; echo "C $n" > /dev/shm/n.C ) &
wait
# (The counts go through files: a long listing written in pieces by one process may take
# another's line into its middle on the shared pipe.)
cat /dev/shm/n.A /dev/shm/n.B /dev/shm/n.C
"""
    p = sh([DOCKER, "exec", name, "sh", "-c", race], timeout=60)
    counts = dict((k, int(v)) for k, v in re.findall(r"^([ABC]) (\d+)$", p.stdout, flags=re.M))
    assert set(counts) == {"A", "B", "C"}, p.stdout[-2000:] + p.stderr[-2000:]
    STATS["attempts"] += sum(counts.values())
    problems = leaks_in(p.stdout + p.stderr, "rename race")
    refused = re.findall(r"^(rename|link) (\S+) (\S+) => (\S+)", p.stdout, flags=re.M)
    for op, a, b, res in refused:
        if res not in ("EACCES", "ENOENT"):
            problems.append(f"rename race: `{op} {a} {b}` answered {res}")
    # Coherent afterwards: the two directories, each with its own file.
    p = sh([DOCKER, "exec", name, "sh", "-c",
            "ls /w/write/r; cat /w/write/r/*/f; ls -a /w/write /w/write/r | grep -c '^\\.env'"])
    got = p.stdout.split("\n")
    assert got[:2] == ["mine", "other"] and sorted(got[2:4]) == ["mine", "other"] and got[4] == "0", p.stdout
    remove_and_check_gone(name)
    problems += host.problems()
    assert not problems, "\n".join(problems)


def test_capabilities_cannot_reach_bookkeeping_or_hidden_inodes(docker_engine, image, attack, scene):
    """With CAP_SYS_ADMIN (trusted.* attributes) and CAP_DAC_READ_SEARCH (open_by_handle_at,
    the 'shocker' attack): our trusted.agentfense.* attributes stay invisible and unsettable,
    and guessing file handles reaches nothing hidden or view-only."""
    base, _, host, names = scene
    name = start_docker(base, attack, extra=["--cap-add", "SYS_ADMIN", "--cap-add", "DAC_READ_SEARCH"])
    names.append(name)
    prefix = [DOCKER, "exec", name]
    sh([*prefix, "sh", "-c", "cat /w/write/* /w/read/* /w/vault/pub/*; ls -R /w; "
        "rm -rf /w/write/b; mkdir /w/write/b; echo n > /w/write/b/n"])
    att = [
        A("setxattr", "/w/write/f", "trusted.agentfense.opaque", "y", expect="EPERM"),
        A("setxattr", "/w/write/a", "trusted.agentfense.opaque", "y", expect="EPERM"),
        A("ls", "/w/write/a", check=has("/x/")),
        A("setxattr", "/w", "trusted.agentfense.root", "0", expect=("EPERM", "EACCES")),
        A("getxattr", "/w", "trusted.agentfense.root", expect=("ENODATA", "EACCES")),
        A("setxattr", "/w/write", "trusted.agentfense.opaque", "y", expect="EPERM"),
        A("ls", "/w/write", check=has("/f/")),
        A("getxattr", "/w/write/b", "trusted.agentfense.opaque", expect="ENODATA"),
        A("removexattr", "/w/write/b", "trusted.agentfense.opaque", expect="ENODATA"),
        A("ls", "/w/write/b", check=equals("./../n/")),   # still opaque: the base's b hidden
        A("listxattr", "/w"), A("listxattr", "/w/write/b"),
        A("setxattr", "/w/read/f", "trusted.x", "1", expect="EACCES"),
        A("getxattr", "/w/write/.env", "user.origin", expect="ENOENT"),
        A("lgetxattr", "/w/write/.env", "trusted.agentfense.opaque", expect="ENOENT"),
        A("handles", "/w", "/w/read/f", "400"),
        A("handles", "/w", "/w/write/a", "400"),
    ]
    problems = run_attack(prefix, att, "cap_sys_admin")
    # Unmounting the workspace shows the image's own (empty) directory, nothing of the host.
    p = sh([*prefix, "sh", "-c", "umount -l /w; ls -la /w; cat /w/write/.env /w/read/f"])
    STATS["attempts"] += 1
    problems += leaks_in(p.stdout + p.stderr, "umount")
    assert "read-f" not in p.stdout
    remove_and_check_gone(name)
    problems += host.problems()
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ findings


def commit_with_bookkeeping_name(tmp_path, script):
    base = tmp_path / "cbase"
    write(base / "w" / "f", "base-f\n")
    write(base / "w" / "g", "base-g\n")
    write(base / "w" / ".env", f"{SECRET} commit\n")
    name = unique("atk-commit")
    p = sh([DOCKER, "run", "--name", name, "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=development",
            "-e", "AGENTFENSE_DELTA=commit", "-e", "AGENTFENSE_WORKSPACE=/c", "-v", f"{base}:/c", IMAGE,
            "sh", "-c", script])
    STATS["attempts"] += 1
    assert p.returncode == 0, p.stderr
    cid, _ = fence_record(name)
    remove_and_check_gone(name)
    audit = (Path("/var/lib/agentfense/containers") / cid / "audit.jsonl").read_text().splitlines()
    commit = [json.loads(l) for l in audit if '"event":"commit"' in l][-1]["info"]
    assert (base / "w" / ".env").read_text() == f"{SECRET} commit\n"
    return base, commit


# Was a finding (fixed): "finding: a file the container names .agentfense-commit-<hostname> " "is taken for a leftover temporary name and silently deleted at commit"
def test_finding_commit_loses_a_file_named_like_its_temporary(docker_engine, image, tmp_path):
    base, commit = commit_with_bookkeeping_name(
        tmp_path, 'echo mine > /c/w/.agentfense-commit-$(hostname); echo more >> /c/w/g')
    assert commit["complete"] and not commit["conflicts"], commit
    assert (base / "w" / "g").read_text() == "base-g\nmore\n"
    names = sorted(p.name for p in (base / "w").iterdir())   # reported added, but is it there?
    assert any(n.startswith(".agentfense-commit-") for n in names), (names, commit)


# Was a finding (fixed): "finding: a directory the container names " ".agentfense-commit-<hostname> stops the commit of the rest of its delta"
def test_finding_commit_stopped_by_a_directory_named_like_its_temporary(docker_engine, image, tmp_path):
    base, commit = commit_with_bookkeeping_name(
        tmp_path, 'mkdir /c/w/.agentfense-commit-$(hostname); echo more >> /c/w/g; echo new > /c/w/h')
    assert commit["complete"] and commit["error"] is None, (commit["error"], commit)
    assert (base / "w" / "g").read_text() == "base-g\nmore\n"
    assert (base / "w" / "h").read_text() == "new\n"


def rename_exchange(a, b):
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.syscall(316, -100, os.fsencode(a), -100, os.fsencode(b), 2)  # renameat2, AT_FDCWD, RENAME_EXCHANGE
    assert r == 0, os.strerror(ctypes.get_errno())


# Was a finding (fixed): "finding: truncating a file the host swapped for a FIFO makes the " "daemon open the FIFO (copied up into the delta) without O_NONBLOCK: the worker " "blocks forever holding the namespace lock, and th
def test_finding_host_fifo_swap_hangs_the_fence(docker_engine, image, attack, tmp_path):
    """The host swaps a directory of regular files for one of FIFOs (RENAME_EXCHANGE: no
    event on the files themselves, so the container's kernel still holds them as regular
    files) while a container truncates one of them through a descriptor it held. The fence
    must answer that truncate (with an error or not) and keep serving."""
    base, hold = tmp_path / "base", tmp_path / "hold"
    for i in (1, 2):
        write(base / "write" / "d" / f"f{i}", "regular\n")
        (hold / "d").mkdir(parents=True, exist_ok=True)
        os.mkfifo(hold / "d" / f"f{i}")
    name = start_docker(base, attack)
    try:
        assert sh([DOCKER, "exec", name, "cat", "/w/write/d/f1"]).stdout == "regular\n"
        held = subprocess.Popen([DOCKER, "exec", name, "/attack", "-a", "hold_truncate /w/write/d/f1 0.3"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert held.stdout.readline() == "HELD\n"   # the descriptor is taken: now swap
        rename_exchange(base / "write" / "d", hold / "d")
        time.sleep(2.5)
        STATS["attempts"] += 2
        # Processes waiting on a request the daemon has taken cannot even be killed: run the
        # probe aside and give it five seconds.
        after = subprocess.Popen([DOCKER, "exec", name, "/attack", "-a", "create /w/write/after",
                                  "stat /w/write/after"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        try:
            probe_out = after.communicate(timeout=5)[0]
        except subprocess.TimeoutExpired:
            probe_out = None
        responsive = probe_out is not None and probe_out.count("=> ok") == 2
        _, rec = fence_record(name)
        upper = Path(rec["workspaces"][0]["upper"])
        stuck = [p for p in upper.rglob("*") if p.is_fifo()]
        # Release a worker blocked on the FIFO (a reader lets its open return), put the base back.
        for p in stuck:
            try:
                os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass
        rename_exchange(base / "write" / "d", hold / "d")
        out = held.stdout.read()
        held.wait(timeout=30)
        if probe_out is None:
            probe_out = after.communicate(timeout=30)[0]
        assert responsive, (f"the fence hung after `hold_truncate` ({out.strip()!r}): `create` did not "
                            f"answer within 5 s (answered {probe_out.strip()!r} once released); the delta "
                            f"holds FIFOs copied from the base: {[str(p.relative_to(upper)) for p in stuck]}")
    finally:
        remove_and_check_gone(name)


@pytest.mark.xfail(strict=True, reason="finding: a directory's mtime and ctime change when the host creates "
                   "or deletes a hidden entry in it, telling the container that a hidden name came or went")
def test_finding_directory_times_reveal_hidden_churn(docker_engine, image, attack, tmp_path):
    base = tmp_path / "base"
    write(base / "write" / "b" / "x", "x\n")
    write(base / "write" / "b" / ".env", f"{SECRET} churn\n")
    finish_tree(base)
    name = start_docker(base, attack)
    try:
        look = [DOCKER, "exec", name, "sh", "-c", "ls -a /w/write/b; stat -c '%Y %Z %s %h %b' /w/write/b"]
        first = sh(look).stdout
        assert first.startswith(".\n..\nx\n"), first
        seen = [first]
        (base / "write" / "b" / ".env").write_text(f"{SECRET} rewritten\n")   # content only
        time.sleep(1.5)
        seen.append(sh(look).stdout)
        os.rename(base / "write" / "b" / ".env", base / "write" / "b" / ".env.old")   # names
        time.sleep(1.5)
        seen.append(sh(look).stdout)
        os.unlink(base / "write" / "b" / ".env.old")
        time.sleep(1.5)
        seen.append(sh(look).stdout)
        STATS["attempts"] += len(seen)
        problems = leaks_in("".join(seen), "dir times")
        assert not problems, problems
        assert seen == [first] * len(seen), f"the directory changed for the container: {seen}"
    finally:
        remove_and_check_gone(name)


# Was a finding (fixed): "finding: after the container unlinks (or renames over) a base file it " "holds open read-only, fchmod/fchown/futimens through that descriptor change the BASE " "file (orphan setattr on the base descr
def test_finding_orphan_setattr_changes_the_base(docker_engine, image, attack, tmp_path):
    """Policies that write everywhere (the development and full-access presets) decide the
    orphaned file by a placeholder path their `**` rules match."""
    base = tmp_path / "base"
    for n in ("a", "b", "c", "d", "e"):
        write(base / "src" / n, f"base {n}\n")
    write(base / "tools" / "tool", attack.read_bytes(), mode=0o755)   # root-owned, executable
    for p in [*base.rglob("*"), base]:
        os.utime(p, (T0, T0), follow_symlinks=False)
    before = digest(base)
    name = unique("atk-orphan")
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense", "-e", "AGENTFENSE_PRESET=development",
        "-e", "AGENTFENSE_WORKSPACE=/w", "-v", f"{base}:/w", "-v", f"{attack}:/attack:ro", IMAGE,
        "sleep", "1000"], check=True)
    try:
        sh([DOCKER, "exec", name, "sh", "-c", "echo new > /w/src/new"], check=True)
        att = [A("orphan_setattr", "/w/tools/tool", "unlink", "4755"),
               A("orphan_setattr", "/w/src/a", "unlink", "777", "1234"),
               A("orphan_setattr", "/w/src/b", "/w/src/new", "777", "1234"),
               A("orphan_chmod_path", "/w/src/c", "6777")]
        problems = run_attack([DOCKER, "exec", name], att, "orphan")
        answers = [f"{a.line} => {a.result} {a.payload.decode()}" for a in att]
        changed = snapshot_diff(before, digest(base))
        setuid = os.stat(base / "tools" / "tool").st_mode & 0o4000
        assert not problems, problems
        assert not setuid and not changed, (f"the base changed: {changed}; set-uid on the host: "
                                            f"{bool(setuid)}; answers: {answers}")
    finally:
        remove_and_check_gone(name)
        os.chmod(base / "tools" / "tool", 0o755)
