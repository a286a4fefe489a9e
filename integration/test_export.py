"""`agentfense-runc export ID`: a fenced container's delta as an OCI image layer.

A fenced container changes a bind-mounted workspace at /srv/app (creates, modifies, deletes,
renames, makes directories and links, replaces a directory). After it is deleted, its kept
delta is exported; the layer must hold exactly the changes (with `.wh.` whiteouts and an
opaque marker), and an image made of the base and that layer, loaded into Docker and run with
plain runc, must show the workspace as the fenced container saw it.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

from conftest import BIN, DOCKER, IMAGE, sh, unique
from test_fence import no_leftovers

WS = "/srv/app"
STATE = Path("/var/lib/agentfense/containers")
POLICY = [{"pattern": "**", "permission": "write"}]

# What the workspace looks like, one line per entry: kind, path, mode, owner, mtime, and the
# content's digest or the link's target. The same script runs in the fenced container and in
# a plain runc container of the image built from the exported layer.
SNAPSHOT = r"""
cd /srv/app && find . | sort | while read -r p; do
  if [ -L "$p" ]; then echo "L $p $(stat -c '%u:%g %Y' "$p") -> $(readlink "$p")";
  elif [ -p "$p" ]; then echo "P $p $(stat -c '%a %u:%g %Y' "$p")";
  elif [ -d "$p" ]; then echo "D $p $(stat -c '%a %u:%g %Y' "$p")";
  else echo "F $p $(stat -c '%a %u:%g %Y %s' "$p") $(md5sum < "$p" | cut -c1-32)"; fi
done
"""

CHANGES = r"""
set -e
cd /srv/app
echo created > new.txt
ln new.txt hard.txt
echo more >> modify.txt
chmod 0640 modify.txt
rm delete.txt
mv rename_src.txt renamed.txt
mkdir -p newdir/deeper
echo deep > newdir/deeper/f.txt
touch -d '2001-02-03 04:05:06' newdir/deeper/f.txt
echo tool > tool && chmod 4755 tool
ln -s keep.txt newlink
rm -rf gone_dir
rm -rf redo && mkdir redo && echo fresh > redo/fresh.txt
mkfifo pipe
"""


def make_base(base):
    (base / "sub").mkdir(parents=True)
    (base / "keep.txt").write_text("keep\n")
    (base / "modify.txt").write_text("old\n")
    os.setxattr(base / "modify.txt", "user.note", b"kept\nacross copy-up")
    (base / "delete.txt").write_text("delete me\n")
    (base / "rename_src.txt").write_text("renamed content\n")
    (base / "sub" / "a.txt").write_text("a\n")
    os.symlink("keep.txt", base / "link")
    (base / "gone_dir" / "inner").mkdir(parents=True)
    (base / "gone_dir" / "inner" / "x").write_text("x\n")
    (base / "gone_dir" / "y").write_text("y\n")
    (base / "redo").mkdir()
    (base / "redo" / "old1").write_text("old1\n")
    (base / "redo" / "old2").write_text("old2\n")
    for dirpath, dirnames, filenames in os.walk(base):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(Path(dirpath) / f, 0o644)
    # Whole seconds, so that every tool agrees on the times.
    for dirpath, dirnames, filenames in os.walk(base, topdown=False):
        for n in filenames + dirnames:
            os.utime(Path(dirpath) / n, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    os.utime(base, (1_600_000_000, 1_600_000_000))


def run_bytes(args, timeout=120):
    p = subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout)
    assert p.returncode == 0, f"{args} exited {p.returncode}: {p.stderr.decode(errors='replace')}"
    return p.stdout


def layer_of_base(base, tmp):
    """Layer 1: the test image's file system (`docker export`) with the base at /srv/app in
    place of the image's own /srv/app content."""
    name = unique("af-export-base")
    sh([DOCKER, "create", "--name", name, IMAGE, "true"], check=True)
    try:
        exported = run_bytes([DOCKER, "export", name])
    finally:
        sh([DOCKER, "rm", "-f", name])
    out = tmp / "layer1.tar"
    with tarfile.open(fileobj=io.BytesIO(exported)) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            n = m.name[2:] if m.name.startswith("./") else m.name
            if n.rstrip("/") == "srv/app" or n.startswith("srv/app/"):
                continue
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        dst.add(base, arcname="srv/app", recursive=True)
    return out


def save_format_image(tag, layers, tmp):
    """An image in `docker save` format, made by hand: manifest.json, the config with the
    layers' diff_ids, and the layer tars."""
    arch = sh([DOCKER, "image", "inspect", "-f", "{{.Architecture}}", IMAGE], check=True).stdout.strip()
    diff_ids, names = [], []
    for i, layer in enumerate(layers):
        diff_ids.append("sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest())
        names.append(f"layer{i}/layer.tar")
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "base"}, {"created_by": "agentfense-runc export"}],
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": names}]
    image_tar = tmp / "image.tar"
    with tarfile.open(image_tar, "w") as t:
        def add_bytes(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add_bytes(config_name, config_bytes)
        for name, layer in zip(names, layers):
            t.add(layer, arcname=name)
        add_bytes("manifest.json", json.dumps(manifest).encode())
    return image_tar


def test_export_is_the_layer_docker_would_build(docker_engine, image, tmp_path, cleanup_docker):
    base = tmp_path / "base"
    make_base(base)
    name = unique()
    cleanup_docker.append(name)
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense",
        "-e", "AGENTFENSE_POLICY=" + json.dumps(POLICY), "-e", "AGENTFENSE_WORKSPACE=" + WS,
        "-v", f"{base}:{WS}", IMAGE, "sleep", "1000"], check=True)
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    tag = f"agentfense-test/export-{uuid.uuid4().hex[:12]}:latest"
    try:
        p = sh([DOCKER, "exec", name, "sh", "-c", CHANGES])
        assert p.returncode == 0, p.stdout + p.stderr
        seen = sh([DOCKER, "exec", name, "sh", "-c", SNAPSHOT], check=True).stdout
        # The snapshot is not trivially equal to anything: the changes are there.
        assert "F ./modify.txt 640 0:0" in seen and "./delete.txt" not in seen, seen
        assert "D ./redo 755" in seen and "./redo/old1" not in seen, seen
        assert "F ./tool 4755 0:0" in seen and " 981173106 5 " in seen, seen
        sh([DOCKER, "rm", "-f", name], check=True)
        no_leftovers()

        # Exported after delete, from the kept delta; twice, byte for byte the same.
        layer = run_bytes([BIN, "export", cid])
        assert run_bytes([BIN, "export", cid[:16]]) == layer
        layer2 = tmp_path / "layer2.tar"
        layer2.write_bytes(layer)

        # (1) Exactly the changes, in order, parents first.
        with tarfile.open(layer2) as t:
            members = t.getmembers()
            entries = [(m.name, m.type) for m in members]
            by = {m.name: m for m in members}
            content = {m.name: t.extractfile(m).read() for m in members if m.isreg()}
        REG, DIR, SYM, LNK, FIFO = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE
        assert entries == [
            ("srv/app", DIR),
            ("srv/app/.wh.delete.txt", REG),
            ("srv/app/.wh.gone_dir", REG),
            ("srv/app/hard.txt", REG),
            ("srv/app/modify.txt", REG),
            ("srv/app/new.txt", LNK),
            ("srv/app/newdir", DIR),
            ("srv/app/newdir/deeper", DIR),
            ("srv/app/newdir/deeper/f.txt", REG),
            ("srv/app/newlink", SYM),
            ("srv/app/pipe", FIFO),
            ("srv/app/redo", DIR),
            ("srv/app/redo/.wh..wh..opq", REG),
            ("srv/app/redo/fresh.txt", REG),
            ("srv/app/.wh.rename_src.txt", REG),
            ("srv/app/renamed.txt", REG),
            ("srv/app/tool", REG),
        ], entries
        assert content["srv/app/hard.txt"] == b"created\n"
        assert by["srv/app/new.txt"].linkname == "srv/app/hard.txt"
        assert content["srv/app/modify.txt"] == b"old\nmore\n"
        assert by["srv/app/modify.txt"].mode == 0o640
        assert by["srv/app/tool"].mode == 0o4755
        assert by["srv/app/newdir/deeper/f.txt"].mtime == 981173106
        # Copy-up kept the user's extended attribute; our bookkeeping stays out.
        assert by["srv/app/modify.txt"].pax_headers.get("SCHILY.xattr.user.note") == "kept\nacross copy-up"
        assert not any("agentfense" in k for m in members for k in m.pax_headers), \
            [m.pax_headers for m in members]
        assert content["srv/app/renamed.txt"] == b"renamed content\n"
        assert content["srv/app/newdir/deeper/f.txt"] == b"deep\n"
        assert content["srv/app/redo/fresh.txt"] == b"fresh\n"
        assert by["srv/app/newlink"].linkname == "keep.txt"
        for wh in ("srv/app/.wh.delete.txt", "srv/app/.wh.gone_dir", "srv/app/.wh.rename_src.txt",
                   "srv/app/redo/.wh..wh..opq"):
            assert content[wh] == b""

        # (2) Base + layer as an image, run with plain runc: the same tree as the fenced
        # container saw.
        layer1 = layer_of_base(base, tmp_path)
        image_tar = save_format_image(tag, [layer1, layer2], tmp_path)
        sh([DOCKER, "load", "-i", image_tar], check=True, timeout=300)
        p = sh([DOCKER, "run", "--rm", "--runtime", "runc", tag, "sh", "-c", SNAPSHOT])
        assert p.returncode == 0, p.stderr
        assert p.stdout == seen, f"fenced:\n{seen}\nimage:\n{p.stdout}"
        # The fence shows each name of a file on its own; the layer keeps them one file.
        p = sh([DOCKER, "run", "--rm", "--runtime", "runc", tag, "stat", "-c", "%i %h",
                f"{WS}/new.txt", f"{WS}/hard.txt"], check=True)
        first, second = p.stdout.splitlines()
        assert first == second and first.endswith(" 2"), p.stdout
    finally:
        sh([DOCKER, "rm", "-f", name])
        sh([DOCKER, "rmi", "-f", tag])
        # The kept delta was this test's own.
        if cid and (STATE / cid).is_dir():
            shutil.rmtree(STATE / cid)
    no_leftovers()


HIDING_POLICY = [{"pattern": "**", "permission": "write"},
                 {"pattern": "**/.env", "permission": "none", "priority": 100}]

HIDDEN_CHANGES = r"""
set -e
cd /srv/app
rm -rf hid
rm -rf opq && mkdir opq && echo new > opq/new.txt
rm -rf plain_gone
rm -rf xdir && echo file > xdir
"""


def test_export_deletes_nothing_the_policy_hid(docker_engine, image, tmp_path, cleanup_docker):
    """As commit (SPEC §4-§5): a directory removed or replaced in the container keeps, in an
    image built on the base and the layer, the entries the policy hid from the container."""
    base = tmp_path / "base"
    files = {"hid/vis.txt": "vis\n", "hid/.env": "HID=1\n", "hid/sub/.env": "SUB=1\n",
             "hid/sub/s.txt": "s\n", "hid/plain/p.txt": "p\n",
             "opq/old.txt": "old\n", "opq/.env": "OPQ=1\n",
             "plain_gone/x.txt": "x\n",
             "xdir/.env": "X=1\n", "xdir/y.txt": "y\n"}
    for rel, text in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    for dirpath, dirnames, filenames in os.walk(base):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(Path(dirpath) / f, 0o644)
    name = unique()
    cleanup_docker.append(name)
    sh([DOCKER, "run", "-d", "--name", name, "--runtime", "agentfense",
        "-e", "AGENTFENSE_POLICY=" + json.dumps(HIDING_POLICY), "-e", "AGENTFENSE_WORKSPACE=" + WS,
        "-v", f"{base}:{WS}", IMAGE, "sleep", "1000"], check=True)
    cid = sh([DOCKER, "inspect", "-f", "{{.Id}}", name], check=True).stdout.strip()
    tag = f"agentfense-test/export-{uuid.uuid4().hex[:12]}:latest"
    try:
        p = sh([DOCKER, "exec", name, "sh", "-c", HIDDEN_CHANGES])
        assert p.returncode == 0, p.stdout + p.stderr
        seen = sh([DOCKER, "exec", name, "sh", "-c", "cd /srv/app && find . | sort"], check=True).stdout
        assert seen.split() == [".", "./opq", "./opq/new.txt", "./xdir"], seen
        sh([DOCKER, "rm", "-f", name], check=True)
        no_leftovers()
        # The host base is untouched (the delta was kept, not committed).
        for rel, text in files.items():
            assert (base / rel).read_text() == text, rel

        layer = run_bytes([BIN, "export", cid])
        assert run_bytes([BIN, "export", cid]) == layer
        layer2 = tmp_path / "layer2.tar"
        layer2.write_bytes(layer)
        with tarfile.open(layer2) as t:
            members = t.getmembers()
            entries = [(m.name, m.type) for m in members]
            content = {m.name: t.extractfile(m).read() for m in members if m.isreg()}
        REG, DIR = tarfile.REGTYPE, tarfile.DIRTYPE
        # No `.wh.hid`, no `.wh..wh..opq` in `opq`, no `xdir` file: whiteouts of what the
        # container saw, directories kept for what it did not.
        assert entries == [
            ("srv/app", DIR),
            ("srv/app/hid", DIR),
            ("srv/app/hid/.wh.plain", REG),
            ("srv/app/hid/sub", DIR),
            ("srv/app/hid/sub/.wh.s.txt", REG),
            ("srv/app/hid/.wh.vis.txt", REG),
            ("srv/app/opq", DIR),
            ("srv/app/opq/.wh.old.txt", REG),
            ("srv/app/opq/new.txt", REG),
            ("srv/app/.wh.plain_gone", REG),
            ("srv/app/xdir", DIR),
            ("srv/app/xdir/.wh.y.txt", REG),
        ], entries
        assert content["srv/app/opq/new.txt"] == b"new\n"
        assert not any(".env" in n for n, _ in entries), entries

        layer1 = layer_of_base(base, tmp_path)
        image_tar = save_format_image(tag, [layer1, layer2], tmp_path)
        sh([DOCKER, "load", "-i", image_tar], check=True, timeout=300)
        p = sh([DOCKER, "run", "--rm", "--runtime", "runc", tag, "sh", "-c",
                "cd /srv/app && find . | sort && cat hid/.env hid/sub/.env opq/.env xdir/.env opq/new.txt"])
        assert p.returncode == 0, p.stderr
        assert p.stdout.split("\n") == [
            ".", "./hid", "./hid/.env", "./hid/sub", "./hid/sub/.env",
            "./opq", "./opq/.env", "./opq/new.txt", "./xdir", "./xdir/.env",
            "HID=1", "SUB=1", "OPQ=1", "X=1", "new", "",
        ], p.stdout
    finally:
        sh([DOCKER, "rm", "-f", name])
        sh([DOCKER, "rmi", "-f", tag])
        if cid and (STATE / cid).is_dir():
            shutil.rmtree(STATE / cid)
    no_leftovers()
