"""Inputs made once and kept under the cache directory (default /var/cache/agentfense-bench):
a git checkout of a slice of the tree, a large file for sequential reads, a tar of many small
files. Each is built beside its final name and renamed into place, so an interrupted build is
never mistaken for a finished one."""

import hashlib
import io
import os
import random
import shutil
import tarfile
import tempfile
from pathlib import Path

from .util import WorkloadError, log, run


def _slug(*parts):
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def _publish(tmp, final):
    try:
        os.rename(tmp, final)
    except OSError:
        # Someone else finished first.
        shutil.rmtree(tmp, ignore_errors=True)
        if not Path(final).exists():
            raise


def tree_stats(tree):
    files = size = 0
    for d, _, fs in os.walk(tree):
        for f in fs:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:
                continue
            files += 1
            size += st.st_size
    return files, size


def git_checkout(cache, tree, max_files):
    """A git repository (one commit) holding a copy of whole top-level entries of `tree` (the
    crates, for the cargo registry) until about max_files files."""
    final = Path(cache) / f"git-{Path(tree).name}-{max_files}-{_slug(os.path.realpath(tree), max_files)}"
    if (final / ".git").is_dir():
        return final
    log(f"making the git checkout {final} (once)")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-git-", dir=cache))
    n = 0
    for entry in sorted(os.listdir(tree)):
        if n >= max_files:
            break
        src = Path(tree) / entry
        if entry == ".git":
            continue
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, tmp / entry, symlinks=True,
                            ignore=shutil.ignore_patterns(".git"))
            n += sum(len(f) for _, _, f in os.walk(tmp / entry))
        else:
            shutil.copy2(src, tmp / entry, follow_symlinks=False)
            n += 1
    g = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
         "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
    run(g + ["init", "-q"], cwd=tmp)
    # -f: the copied crates' own .gitignore files must not leave files out.
    run(g + ["add", "-A", "-f"], cwd=tmp, timeout=600)
    run(g + ["commit", "-q", "-m", f"a slice of {tree}"], cwd=tmp, timeout=600)
    _publish(tmp, final)
    return final


def big_file(cache, size):
    """A directory holding data.bin: `size` bytes of random data (not sparse)."""
    final = Path(cache) / f"read-{size >> 20}MiB"
    if (final / "data.bin").is_file() and (final / "data.bin").stat().st_size == size:
        return final
    log(f"writing {size >> 20} MiB to {final} (once)")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-read-", dir=cache))
    chunk = 8 << 20
    with open(tmp / "data.bin", "wb") as f:
        left = size
        while left > 0:
            f.write(os.urandom(min(chunk, left)))
            left -= chunk
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    _publish(tmp, final)
    return final


def small_files_tar(cache, count):
    """A tar of `count` regular files, 100 per directory, 200 B to 4 KiB of text each."""
    final = Path(cache) / f"files-{count}.tar"
    if final.is_file():
        return final
    log(f"writing {final} (once)")
    rng = random.Random(count)
    words = [f"word{i}" for i in range(500)]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-tar-", dir=cache)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for i in range(count):
            if i % 100 == 0:
                ti = tarfile.TarInfo(f"d{i // 100:04d}")
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
                t.addfile(ti)
            body = " ".join(rng.choice(words) for _ in range(rng.randint(30, 600))).encode()[:4096]
            ti = tarfile.TarInfo(f"d{i // 100:04d}/f{i % 100:03d}.txt")
            ti.size, ti.mode, ti.mtime = len(body), 0o644, 1_600_000_000
            t.addfile(ti, io.BytesIO(body))
    os.rename(tmp, final)
    return final


def writable_base(parent):
    """A fresh base for the write workloads: an empty `output/` (agent-safe writes there)."""
    d = Path(tempfile.mkdtemp(prefix="afbench-wbase-", dir=parent))
    (d / "output").mkdir()
    (d / "README").write_text("writable area for the benchmark\n")
    return d


def ensure_cache(cache):
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkloadError(f"cannot create the cache directory {cache}: {e}") from None
