//! `agentfense-runc export ID`: the delta as an OCI image layer (a tar, SPEC §5), the way
//! `docker diff`/`docker export` users expect one: apply it over the image (or a tar of the
//! base) and you get what the container saw.
//!
//! What goes in, for each workspace (`dest`, `upper`):
//! - paths relative to the container root: `dest` without its leading `/`, then the path in the
//!   upper directory (`srv/app/output/x.txt`); an entry for the workspace directory itself (the
//!   upper root's owner, mode and time) and for every directory of the upper tree, never for
//!   the ancestors of `dest`;
//! - regular files (content, mode with setuid/setgid/sticky bits, uid, gid, mtime), symlinks
//!   (as links, never followed), directories and FIFOs; a file with several names in the upper
//!   layer is stored once, its other names as hard links to the first one written;
//! - a whiteout (character device 0:0) at `a/b` becomes the empty file `a/.wh.b`; a directory
//!   marked opaque (`trusted.agentfense.opaque`) is followed by the empty file
//!   `dir/.wh..wh..opq` (as Docker's overlay2 driver writes them);
//! - extended attributes other than our own `trusted.agentfense.*` as PAX records
//!   `SCHILY.xattr.NAME` (what Docker and containerd read);
//! - long names and link targets as PAX `path`/`linkpath` records (bytes as they are: names
//!   need not be UTF-8); large ids, sizes and times as PAX records too.
//!
//! Left out, and counted: device nodes other than whiteouts and sockets (a layer cannot
//! carry them usefully; the fence never creates them) in [`ExportStats::skipped`]; and entries
//! whose name starts with `.wh.` in [`ExportStats::reserved_names`]. The container can create
//! such names (they are ordinary names inside the fence), but in a layer they are whiteouts:
//! exported, a file named `.wh.secrets` would delete `secrets`, which the container may never
//! have seen, from every image built on the layer. SPEC §5: no name a container creates
//! changes what else is visible.
//!
//! The output is deterministic: entries in byte order of their names, a directory before what
//! is in it, times from the files (seconds), no user or group names, no "now" anywhere. The
//! same delta exports to the same bytes.
//!
//! The upper directory was filled by an untrusted container. Every entry is opened relative to
//! its directory's descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and
//! `O_NOFOLLOW` ([`sfs::open_entry`]), first as `O_PATH`: a symlink is read as a link, a device
//! node is never opened for reading, and a regular file is read through the very descriptor it
//! was found with ([`sfs::reopen`]), so nothing outside the upper directory is ever read.
//!
//! The upper directory should be quiet (the container deleted). If it changes all the same,
//! the tar is still well-formed: a file is written with exactly the size its header says (zeros
//! after a file that shrank, the end of one that grew cut off), an entry that vanished is left
//! out, and each such event is counted in [`ExportStats::changed`] and logged as a warning.
//! Errors that are not of that kind (I/O errors, a missing upper directory) fail the export:
//! the output then stops without the tar's end-of-archive blocks.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tar::{EntryType, Header};

use crate::fence::layers::{is_private_xattr, OPAQUE_XATTR};
use crate::sys::fs::{self as sfs, Errno, FileType, OFlags, Stat};

/// The prefix that makes a layer entry a whiteout (OCI image spec, "Whiteouts").
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The name of the opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Counts of what went into the layer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportStats {
    /// Tar entries written (of every kind, whiteouts and opaque markers included; PAX extended
    /// headers not counted).
    pub entries: u64,
    /// `.wh.NAME` whiteout files.
    pub whiteouts: u64,
    /// Opaque directories (each with a `.wh..wh..opq` marker).
    pub opaque_dirs: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Hard link entries (further names of a file already written).
    pub hardlinks: u64,
    /// Device nodes other than whiteouts, and sockets: left out.
    pub skipped: u64,
    /// Entries named `.wh.*`: left out (in a layer they would be whiteouts).
    pub reserved_names: u64,
    /// Extended attributes that cannot be PAX keys (names not UTF-8 or holding `=`): left out.
    pub skipped_xattrs: u64,
    /// Entries that changed or vanished while being exported (see the module comment).
    pub changed: u64,
}

/// Writes the deltas of `workspaces` (`(dest, upper)`: the workspace path in the container and
/// its upper directory) as one OCI layer tar to `out`.
pub fn export_layer(
    workspaces: &[(String, PathBuf)],
    out: &mut dyn Write,
) -> anyhow::Result<ExportStats> {
    let mut ws = Vec::with_capacity(workspaces.len());
    for (dest, upper) in workspaces {
        ws.push((container_prefix(dest)?, dest.as_str(), upper));
    }
    ws.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = ws.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("workspace {} is listed twice", w[0].1);
    }
    let mut ex = Exporter {
        tar: TarOut { out },
        stats: ExportStats::default(),
        links: HashMap::new(),
    };
    for (prefix, dest, upper) in ws {
        ex.workspace(&prefix, upper)
            .with_context(|| format!("workspace {dest} (delta in {})", upper.display()))?;
    }
    ex.tar.finish()?;
    Ok(ex.stats)
}

/// `"/srv/app"` to `b"srv/app"` (`"/"` to an empty prefix). Refuses relative paths and `..`.
fn container_prefix(dest: &str) -> Result<Vec<u8>> {
    if !dest.starts_with('/') {
        bail!("workspace path {dest:?} is not absolute");
    }
    let mut out = Vec::new();
    for c in dest.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("workspace path {dest:?} holds `..`"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c.as_bytes());
            }
        }
    }
    Ok(out)
}

/// `dir/name` as bytes (`name` alone under the empty prefix).
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// A directory being walked: its descriptor, its path in the layer, and the entries left.
struct Frame {
    dir: OwnedFd,
    path: Vec<u8>,
    names: std::vec::IntoIter<OsString>,
}

struct Exporter<'a> {
    tar: TarOut<'a>,
    stats: ExportStats,
    /// Files with several names: (device, inode) to the path they were first written under.
    links: HashMap<(u64, u64), Vec<u8>>,
}

/// The metadata of one tar entry.
struct Meta {
    kind: EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

impl Meta {
    fn of(kind: EntryType, st: &Stat) -> Meta {
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
        }
    }
}

impl Exporter<'_> {
    fn workspace(&mut self, prefix: &[u8], upper: &Path) -> Result<()> {
        let root = sfs::open_root(upper)
            .map_err(io::Error::from)
            .with_context(|| format!("cannot open the upper directory {}", upper.display()))?;
        let st = fstat(root.as_fd())?;
        if sfs::file_type(&st) != FileType::Directory {
            bail!("{} is not a directory", upper.display());
        }
        // The workspace directory itself: its entry (not under the empty prefix of `/`: a
        // layer has no entry for the root), then its opaque marker if it has one.
        let xattrs = self.xattrs(root.as_fd(), prefix)?;
        if !prefix.is_empty() {
            self.dir_entry(prefix, &st, &xattrs)?;
        }
        if is_opaque(&xattrs) {
            self.opaque_marker(prefix, &st)?;
        }
        let names = self.listing(root.as_fd(), prefix)?;
        let mut stack = vec![Frame {
            dir: root,
            path: prefix.to_vec(),
            names: names.into_iter(),
        }];
        // Depth first without recursion: a deep tree made by the container costs one open
        // descriptor a level (EMFILE fails the export cleanly), never the stack.
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.next() else {
                stack.pop();
                continue;
            };
            let path = join(&top.path, name.as_bytes());
            if let Some(dir) = self.entry(top.dir.as_fd(), &name, &path)? {
                let names = self.listing(dir.as_fd(), &path)?;
                stack.push(Frame {
                    dir,
                    path,
                    names: names.into_iter(),
                });
            }
        }
        Ok(())
    }

    /// The names in a directory, in byte order.
    fn listing(&mut self, dir: BorrowedFd<'_>, path: &[u8]) -> Result<Vec<OsString>> {
        let mut names: Vec<OsString> = match sfs::read_dir(dir, ".") {
            Ok(v) => v.into_iter().map(|(n, _)| n).collect(),
            Err(Errno::NOENT) => {
                self.changed(path, "directory removed while exporting");
                Vec::new()
            }
            Err(e) => return Err(io_err(e, "cannot list", path)),
        };
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    /// Writes the entry `name` of `dir` (at `path` in the layer). Returns the directory to
    /// descend into when it is one.
    fn entry(&mut self, dir: BorrowedFd<'_>, name: &OsStr, path: &[u8]) -> Result<Option<OwnedFd>> {
        if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
            self.stats.reserved_names += 1;
            tracing::warn!(
                "export: left out {}: names starting with .wh. are whiteouts in a layer",
                lossy(path)
            );
            return Ok(None);
        }
        let fd = match sfs::open_entry(dir, name, OFlags::PATH) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                self.changed(path, "removed while exporting");
                return Ok(None);
            }
            Err(e) => return Err(io_err(e, "cannot open", path)),
        };
        let st = fstat(fd.as_fd())?;
        let kind = sfs::file_type(&st);
        match kind {
            FileType::Directory => {
                let xattrs = self.xattrs(fd.as_fd(), path)?;
                self.dir_entry(path, &st, &xattrs)?;
                if is_opaque(&xattrs) {
                    self.opaque_marker(path, &st)?;
                }
                return Ok(Some(fd));
            }
            FileType::CharacterDevice if st.st_rdev == 0 => {
                let (parent, base) = match path.iter().rposition(|b| *b == b'/') {
                    Some(i) => (&path[..i], &path[i + 1..]),
                    None => (&path[..0], path),
                };
                let wh = join(parent, &[WHITEOUT_PREFIX, base].concat());
                // As Docker's overlay2 driver writes them: the whiteout's owner and time,
                // mode 0600.
                let meta = Meta {
                    mode: 0o600,
                    ..Meta::of(EntryType::Regular, &st)
                };
                self.tar.entry(&wh, &meta, None, &[], None)?;
                self.stats.entries += 1;
                self.stats.whiteouts += 1;
                return Ok(None);
            }
            FileType::RegularFile | FileType::Symlink | FileType::Fifo => {}
            _ => {
                self.stats.skipped += 1;
                tracing::warn!(
                    "export: left out {}: a {} cannot go into a layer",
                    lossy(path),
                    if kind == FileType::Socket {
                        "socket"
                    } else {
                        "device node"
                    }
                );
                return Ok(None);
            }
        }
        // A further name of a file already written: a hard link to it.
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                let first = first.clone();
                let meta = Meta::of(EntryType::Link, &st);
                self.tar.entry(path, &meta, Some(&first), &[], None)?;
                self.stats.entries += 1;
                self.stats.hardlinks += 1;
                return Ok(None);
            }
            self.links.insert(key, path.to_vec());
        }
        let xattrs = self.xattrs(fd.as_fd(), path)?;
        match kind {
            FileType::Symlink => {
                let target = match sfs::readlink_fd(fd.as_fd()) {
                    Ok(t) => t,
                    Err(e) => return Err(io_err(e, "cannot read link", path)),
                };
                let meta = Meta::of(EntryType::Symlink, &st);
                self.tar
                    .entry(path, &meta, Some(target.as_bytes()), &xattrs, None)?;
            }
            FileType::Fifo => {
                let meta = Meta::of(EntryType::Fifo, &st);
                self.tar.entry(path, &meta, None, &xattrs, None)?;
            }
            _ => self.file(fd, path, &xattrs)?,
        }
        self.stats.entries += 1;
        Ok(None)
    }

    /// A regular file, read through the descriptor it was found with.
    fn file(&mut self, fd: OwnedFd, path: &[u8], xattrs: &[(String, Vec<u8>)]) -> Result<()> {
        let file = sfs::reopen(
            fd.as_fd(),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        )
        .map_err(|e| io_err(e, "cannot read", path))?;
        // The size as of now, from the open file: what the header promises and what is written.
        let st = fstat(file.as_fd())?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let meta = Meta::of(EntryType::Regular, &st);
        let mut data = Exact {
            inner: std::fs::File::from(file),
            left: size,
            short: false,
        };
        self.tar
            .entry(path, &meta, None, xattrs, Some((&mut data, size)))
            .map_err(|e| anyhow::Error::from(e).context(format!("reading {}", lossy(path))))?;
        self.stats.bytes += size;
        let mut one = [0u8; 1];
        let grew = loop {
            match data.inner.read(&mut one) {
                Ok(n) => break n > 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        if data.short {
            self.changed(path, "shrank while exporting: padded with zeros");
        } else if grew {
            self.changed(path, "grew while exporting: cut at the size first seen");
        }
        Ok(())
    }

    fn dir_entry(&mut self, path: &[u8], st: &Stat, xattrs: &[(String, Vec<u8>)]) -> Result<()> {
        let mut p = path.to_vec();
        p.push(b'/');
        let meta = Meta::of(EntryType::Directory, st);
        self.tar.entry(&p, &meta, None, xattrs, None)?;
        self.stats.entries += 1;
        Ok(())
    }

    /// `dir/.wh..wh..opq`: the directory's owner, permission bits and time, as Docker's
    /// overlay2 driver writes it.
    fn opaque_marker(&mut self, dir: &[u8], st: &Stat) -> Result<()> {
        let meta = Meta {
            mode: st.st_mode & 0o777,
            ..Meta::of(EntryType::Regular, st)
        };
        self.tar
            .entry(&join(dir, OPAQUE_MARKER), &meta, None, &[], None)?;
        self.stats.entries += 1;
        self.stats.opaque_dirs += 1;
        Ok(())
    }

    /// The extended attributes of an entry, sorted by name, with ours included only as far as
    /// the opaque mark goes (see [`is_opaque`]; it never reaches the tar).
    fn xattrs(&mut self, fd: BorrowedFd<'_>, path: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
        let names = match sfs::list_xattr_fd(fd) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(io_err(e, "cannot list the extended attributes of", path)),
        };
        let mut out = Vec::new();
        for name in names {
            if is_private_xattr(&name) {
                if name == OPAQUE_XATTR {
                    out.push((OPAQUE_XATTR.to_string(), Vec::new()));
                }
                continue;
            }
            let key = match name.to_str() {
                Some(k) if !k.contains('=') => k.to_string(),
                _ => {
                    self.stats.skipped_xattrs += 1;
                    tracing::warn!(
                        "export: left out extended attribute {:?} of {}: not a PAX key",
                        name,
                        lossy(path)
                    );
                    continue;
                }
            };
            match sfs::get_xattr_fd(fd, &name) {
                Ok(v) => out.push((key, v)),
                Err(Errno::NODATA) => {
                    self.changed(path, "extended attribute removed while exporting")
                }
                Err(e) => return Err(io_err(e, "cannot read the extended attributes of", path)),
            }
        }
        out.sort();
        Ok(out)
    }

    fn changed(&mut self, path: &[u8], what: &str) {
        self.stats.changed += 1;
        tracing::warn!("export: {}: {what}", lossy(path));
    }
}

/// Whether the attributes read by [`Exporter::xattrs`] mark the directory opaque.
fn is_opaque(xattrs: &[(String, Vec<u8>)]) -> bool {
    xattrs.iter().any(|(k, _)| k == OPAQUE_XATTR)
}

fn fstat(fd: BorrowedFd<'_>) -> Result<Stat> {
    // `lstat` of "." is `fstat` of the descriptor itself.
    match sfs::lstat(fd, ".") {
        Ok(Some(st)) => Ok(st),
        Ok(None) => Err(io::Error::from(Errno::NOENT).into()),
        Err(e) => Err(io::Error::from(e).into()),
    }
}

fn io_err(e: Errno, what: &str, path: &[u8]) -> anyhow::Error {
    anyhow::Error::from(io::Error::from(e)).context(format!("{what} {}", lossy(path)))
}

/// Reads exactly `left` bytes from `inner`: zeros after an early end.
struct Exact<R> {
    inner: R,
    left: u64,
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

const BLOCK: usize = 512;
/// The ustar name and link name fields (and the prefix field).
const USTAR_NAME: usize = 100;
const USTAR_PREFIX: usize = 155;
/// The largest values the octal header fields hold (7 and 11 digits).
const MAX_ID: u64 = 0o7777777;
const MAX_SIZE: u64 = 0o777_7777_7777;

/// The tar stream: ustar headers, PAX extended headers where ustar falls short.
struct TarOut<'a> {
    out: &'a mut dyn Write,
}

impl TarOut<'_> {
    /// Writes one entry: `link` is the target of a symlink or hard link, `data` the content
    /// of a regular file and its size (exactly that many bytes are read from it).
    fn entry(
        &mut self,
        path: &[u8],
        meta: &Meta,
        link: Option<&[u8]>,
        xattrs: &[(String, Vec<u8>)],
        data: Option<(&mut dyn Read, u64)>,
    ) -> io::Result<()> {
        let mut pax = Pax::default();
        let mut h = Header::new_ustar();
        h.set_entry_type(meta.kind);
        h.set_mode(meta.mode);
        h.set_uid(u64::from(meta.uid));
        h.set_gid(u64::from(meta.gid));
        if u64::from(meta.uid) > MAX_ID {
            pax.record("uid", meta.uid.to_string().as_bytes());
        }
        if u64::from(meta.gid) > MAX_ID {
            pax.record("gid", meta.gid.to_string().as_bytes());
        }
        match u64::try_from(meta.mtime) {
            Ok(t) if t <= MAX_SIZE => h.set_mtime(t),
            Ok(t) => {
                h.set_mtime(t);
                pax.record("mtime", t.to_string().as_bytes());
            }
            Err(_) => {
                h.set_mtime(0);
                pax.record("mtime", meta.mtime.to_string().as_bytes());
            }
        }
        let size = data.as_ref().map_or(0, |d| d.1);
        h.set_size(size);
        if size > MAX_SIZE {
            pax.record("size", size.to_string().as_bytes());
        }
        h.set_device_major(0)?;
        h.set_device_minor(0)?;
        {
            let ustar = h.as_ustar_mut().ok_or_else(not_ustar)?;
            if let Some((prefix, name)) = split_ustar(path) {
                ustar.prefix[..prefix.len()].copy_from_slice(prefix);
                ustar.name[..name.len()].copy_from_slice(name);
            } else {
                ustar.name.copy_from_slice(&path[..USTAR_NAME]);
                pax.record("path", path);
            }
            if let Some(link) = link {
                if link.len() <= USTAR_NAME {
                    ustar.linkname[..link.len()].copy_from_slice(link);
                } else {
                    ustar.linkname.copy_from_slice(&link[..USTAR_NAME]);
                    pax.record("linkpath", link);
                }
            }
        }
        for (k, v) in xattrs {
            if k != OPAQUE_XATTR {
                pax.record(&format!("SCHILY.xattr.{k}"), v);
            }
        }
        if !pax.0.is_empty() {
            let mut x = Header::new_ustar();
            x.set_entry_type(EntryType::XHeader);
            x.as_ustar_mut().ok_or_else(not_ustar)?.name[..14].copy_from_slice(b"././@PaxHeader");
            x.set_mode(0o644);
            x.set_uid(0);
            x.set_gid(0);
            x.set_mtime(0);
            x.set_size(pax.0.len() as u64);
            x.set_device_major(0)?;
            x.set_device_minor(0)?;
            x.set_cksum();
            self.out.write_all(x.as_bytes())?;
            self.out.write_all(&pax.0)?;
            self.pad(pax.0.len() as u64)?;
        }
        h.set_cksum();
        self.out.write_all(h.as_bytes())?;
        if let Some((r, size)) = data {
            let n = io::copy(&mut r.take(size), &mut self.out)?;
            if n != size {
                // Only a reader that does not keep its promise gets here: never write a tar
                // whose entry is shorter than its header.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file content shorter than its header",
                ));
            }
            self.pad(size)?;
        }
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// The end of the archive: two zero blocks.
    fn finish(&mut self) -> io::Result<()> {
        self.out.write_all(&[0u8; 2 * BLOCK])
    }
}

fn not_ustar() -> io::Error {
    io::Error::other("not a ustar header")
}

/// Splits a path into ustar's prefix (155 bytes) and name (100 bytes) fields, if it fits.
fn split_ustar(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.len() <= USTAR_NAME {
        return Some((&[], path));
    }
    // The last `/` that leaves a prefix short enough, if the name after it fits and is not
    // empty.
    let end = path.len().min(USTAR_PREFIX + 1);
    let i = path[..end].iter().rposition(|b| *b == b'/')?;
    let name = &path[i + 1..];
    (!name.is_empty() && name.len() <= USTAR_NAME).then(|| (&path[..i], name))
}

/// PAX extended header records (`LEN KEY=VALUE\n`, LEN counting itself).
#[derive(Default)]
struct Pax(Vec<u8>);

impl Pax {
    fn encode(key: &str, value: &[u8]) -> Vec<u8> {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        let mut rec = format!("{len} {key}=").into_bytes();
        rec.extend_from_slice(value);
        rec.push(b'\n');
        rec
    }

    fn record(&mut self, key: &str, value: &[u8]) {
        self.0.extend(Pax::encode(key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use crate::sys::fs::Timestamps;
    use rustix::fs::Timespec;

    /// One entry as read back with the `tar` crate (which applies PAX and GNU extensions).
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Got {
        path: Vec<u8>,
        kind: u8,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        link: Option<Vec<u8>>,
        data: Vec<u8>,
        xattrs: Vec<(String, Vec<u8>)>,
    }

    fn read_tar(bytes: &[u8]) -> Vec<Got> {
        assert_eq!(bytes.len() % BLOCK, 0);
        assert!(bytes.ends_with(&[0u8; 2 * BLOCK]));
        let mut ar = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut xattrs = Vec::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for x in exts {
                    let x = x.unwrap();
                    if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                        xattrs.push((k.to_string(), x.value_bytes().to_vec()));
                    }
                }
            }
            let h = e.header().clone();
            let path = e.path_bytes().into_owned();
            let link = e.link_name_bytes().map(|l| l.into_owned());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push(Got {
                path,
                kind: h.entry_type().as_byte(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                link,
                data,
                xattrs,
            });
        }
        out
    }

    fn export(ws: &[(&str, &Path)]) -> (Vec<u8>, ExportStats) {
        let ws: Vec<(String, PathBuf)> = ws
            .iter()
            .map(|(d, p)| (d.to_string(), p.to_path_buf()))
            .collect();
        let mut out = Vec::new();
        let stats = export_layer(&ws, &mut out).unwrap();
        (out, stats)
    }

    fn paths(got: &[Got]) -> Vec<String> {
        got.iter().map(|g| lossy(&g.path)).collect()
    }

    fn set_mtime(root: &Path, rel: &str, secs: i64) {
        let fd = sfs::open_root(root).unwrap();
        let t = Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        let ts = Timestamps {
            last_access: t,
            last_modification: t,
        };
        sfs::set_times(fd.as_fd(), rel, &ts).unwrap();
    }

    fn set_xattr(root: &Path, rel: &str, name: &str, value: &[u8]) {
        let fd = sfs::open_root(root).unwrap();
        sfs::set_xattr(fd.as_fd(), rel, OsStr::new(name), value, 0).unwrap();
    }

    fn mknod(root: &Path, rel: &str, kind: FileType, dev: u64) {
        let fd = sfs::open_root(root).unwrap();
        sfs::mknod(fd.as_fd(), rel, kind, 0o644, dev).unwrap();
    }

    /// An upper layer with one of everything.
    fn sample(dir: &Path) -> PathBuf {
        let up = dir.join("upper");
        fs::create_dir_all(up.join("d/sub")).unwrap();
        fs::create_dir_all(up.join("plain")).unwrap();
        fs::write(up.join("file.txt"), b"hello\n").unwrap();
        // (chown clears setuid: owner first.)
        std::os::unix::fs::lchown(up.join("file.txt"), Some(1234), Some(4321)).unwrap();
        fs::set_permissions(up.join("file.txt"), fs::Permissions::from_mode(0o4750)).unwrap();
        fs::hard_link(up.join("file.txt"), up.join("hard")).unwrap();
        symlink("../../../etc/shadow", up.join("link")).unwrap();
        std::os::unix::fs::lchown(up.join("link"), Some(7), Some(8)).unwrap();
        mknod(&up, "fifo", FileType::Fifo, 0);
        mknod(&up, "gone", FileType::CharacterDevice, 0);
        mknod(&up, "d/gone2", FileType::CharacterDevice, 0);
        mknod(
            &up,
            "null",
            FileType::CharacterDevice,
            rustix::fs::makedev(1, 3),
        );
        mknod(&up, "blk", FileType::BlockDevice, rustix::fs::makedev(7, 0));
        fs::write(up.join("d/sub/new"), b"new").unwrap();
        fs::write(up.join(".wh.evil"), b"").unwrap();
        fs::create_dir(up.join(".wh..wh..opq")).unwrap();
        fs::write(up.join(".wh..wh..opq/inside"), b"x").unwrap();
        set_xattr(&up, "d", OPAQUE_XATTR, b"y");
        // (No newline in the value: the `tar` crate's reader splits PAX records at newlines;
        // `pax_records_and_ustar_split` checks values holding them.)
        set_xattr(&up, "file.txt", "user.note", b"a\0binary\xffvalue");
        set_xattr(
            &up,
            "file.txt",
            "trusted.agentfense.origin",
            b"secret bookkeeping",
        );
        set_xattr(&up, "link", "trusted.kept", b"on the link");
        set_xattr(&up, ".", "trusted.agentfense.root", b"1");
        let _sock = std::os::unix::net::UnixListener::bind(up.join("sock")).unwrap();
        fs::set_permissions(&up, fs::Permissions::from_mode(0o2775)).unwrap();
        for (rel, t) in [
            ("file.txt", 1_000_000_000),
            ("link", 1_000_000_001),
            ("fifo", 1_000_000_002),
            ("gone", 1_000_000_003),
            ("d/gone2", 1_000_000_004),
            ("d/sub/new", 1_000_000_005),
            ("d/sub", 1_000_000_006),
            ("d", 1_000_000_007),
            ("plain", 1_000_000_008),
            (".", 1_000_000_009),
        ] {
            set_mtime(&up, rel, t);
        }
        up
    }

    #[test]
    fn one_of_everything() {
        let dir = tempfile::tempdir().unwrap();
        let up = sample(dir.path());
        let (bytes, stats) = export(&[("/srv/app", &up)]);
        let got = read_tar(&bytes);
        assert_eq!(
            paths(&got),
            [
                "srv/app/",
                "srv/app/d/",
                "srv/app/d/.wh..wh..opq",
                "srv/app/d/.wh.gone2",
                "srv/app/d/sub/",
                "srv/app/d/sub/new",
                "srv/app/fifo",
                "srv/app/file.txt",
                "srv/app/.wh.gone",
                "srv/app/hard",
                "srv/app/link",
                "srv/app/plain/",
            ]
        );
        let by = |p: &str| got.iter().find(|g| lossy(&g.path) == p).unwrap().clone();
        let root = by("srv/app/");
        assert_eq!(
            (root.kind, root.mode, root.mtime),
            (b'5', 0o2775, 1_000_000_009)
        );
        assert!(root.xattrs.is_empty(), "{:?}", root.xattrs);
        let f = by("srv/app/file.txt");
        assert_eq!(f.kind, b'0');
        assert_eq!(
            (f.mode, f.uid, f.gid, f.mtime),
            (0o4750, 1234, 4321, 1_000_000_000)
        );
        assert_eq!(f.data, b"hello\n");
        assert_eq!(
            f.xattrs,
            [("user.note".to_string(), b"a\0binary\xffvalue".to_vec())]
        );
        let h = by("srv/app/hard");
        assert_eq!(
            (h.kind, h.link.as_deref()),
            (b'1', Some(&b"srv/app/file.txt"[..]))
        );
        assert!(h.data.is_empty());
        let l = by("srv/app/link");
        assert_eq!(l.kind, b'2');
        assert_eq!(l.link.as_deref(), Some(&b"../../../etc/shadow"[..]));
        assert_eq!((l.uid, l.gid, l.mtime), (7, 8, 1_000_000_001));
        assert_eq!(
            l.xattrs,
            [("trusted.kept".to_string(), b"on the link".to_vec())]
        );
        assert_eq!(by("srv/app/fifo").kind, b'6');
        let wh = by("srv/app/.wh.gone");
        assert_eq!((wh.kind, wh.mode, wh.mtime), (b'0', 0o600, 1_000_000_003));
        assert!(wh.data.is_empty());
        let opq = by("srv/app/d/.wh..wh..opq");
        assert_eq!((opq.kind, opq.mtime), (b'0', 1_000_000_007));
        assert!(by("srv/app/d/").xattrs.is_empty());
        assert_eq!(by("srv/app/d/sub/new").data, b"new");
        assert_eq!(
            stats,
            ExportStats {
                entries: 12,
                whiteouts: 2,
                opaque_dirs: 1,
                bytes: 9,
                hardlinks: 1,
                skipped: 3, // null, blk, sock
                reserved_names: 2,
                skipped_xattrs: 0,
                changed: 0,
            }
        );
        // Our bookkeeping never leaks, whatever the entry.
        assert!(!bytes.windows(11).any(|w| w == b"agentfense."));
    }

    #[test]
    fn same_delta_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let up = sample(dir.path());
        let (a, _) = export(&[("/srv/app", &up)]);
        // Reading changes access times, nothing that goes into the layer.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _ = fs::read(up.join("file.txt")).unwrap();
        let (b, _) = export(&[("/srv/app", &up)]);
        assert_eq!(a, b);
    }

    #[test]
    fn symlinks_lead_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"host secret").unwrap();
        let up = dir.path().join("upper");
        fs::create_dir(&up).unwrap();
        symlink(&outside, up.join("dirlink")).unwrap();
        symlink(outside.join("secret"), up.join("filelink")).unwrap();
        symlink("/proc/self/root/etc/passwd", up.join("proclink")).unwrap();
        let (bytes, _) = export(&[("/w", &up)]);
        let got = read_tar(&bytes);
        assert_eq!(paths(&got), ["w/", "w/dirlink", "w/filelink", "w/proclink"]);
        assert!(got[1..].iter().all(|g| g.kind == b'2' && g.data.is_empty()));
        assert!(!bytes.windows(11).any(|w| w == b"host secret"));
    }

    #[test]
    fn long_and_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("upper");
        let deep: PathBuf = (0..12)
            .map(|i| format!("directory-number-{i:02}"))
            .collect();
        fs::create_dir_all(up.join(&deep)).unwrap();
        let long_name = "n".repeat(200);
        fs::write(up.join(&deep).join(&long_name), b"deep").unwrap();
        let odd = OsStr::from_bytes(b"caf\xe9 \\ \n=x");
        fs::write(up.join(odd), b"odd").unwrap();
        let target = "t/".repeat(120);
        symlink(&target, up.join("longlink")).unwrap();
        let odd_target = OsStr::from_bytes(&[b'\xff'; 150]);
        symlink(odd_target, up.join("oddlink")).unwrap();
        fs::write(up.join(&long_name), b"long").unwrap();
        fs::hard_link(up.join(&deep).join(&long_name), up.join("hardlong")).unwrap();
        set_xattr(&up, &long_name, &format!("user.{}", "k".repeat(200)), b"v");
        let (bytes, stats) = export(&[("/srv/app", &up)]);
        let got = read_tar(&bytes);
        let deep_file = format!("srv/app/{}/{long_name}", deep.display());
        let mut want: Vec<Vec<u8>> = vec![b"srv/app/".to_vec()];
        let mut p = String::from("srv/app");
        for c in deep.iter() {
            p = format!("{p}/{}", c.to_str().unwrap());
            want.push(format!("{p}/").into_bytes());
        }
        want.push(deep_file.clone().into_bytes());
        want.push(b"srv/app/hardlong".to_vec());
        want.push(b"srv/app/longlink".to_vec());
        want.push(format!("srv/app/{long_name}").into_bytes());
        want.push(b"srv/app/oddlink".to_vec());
        want.push([&b"srv/app/"[..], odd.as_bytes()].concat());
        // `d` < `h` < `l` < `n` < `o` < 0xe9... by bytes: "caf\xe9" sorts first ('c').
        want.sort_by(|a, b| {
            // The order the exporter uses: parents first, then byte order of the names.
            let a: Vec<&[u8]> = a.split(|c| *c == b'/').collect();
            let b: Vec<&[u8]> = b.split(|c| *c == b'/').collect();
            a.cmp(&b)
        });
        assert_eq!(
            got.iter().map(|g| g.path.clone()).collect::<Vec<_>>(),
            want,
            "{:?}",
            paths(&got)
        );
        let by = |p: &[u8]| got.iter().find(|g| g.path == p).unwrap().clone();
        assert_eq!(by(deep_file.as_bytes()).data, b"deep");
        let h = by(b"srv/app/hardlong");
        assert_eq!(h.link.as_deref(), Some(deep_file.as_bytes()));
        assert_eq!(by(b"srv/app/longlink").link.unwrap(), target.as_bytes());
        assert_eq!(by(b"srv/app/oddlink").link.unwrap(), odd_target.as_bytes());
        assert_eq!(
            by(&[&b"srv/app/"[..], odd.as_bytes()].concat()).data,
            b"odd"
        );
        let l = by(format!("srv/app/{long_name}").as_bytes());
        assert_eq!(
            l.xattrs,
            [(format!("user.{}", "k".repeat(200)), b"v".to_vec())]
        );
        assert_eq!(stats.hardlinks, 1);
    }

    #[test]
    fn workspaces_sorted_root_without_entry_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir_all(a.join("x")).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(b.join("y"), b"y").unwrap();
        let (bytes, _) = export(&[("/zz/", &a), ("//srv/./b", &b)]);
        assert_eq!(
            paths(&read_tar(&bytes)),
            ["srv/b/", "srv/b/y", "zz/", "zz/x/"]
        );
        // The whole root fenced: no entry for the root itself.
        let (bytes, _) = export(&[("/", &a)]);
        assert_eq!(paths(&read_tar(&bytes)), ["x/"]);
        let mut out = Vec::new();
        for ws in [
            vec![("relative".to_string(), a.clone())],
            vec![("/a/../etc".to_string(), a.clone())],
            vec![
                ("/w".to_string(), a.clone()),
                ("/w/".to_string(), b.clone()),
            ],
            vec![("/w".to_string(), dir.path().join("missing"))],
            vec![("/w".to_string(), b.join("y"))],
        ] {
            assert!(export_layer(&ws, &mut out).is_err(), "{ws:?}");
        }
    }

    #[test]
    fn empty_delta_is_an_empty_layer() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, stats) = export(&[]);
        assert_eq!(bytes, vec![0u8; 2 * BLOCK]);
        assert_eq!(stats, ExportStats::default());
        let (bytes, stats) = export(&[("/w", dir.path())]);
        assert_eq!(paths(&read_tar(&bytes)), ["w/"]);
        assert_eq!(stats.entries, 1);
    }

    #[test]
    fn a_failing_output_is_an_error() {
        struct Broken(usize);
        impl Write for Broken {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk full"));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let up = sample(dir.path());
        for budget in [0, 100, 512, 1500, 4000] {
            let ws = [("/w".to_string(), up.clone())];
            assert!(export_layer(&ws, &mut Broken(budget)).is_err());
        }
    }

    #[test]
    fn exact_pads_and_cuts() {
        let mut shrunk = Exact {
            inner: &b"abc"[..],
            left: 6,
            short: false,
        };
        let mut v = Vec::new();
        shrunk.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"abc\0\0\0");
        assert!(shrunk.short);
        let mut grown = Exact {
            inner: &b"abcdef"[..],
            left: 2,
            short: false,
        };
        let mut v = Vec::new();
        grown.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"ab");
        assert!(!grown.short);
        assert_eq!(grown.inner, b"cdef");
    }

    #[test]
    fn a_file_that_shrinks_keeps_the_tar_whole() {
        // What `Exporter::file` does with a file that is shorter than first seen: the entry
        // keeps its header size, padded, and the archive stays readable.
        let mut out = Vec::new();
        let mut tar = TarOut { out: &mut out };
        let meta = Meta {
            kind: EntryType::Regular,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 5,
        };
        let mut data = Exact {
            inner: &b"abc"[..],
            left: 1000,
            short: false,
        };
        tar.entry(b"f", &meta, None, &[], Some((&mut data, 1000)))
            .unwrap();
        tar.entry(b"g", &meta, None, &[], None).unwrap();
        tar.finish().unwrap();
        let got = read_tar(&out);
        assert_eq!(paths(&got), ["f", "g"]);
        assert_eq!(got[0].data.len(), 1000);
        assert_eq!(&got[0].data[..4], b"abc\0");
        // A reader that breaks its promise is an error, not a short entry.
        let mut out = Vec::new();
        let mut tar = TarOut { out: &mut out };
        assert!(tar
            .entry(b"f", &meta, None, &[], Some((&mut &b"abc"[..], 1000)))
            .is_err());
    }

    #[test]
    fn pax_records_and_ustar_split() {
        for (k, v) in [
            ("a", &b""[..]),
            ("path", &[b'x'; 90][..]),
            ("k", &[b'y'; 5000][..]),
        ] {
            let rec = Pax::encode(k, v);
            let sp = rec.iter().position(|b| *b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&rec[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, rec.len());
        }
        assert_eq!(split_ustar(b"a/b"), Some((&b""[..], &b"a/b"[..])));
        let p = [vec![b'p'; 150], b"/".to_vec(), vec![b'n'; 100]].concat();
        assert_eq!(split_ustar(&p), Some((&p[..150], &p[151..])));
        assert_eq!(split_ustar(&[b'x'; 101]), None);
        let too_long_name = [b"p/".to_vec(), vec![b'n'; 101]].concat();
        assert_eq!(split_ustar(&too_long_name), None);
        let dir = [vec![b'p'; 100], b"/".to_vec()].concat();
        assert_eq!(split_ustar(&dir), None);
    }

    #[test]
    fn large_numbers_go_to_pax() {
        let mut out = Vec::new();
        let mut tar = TarOut { out: &mut out };
        let meta = Meta {
            kind: EntryType::Regular,
            mode: 0o644,
            uid: 4_000_000_000,
            gid: 3_000_000,
            mtime: -86400,
        };
        tar.entry(b"f", &meta, None, &[], None).unwrap();
        tar.finish().unwrap();
        let mut ar = tar::Archive::new(&out[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let exts: Vec<(String, String)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().to_string(), x.value().unwrap().to_string())
            })
            .collect();
        assert_eq!(
            exts,
            [
                ("uid".to_string(), "4000000000".to_string()),
                ("gid".to_string(), "3000000".to_string()),
                ("mtime".to_string(), "-86400".to_string()),
            ]
        );
    }

    #[test]
    fn modes_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("upper");
        fs::create_dir(&up).unwrap();
        for (name, mode) in [("a", 0o6755), ("b", 0o1777), ("c", 0o000)] {
            fs::write(up.join(name), b"").unwrap();
            fs::set_permissions(up.join(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        let fd = sfs::open_root(&up).unwrap();
        sfs::mkdir(fd.as_fd(), "sticky", 0o1777).unwrap();
        sfs::chmod(fd.as_fd(), "sticky", 0o1777).unwrap();
        let (bytes, _) = export(&[("/w", &up)]);
        let got = read_tar(&bytes);
        let modes: Vec<(String, u32)> = got
            .iter()
            .skip(1)
            .map(|g| (lossy(&g.path), g.mode))
            .collect();
        assert_eq!(
            modes,
            [
                ("w/a".to_string(), 0o6755),
                ("w/b".to_string(), 0o1777),
                ("w/c".to_string(), 0o000),
                ("w/sticky/".to_string(), 0o1777),
            ]
        );
    }
}
