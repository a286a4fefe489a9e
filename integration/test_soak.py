"""Data-integrity soak: random file operations through a full-access fence (copy-on-write over
a populated base), mirrored on a plain directory (the model), compared as they go.

Every operation runs on the fence first, then on the model, and both outcomes (return value or
errno, data read back, stat fields) must agree; the two trees (names, types, sizes, contents,
modes, owners, symlink targets, user.* extended attributes) are compared every CHECK_EVERY
operations and at the end. Operations: create (under a random umask), write at random offsets,
append, truncate, ftruncate, rename (files and directories, over existing targets too),
RENAME_EXCHANGE, unlink, mkdir, rmdir, link, symlink, mmap write + msync, write + fsync,
fdatasync, I/O through a descriptor whose name was unlinked, chmod, chown, utimens, setxattr,
and read back (pread of ranges, lstat, stat through symlinks, readdir, readlink).

Phases, bounded by time (SOAK_SECONDS, default 20): single-threaded over the whole tree (30%),
then SOAK_WORKERS (default 3, 2 to 4) threads on disjoint subtrees (50%), then single-threaded
again (20%). At the end: the base is unchanged byte for byte (contents and metadata), the
upper layer merged over the base by the documented rules (whiteouts: 0:0 character devices;
opaque directories: trusted.agentfense.opaque) equals the model, and a fresh daemon mounted over
the same base and upper shows the model again.

Documented differences the comparison allows: st_nlink (1 on the fence), directory sizes, times
other than those set with utimens, and EXDEV for a directory rename (SPEC §4: a directory
holding base content is not moved; the model is then left alone too).

The seed is printed (SOAK_SEED to replay one). On a divergence the operations are replayed on
fresh trees and shrunk (delta debugging, bounded by SOAK_SHRINK_SECONDS, default 90) to a
minimal sequence that still diverges, which the failure prints.
"""

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import DirectFence, figure

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AGENTFENSE_BIN", REPO / "target" / "release" / "agentfense-runc")).resolve()
SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
SEED = int(os.environ.get("SOAK_SEED", "20261204"))
WORKERS = max(2, min(4, int(os.environ.get("SOAK_WORKERS", "3"))))
CHECK_EVERY = int(os.environ.get("SOAK_CHECK_EVERY", "100"))
SHRINK_SECONDS = float(os.environ.get("SOAK_SHRINK_SECONDS", "90"))
# Exploration only: operation kinds to leave out (comma-separated; "umask" keeps the umask at
# 022), e.g. to look past a known divergence. CI runs them all.
SKIP_OPS = {o for o in os.environ.get("SOAK_SKIP_OPS", "").split(",") if o}
LIST_EVERY = 3  # operations between two listings of the model (listing costs more than an op)
MAX_ENTRIES = 120  # per subtree: beyond it, the mix leans to deletions
DAEMON_UMASK = 0o022
FULL_ACCESS = json.dumps({"default": "none", "rules": [
    {"pattern": "**", "permission": "write", "type": "glob", "priority": 0}]})
OPAQUE_XATTR = "trusted.agentfense.opaque"

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(a, b, flags):
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)


# ---------------------------------------------------------------------------------------------
# The fence
# ---------------------------------------------------------------------------------------------

class Fence(DirectFence):
    def __init__(self, base, upper, mnt, cid="soak"):
        super().__init__(base, upper, mnt, FULL_ACCESS, cid, umask=DAEMON_UMASK)


# ---------------------------------------------------------------------------------------------
# Trees: the base, snapshots, the merged view of base + upper
# ---------------------------------------------------------------------------------------------

def data(seed, n):
    return random.Random(seed).randbytes(n)


def make_base(root, seed):
    """A deterministic tree: nested directories, files of assorted sizes and modes, symlinks,
    user.* attributes, an empty directory, a file with a hole."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    dirs = ["."]
    for i in range(10):
        parent = rng.choice(dirs)
        d = os.path.normpath(f"{parent}/d{i}")
        (root / d).mkdir()
        dirs.append(d)
    for i in range(40):
        d = rng.choice(dirs)
        p = root / d / f"f{i}"
        p.write_bytes(data(rng.random(), rng.choice([0, 1, 100, 4095, 4096, 5000, 70000])))
        os.chmod(p, rng.choice([0o644, 0o600, 0o755, 0o444, 0o640]))
        if rng.random() < 0.2:
            os.setxattr(p, "user.base", data(rng.random(), 12))
    for i in range(6):
        d = rng.choice(dirs)
        os.symlink(rng.choice([f"f{rng.randrange(40)}", "nowhere", "."]), root / d / f"l{i}")
    with open(root / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    (root / "empty").mkdir()
    os.chmod(root / dirs[-1], 0o700)


def entry(path, with_times=False):
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    e = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(kind):
        with open(path, "rb") as f:
            e["size"] = st.st_size
            e["sha"] = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(kind):
        e["target"] = os.readlink(path)
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        e["rdev"] = st.st_rdev
    if not stat.S_ISLNK(kind):
        try:
            e["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False).hex()
                           for n in sorted(os.listxattr(path, follow_symlinks=False))
                           if n.startswith("user.")}
        except OSError as ex:
            e["xattrs"] = f"error {errno.errorcode.get(ex.errno, ex.errno)}"
    if with_times:
        e["mtime"], e["ctime"], e["ino"] = st.st_mtime_ns, st.st_ctime_ns, st.st_ino
        if stat.S_ISDIR(kind):
            e["names"] = sorted(os.listdir(path))
    return e


def snapshot(root, sub=".", with_times=False):
    """{relative path: entry} of everything under root/sub (sub included), never following
    symlinks."""
    out = {}
    top = os.path.join(root, sub)
    out[os.path.normpath(sub)] = entry(top, with_times)
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.normpath(os.path.relpath(p, root))] = entry(p, with_times)
    return out


def merged(base, upper):
    """What the documented layering shows: upper entries over base entries; a 0:0 character
    device in the upper layer hides the base entry; an upper directory merges the base
    directory at the same path unless it is opaque (or its parent did not merge)."""
    out = {}

    def whiteout(p):
        st = os.lstat(p)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def opaque(p):
        try:
            os.getxattr(p, OPAQUE_XATTR, follow_symlinks=False)
            return True
        except OSError:
            return False

    def walk(rel, merge_base):
        u = os.path.join(upper, rel)
        b = os.path.join(base, rel)
        names = {}
        if os.path.isdir(u) and not os.path.islink(u):
            for n in os.listdir(u):
                names[n] = "upper"
        if merge_base and os.path.isdir(b) and not os.path.islink(b):
            for n in os.listdir(b):
                names.setdefault(n, "base")
        for n, layer in names.items():
            r = os.path.normpath(os.path.join(rel, n))
            p = os.path.join(upper if layer == "upper" else base, r)
            if layer == "upper" and whiteout(p):
                continue
            out[r] = entry(p)
            if stat.S_ISDIR(out[r]["type"]):
                bp = os.path.join(base, r)
                child_merge = (layer == "base" or (
                    merge_base and os.path.isdir(bp) and not os.path.islink(bp)
                    and not opaque(p)))
                walk(r, child_merge)

    out["."] = entry(upper)
    walk(".", not opaque(upper))
    return out


def diff(a, b, la="fence", lb="model"):
    """Human-readable differences between two snapshots (empty if equal)."""
    out = []
    for p in sorted(set(a) | set(b)):
        if p not in a:
            out.append(f"{p}: only in {lb}: {b[p]}")
        elif p not in b:
            out.append(f"{p}: only in {la}: {a[p]}")
        elif a[p] != b[p]:
            fields = {k for k in set(a[p]) | set(b[p]) if a[p].get(k) != b[p].get(k)}
            out.append(f"{p}: " + ", ".join(f"{k} {la}={a[p].get(k)!r} {lb}={b[p].get(k)!r}"
                                          for k in sorted(fields)))
    return out


# ---------------------------------------------------------------------------------------------
# Operations: generated from the model's state, applied to one root, outcome compared
# ---------------------------------------------------------------------------------------------

FILE_MODES = [0o644, 0o600, 0o755, 0o640, 0o444, 0o666, 0o2755, 0o4755]
DIR_MODES = [0o755, 0o700, 0o775, 0o777, 0o1777, 0o2775]
UMASKS = [0o022, 0o002, 0o077, 0o000, 0o027]
OWNERS = [(0, 0), (65534, 65534), (1, 1), (0, 65534)]

# kind -> weight. Mutations dominate; read-backs are cheap and frequent.
WEIGHTS = {
    "create": 8, "write": 12, "append": 4, "truncate": 4, "ftruncate": 2, "rename": 6,
    "rename_dir": 2, "exchange": 1, "unlink": 5, "mkdir": 4, "rmdir": 3, "link": 3,
    "symlink": 2, "mmap": 4, "fsync": 3, "fdatasync": 1, "unlinked_io": 2, "chmod": 3,
    "chown": 1, "utimens": 2, "setxattr": 2, "read": 12, "lstat": 6, "stat_follow": 2,
    "readdir": 4, "readlink": 1,
}


def listing(model, roots):
    """(tops, dirs, files, symlinks, others) under the model's roots (relative paths): `tops`
    are the roots themselves (never removed or moved), `dirs` the directories beneath them."""
    tops, dirs, files, links, others = [], [], [], [], []
    for r in roots:
        top = os.path.join(model, r)
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        tops.append(os.path.normpath(r))
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                rel = os.path.normpath(os.path.relpath(p, model))
                m = os.lstat(p).st_mode
                (dirs if stat.S_ISDIR(m) else files if stat.S_ISREG(m)
                 else links if stat.S_ISLNK(m) else others).append(rel)
    return tops, dirs, files, links, others


def gen_op(rng, lst, roots, single, counter):
    """One concrete operation (a tuple) chosen from `lst`, a recent listing of the model (a
    stale entry only makes an operation fail the same way on both sides)."""
    tops, subdirs, files, links, others = lst
    dirs = tops + subdirs
    total = len(dirs) + len(files) + len(links) + len(others)
    weights = dict(WEIGHTS)
    if total > MAX_ENTRIES * len(roots):
        for k in ("create", "mkdir", "link", "symlink"):
            weights[k] = 1
        weights["unlink"], weights["rmdir"] = 15, 8
    for k in SKIP_OPS:
        weights.pop(k, None)
    kinds = list(weights)
    kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
    counter[0] += 1
    # The umask is per process: only varied while one thread runs ("umask" in SOAK_SKIP_OPS:
    # never).
    umask = rng.choice(UMASKS) if single and "umask" not in SKIP_OPS else None
    new = lambda: os.path.normpath(f"{rng.choice(dirs)}/n{counter[0]}_{rng.randrange(1000)}")
    anyf = lambda: rng.choice(files) if files else new()
    movable = files + links + subdirs + others  # never a root: they must stay put
    anyp = lambda: rng.choice(movable + tops) if total else new()
    anym = lambda: rng.choice(movable) if movable else new()
    s = rng.getrandbits(32)
    if kind == "create":
        return ("create", new() if rng.random() < 0.9 else anym(), rng.choice(FILE_MODES[:6]),
                umask, s, rng.choice([0, 10, 4096, 9000]))
    if kind == "write":
        return ("write", anyf(), rng.randrange(0, 90000), rng.randrange(1, 20000), s)
    if kind == "append":
        return ("append", anyf(), rng.randrange(1, 6000), s)
    if kind == "truncate":
        return ("truncate", anyf(), rng.choice([0, 1, 4095, 4097, rng.randrange(0, 100000)]))
    if kind == "ftruncate":
        return ("ftruncate", anyf(), rng.randrange(0, 100000))
    if kind == "rename":
        src = rng.choice(files + links + others) if files + links + others else new()
        dst = rng.choice([new(), anyf(), anym()])
        return ("rename", src, dst)
    if kind == "rename_dir":
        src = rng.choice(subdirs) if subdirs else new()
        dst = new() if rng.random() < 0.7 or not subdirs else rng.choice(subdirs)
        return ("rename", src, dst)
    if kind == "exchange":
        return ("exchange", anym(), anym())
    if kind == "unlink":
        return ("unlink", rng.choice(files + links + others) if total > len(dirs) else new())
    if kind == "mkdir":
        return ("mkdir", new(), rng.choice(DIR_MODES[:4]), umask)
    if kind == "rmdir":
        return ("rmdir", rng.choice(subdirs) if subdirs else new())
    if kind == "link":
        # Both names under the same top-level directory (or both at the top), so that the
        # workers' disjoint subtrees never share a file.
        src = anyf()
        top = src.split("/")[0] if "/" in src else "."
        same = [d for d in dirs if top == "." and d == "." or d == top or d.startswith(top + "/")]
        dst_dir = rng.choice(same) if same else os.path.dirname(src) or "."
        dst = (os.path.normpath(f"{dst_dir}/n{counter[0]}_{rng.randrange(1000)}")
               if rng.random() < 0.9 or not movable else rng.choice(movable))
        return ("link", src, dst)
    if kind == "symlink":
        return ("symlink", rng.choice(["nowhere", "..", "."] + [os.path.basename(f) for f in files[:20]]),
                new())
    if kind == "mmap":
        return ("mmap", anyf(), rng.random(), rng.randrange(1, 9000), s)
    if kind in ("fsync", "fdatasync"):
        return (kind, anyf(), rng.randrange(0, 50000), rng.randrange(1, 5000), s)
    if kind == "unlinked_io":
        return ("unlinked_io", anyf(), rng.randrange(0, 9000), rng.randrange(1, 5000), s)
    if kind == "chmod":
        p = anyp()
        modes = DIR_MODES if p in dirs else FILE_MODES
        return ("chmod", p, rng.choice(modes))
    if kind == "chown":
        return ("chown", anyp(), *rng.choice(OWNERS))
    if kind == "utimens":
        return ("utimens", anyp(), rng.randrange(0, 2**33) * 10**9 + rng.randrange(10**9),
                rng.randrange(0, 2**33) * 10**9 + rng.randrange(10**9))
    if kind == "setxattr":
        return ("setxattr", anyp(), f"user.k{rng.randrange(3)}", rng.randrange(0, 300), s)
    if kind == "read":
        return ("read", anyf(), rng.randrange(0, 90000), rng.randrange(1, 70000))
    if kind == "lstat":
        return ("lstat", anyp())
    if kind == "stat_follow":
        return ("stat_follow", rng.choice(links) if links else anyp())
    if kind == "readdir":
        return ("readdir", rng.choice(dirs))
    if kind == "readlink":
        return ("readlink", rng.choice(links) if links else anyp())
    raise AssertionError(kind)


def short_stat(st):
    kind = stat.S_IFMT(st.st_mode)
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            None if stat.S_ISDIR(kind) else st.st_size)


def apply(op, root, umask_lock=None):
    """Runs op under root; returns its outcome (comparable across roots)."""
    kind, rest = op[0], op[1:]
    P = lambda rel: os.path.join(root, rel)
    try:
        if kind == "create":
            rel, mode, umask, s, n = rest
            old = os.umask(umask) if umask is not None else None
            try:
                fd = os.open(P(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
            finally:
                if old is not None:
                    os.umask(old)
            try:
                os.write(fd, data(s, n))
                return ("ok", short_stat(os.fstat(fd)))
            finally:
                os.close(fd)
        if kind == "write":
            rel, off, n, s = rest
            fd = os.open(P(rel), os.O_WRONLY)
            try:
                return ("ok", os.pwrite(fd, data(s, n), off))
            finally:
                os.close(fd)
        if kind == "append":
            rel, n, s = rest
            fd = os.open(P(rel), os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data(s, n))
                return ("ok", os.lseek(fd, 0, os.SEEK_CUR))
            finally:
                os.close(fd)
        if kind == "truncate":
            os.truncate(P(rest[0]), rest[1])
            return ("ok",)
        if kind == "ftruncate":
            fd = os.open(P(rest[0]), os.O_RDWR)
            try:
                os.ftruncate(fd, rest[1])
                return ("ok", os.fstat(fd).st_size)
            finally:
                os.close(fd)
        if kind == "rename":
            os.rename(P(rest[0]), P(rest[1]))
            return ("ok",)
        if kind == "exchange":
            renameat2(P(rest[0]), P(rest[1]), RENAME_EXCHANGE)
            return ("ok",)
        if kind == "unlink":
            os.unlink(P(rest[0]))
            return ("ok",)
        if kind == "mkdir":
            rel, mode, umask = rest
            old = os.umask(umask) if umask is not None else None
            try:
                os.mkdir(P(rel), mode)
            finally:
                if old is not None:
                    os.umask(old)
            return ("ok", short_stat(os.lstat(P(rel))))
        if kind == "rmdir":
            os.rmdir(P(rest[0]))
            return ("ok",)
        if kind == "link":
            os.link(P(rest[0]), P(rest[1]), follow_symlinks=False)
            return ("ok", short_stat(os.lstat(P(rest[1]))))
        if kind == "symlink":
            os.symlink(rest[0], P(rest[1]))
            return ("ok", os.readlink(P(rest[1])))
        if kind == "mmap":
            rel, where, n, s = rest
            fd = os.open(P(rel), os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    return ("ok", "empty")
                # A size that the file does not have would end in SIGBUS (which kills the
                # run): say so instead.
                if len(os.pread(fd, 1, size - 1)) != 1:
                    return ("ok", "fstat size beyond the data", size)
                off = int(where * size)
                n = min(n, size - off)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                try:
                    mm[off:off + n] = data(s, n)
                    mm.flush()  # msync(MS_SYNC)
                finally:
                    mm.close()
                return ("ok", size, off, n)
            finally:
                os.close(fd)
        if kind in ("fsync", "fdatasync"):
            rel, off, n, s = rest
            fd = os.open(P(rel), os.O_RDWR)
            try:
                os.pwrite(fd, data(s, n), off)
                (os.fsync if kind == "fsync" else os.fdatasync)(fd)
                return ("ok", os.pread(fd, n, off) == data(s, n))
            finally:
                os.close(fd)
        if kind == "unlinked_io":
            # What tempfile.TemporaryFile does without O_TMPFILE: create, unlink, then use the
            # descriptor (fstat included: io.open calls it).
            rel, off, n, s = rest
            fd = os.open(P(rel), os.O_RDWR)
            try:
                os.unlink(P(rel))
                got = []
                for sub in (lambda: os.fstat(fd).st_size,
                            lambda: os.pwrite(fd, data(s, n), off),
                            lambda: os.pread(fd, n, off) == data(s, n),
                            lambda: os.ftruncate(fd, off + n // 2),
                            lambda: os.fstat(fd).st_size):
                    try:
                        got.append(sub())
                    except OSError as e:
                        got.append(errno.errorcode.get(e.errno, e.errno))
                return ("ok", *got)
            finally:
                os.close(fd)
        if kind == "chmod":
            os.chmod(P(rest[0]), rest[1], follow_symlinks=False) if not os.path.islink(P(rest[0])) \
                else os.chmod(P(rest[0]), rest[1])  # through a symlink: chmods its target
            return ("ok",)
        if kind == "chown":
            os.chown(P(rest[0]), rest[1], rest[2], follow_symlinks=False)
            return ("ok", short_stat(os.lstat(P(rest[0]))))
        if kind == "utimens":
            os.utime(P(rest[0]), ns=(rest[1], rest[2]), follow_symlinks=False)
            st = os.lstat(P(rest[0]))
            return ("ok", st.st_mtime_ns, st.st_atime_ns)
        if kind == "setxattr":
            rel, name, n, s = rest
            os.setxattr(P(rel), name, data(s, n), follow_symlinks=False)
            return ("ok", os.getxattr(P(rel), name, follow_symlinks=False) == data(s, n))
        if kind == "read":
            rel, off, n = rest
            fd = os.open(P(rel), os.O_RDONLY)
            try:
                return ("ok", hashlib.sha256(os.pread(fd, n, off)).hexdigest(),
                        os.fstat(fd).st_size)
            finally:
                os.close(fd)
        if kind == "lstat":
            return ("ok", short_stat(os.lstat(P(rest[0]))))
        if kind == "stat_follow":
            return ("ok", short_stat(os.stat(P(rest[0]))))
        if kind == "readdir":
            return ("ok", sorted(os.listdir(P(rest[0]))))
        if kind == "readlink":
            return ("ok", os.readlink(P(rest[0])))
        raise AssertionError(kind)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))
    except (ValueError, BufferError) as e:
        return ("exc", type(e).__name__)


def documented_difference(op, f_out, model):
    """SPEC §4: a directory rename (RENAME_EXCHANGE included) that would move base content
    answers EXDEV."""
    isdir = lambda rel: (os.path.isdir(os.path.join(model, rel))
                         and not os.path.islink(os.path.join(model, rel)))
    return f_out == ("err", "EXDEV") and (
        (op[0] == "rename" and isdir(op[1]))
        or (op[0] == "exchange" and (isdir(op[1]) or isdir(op[2]))))


class Divergence(Exception):
    """sig: what diverged (the operation's kind, or "trees"), to keep shrinking on one bug."""

    def __init__(self, text, sig):
        super().__init__(text)
        self.sig = sig


def step(op, fence, model):
    """Applies op to the fence, then (unless the fence documentedly refused) to the model;
    raises Divergence when the outcomes differ."""
    f_out = apply(op, fence)
    if documented_difference(op, f_out, model):
        return "exdev"
    m_out = apply(op, model)
    if f_out != m_out:
        raise Divergence(f"{op!r}: fence {f_out!r} model {m_out!r}", op[0])
    return None


def compare(fence, model, sub="."):
    d = diff(snapshot(fence, sub), snapshot(model, sub))
    if d:
        raise Divergence(f"trees differ under {sub}:\n  " + "\n  ".join(d[:30]), "trees")


# ---------------------------------------------------------------------------------------------
# A soak run, and replays of a sequence on fresh trees (for shrinking)
# ---------------------------------------------------------------------------------------------

class Env:
    """base (populated from the seed), its copy as the model, an upper dir and the fence."""

    def __init__(self, work, seed):
        self.work = Path(work)
        self.base, self.model = self.work / "base", self.work / "model"
        self.upper, self.mnt = self.work / "upper", self.work / "mnt"
        make_base(self.base, seed)
        subprocess.run(["cp", "-a", self.base, self.model], check=True)
        self.upper.mkdir()
        self.fence = Fence(self.base, self.upper, self.mnt)

    def close(self):
        self.fence.close()


def replay(ops, seed, root_dir, want=None):
    """Replays `ops` from a fresh base: the first divergence (of kind `want` if given: others
    are passed over), or None."""
    work = Path(tempfile.mkdtemp(prefix="replay-", dir=root_dir))
    env = Env(work, seed)
    try:
        for op in ops:
            try:
                step(op, str(env.mnt), str(env.model))
            except Divergence as e:
                if want is None or e.sig == want:
                    return e
        if want in (None, "trees"):
            compare(str(env.mnt), str(env.model))
        return None
    except Divergence as e:
        return e
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


def shrink(ops, sig, seed, root_dir, budget):
    """ddmin over ops, bounded by `budget` seconds: a short sequence that still diverges the
    same way (a divergence of kind `sig`)."""
    deadline = time.time() + budget
    first = replay(ops, seed, root_dir, sig)
    if first is None:
        return ops, None, "does not reproduce sequentially (timing or concurrency?)"
    how = ""
    fails = lambda cand: replay(cand, seed, root_dir, sig) is not None
    # Only operations up to the one that diverged matter: cut the tail first.
    lo, hi = 1, len(ops)
    while lo < hi and time.time() < deadline:
        mid = (lo + hi) // 2
        if fails(ops[:mid]):
            hi = mid
        else:
            lo = mid + 1
    ops = ops[:hi]
    n = 2
    while len(ops) >= 2 and time.time() < deadline:
        chunk = max(1, len(ops) // n)
        reduced = False
        for i in range(0, len(ops), chunk):
            if time.time() >= deadline:
                break
            cand = ops[:i] + ops[i + chunk:]
            if cand and fails(cand):
                ops, n, reduced = cand, max(n - 1, 2), True
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(ops), n * 2)
    how += "minimal" if time.time() < deadline else "shrink budget exhausted"
    return ops, replay(ops, seed, root_dir, sig), how


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = 0
        self.by_kind = {}
        self.exdev = 0

    def add(self, op, outcome):
        with self.lock:
            self.ops += 1
            self.by_kind[op[0]] = self.by_kind.get(op[0], 0) + 1
            if outcome == "exdev":
                self.exdev += 1


def run_worker(rng, env, roots, deadline, stats, log, single, stop, counter):
    fence, model = str(env.mnt), str(env.model)
    n = 0
    lst = None
    while time.time() < deadline and not stop.is_set():
        if n % LIST_EVERY == 0:
            lst = listing(model, roots)
        op = gen_op(rng, lst, roots, single, counter)
        log.append(op)
        stats.add(op, step(op, fence, model))
        n += 1
        if n % CHECK_EVERY == 0:
            for r in roots:
                if os.path.isdir(os.path.join(model, r)):
                    compare(fence, model, r)


def separate_subtrees(model):
    """Unlink operations that leave no file with names under two top-level directories (or
    one there and one at the top): the workers' subtrees must not share a file (renames after
    link(2) can spread its names)."""
    names = {}
    for dirpath, _, filenames in os.walk(model):
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                names.setdefault(st.st_ino, []).append(os.path.relpath(p, model))
    ops = []
    for rels in names.values():
        top = lambda r: r.split("/")[0] if "/" in r else "."
        keep = top(sorted(rels)[0])
        ops += [("unlink", r) for r in sorted(rels) if top(r) != keep]
    return ops


def soak(seed, seconds, work):
    env = Env(work / "run", seed)
    stats = Stats()
    base_before = snapshot(env.base, with_times=True)
    rng = random.Random(seed)
    log1, mk, worker_logs, log3 = [], [], {}, []
    phases = []
    t0 = time.time()
    failure = None
    counter = [0]
    try:
        try:
            # Phase 1: one thread, whole tree.
            end = t0 + seconds * 0.3
            run_worker(rng, env, ["."], end, stats, log1, True, threading.Event(), counter)
            compare(str(env.mnt), str(env.model))
            phases.append(("single", stats.ops))
            # Phase 2: WORKERS threads on disjoint subtrees: a fresh directory each, and the
            # base's top-level directories dealt out among them.
            tops = sorted(n for n in os.listdir(env.model)
                          if os.path.isdir(env.model / n) and not os.path.islink(env.model / n))
            for op in separate_subtrees(env.model):
                mk.append(op)
                step(op, str(env.mnt), str(env.model))
            roots = []
            for i in range(WORKERS):
                w = f"w{i}"
                op = ("mkdir", w, 0o755, None)
                mk.append(op)
                step(op, str(env.mnt), str(env.model))
                roots.append([w] + tops[i::WORKERS])
            stop = threading.Event()
            errors = {}
            end = time.time() + seconds * 0.5

            def work_fn(i):
                log = worker_logs.setdefault(i, [])
                try:
                    run_worker(random.Random(seed * 1000 + i + 1), env, roots[i], end, stats,
                               log, False, stop, counter)
                except Divergence as e:
                    errors[i] = e
                    stop.set()
                except Exception as e:  # a bug in the harness must not pass silently
                    errors[i] = e
                    stop.set()

            threads = [threading.Thread(target=work_fn, args=(i,)) for i in range(WORKERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                i, e = sorted(errors.items())[0]
                raise Divergence(f"worker {i} (roots {roots[i]}): {e}", e.sig) if isinstance(
                    e, Divergence) else e
            compare(str(env.mnt), str(env.model))
            phases.append((f"{WORKERS} workers", stats.ops))
            # Phase 3: one thread again, across the workers' subtrees.
            end = t0 + seconds
            run_worker(rng, env, ["."], end, stats, log3, True, threading.Event(), counter)
            compare(str(env.mnt), str(env.model))
            phases.append(("single", stats.ops))
            assert env.fence.alive(), "the fence daemon died"
        except Divergence as e:
            failure = e
        elapsed = time.time() - t0
        if failure is None:
            final = diff(snapshot(str(env.mnt)), snapshot(str(env.model)))
            if final:
                failure = Divergence("final trees differ:\n  " + "\n  ".join(final[:30]),
                                     "trees")
    finally:
        env.close()
    # The operations that led to the failure, in an order that replays it sequentially (the
    # workers' subtrees are disjoint, so their logs concatenate).
    if failure is None or len(phases) == 0:
        sequence = log1
    elif len(phases) == 1 and str(failure).startswith("worker "):
        sequence = log1 + mk + worker_logs.get(int(str(failure).split()[1]), [])
    else:
        sequence = log1 + mk + [op for i in sorted(worker_logs) for op in worker_logs[i]] + log3
    return {"stats": stats, "elapsed": elapsed, "phases": phases, "failure": failure,
            "sequence": sequence, "env": env, "base_before": base_before}


def check_layers(res):
    """After unmounting: base unchanged, upper (merged) equals the model, and a fresh daemon
    over base + upper shows the model."""
    env = res["env"]
    problems = []
    after = snapshot(env.base, with_times=True)
    d = diff(after, res["base_before"], "base now", "base before")
    if d:
        problems.append("the base changed:\n  " + "\n  ".join(d[:20]))
    model = snapshot(env.model)
    d = diff(merged(env.base, env.upper), model, "base+upper", "model")
    if d:
        problems.append("base + upper (merged by the documented rules) is not the model:\n  "
                        + "\n  ".join(d[:20]))
    again = Fence(env.base, env.upper, env.work / "mnt2", cid="soak-again")
    try:
        d = diff(snapshot(str(again.mnt)), model, "remounted fence", "model")
        if d:
            problems.append("a fresh fence over base + upper is not the model:\n  "
                            + "\n  ".join(d[:20]))
    finally:
        again.close()
    upper_entries = sum(len(f) + len(ds) for _, ds, f in os.walk(env.upper))
    return problems, upper_entries


def report(seed, res):
    s = res["stats"]
    rate = s.ops / res["elapsed"] if res["elapsed"] else 0
    figure(f"soak: seed={seed} workers={WORKERS} seconds={res['elapsed']:.1f} ops={s.ops} "
           f"({rate:.0f} ops/s), {'DIVERGED' if res['failure'] is not None else 'model matched'}; "
           f"documented EXDEV refusals={s.exdev}")
    print("  phases (cumulative ops): " + ", ".join(f"{p} -> {n}" for p, n in res["phases"]))
    print("  ops by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(s.by_kind.items())))


@pytest.fixture
def workdir():
    if os.geteuid() != 0:
        pytest.fail("the soak needs root (the fence is a FUSE mount; it chowns)")
    if not BIN.is_file():
        pytest.fail(f"{BIN} is missing: build it first (cargo build --release)")
    d = Path(tempfile.mkdtemp(prefix="afsoak-", dir="/var/tmp"))
    yield d
    for m in (d / "run" / "mnt", d / "run" / "mnt2"):
        if os.path.ismount(m):
            subprocess.run(["umount", "-l", m], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def test_soak_fence_matches_a_plain_directory(workdir):
    seed = SEED
    print(f"\nsoak: seed {seed} (SOAK_SEED), {SECONDS:g} s (SOAK_SECONDS), {WORKERS} workers; "
          f"skipped op kinds: {sorted(SKIP_OPS) or 'none'}")
    res = soak(seed, SECONDS, workdir)
    report(seed, res)
    failure = res["failure"]
    if failure is not None:
        text = str(failure)
        seq = res["sequence"]
        print(f"DIVERGENCE after {res['stats'].ops} ops: {text}")
        ops, again, how = shrink(seq, failure.sig, seed, workdir, SHRINK_SECONDS)
        print(f"shrunk to {len(ops)} ops ({how}); replay says: {again}")
        for op in ops[-40:]:
            print(f"  {op!r}")
        pytest.fail(f"seed {seed}: the fence diverged from the model: {text}\n"
                    f"shrunk ({how}) to {len(ops)} ops (last 40 shown):\n  "
                    + "\n  ".join(repr(o) for o in ops[-40:]) + f"\nreplay: {again}")
    problems, upper_entries = check_layers(res)
    print(f"  after unmount: upper holds {upper_entries} entries; base unchanged: "
          f"{not any(p.startswith('the base') for p in problems)}")
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    assert upper_entries > 0, "the upper layer is empty after the soak"
    assert res["stats"].ops >= 200, f"only {res['stats'].ops} operations ran"
