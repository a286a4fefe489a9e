//! `agentfense-runc export ID`: the delta as an OCI image layer (a tar, SPEC §5), the way
//! `docker diff`/`docker export` users expect one: apply it over the image (or a tar of the
//! base) and you get what the container saw, less nothing it could not see.
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
//! Deletions follow the rule commit follows (SPEC §4-§5, [`super::commit`]): nothing the
//! container's policy hid from it is deleted. Given the workspace's base and policy
//! ([`ExportWorkspace`]), paths decided as the fence decides them (`/` and the path in the
//! workspace; a name that is not UTF-8 is hidden):
//! - a whiteout whose base entry is hidden is left out; one whose base entry is a directory
//!   with hidden entries somewhere beneath becomes that directory's entry (the base's owner,
//!   mode, time and extended attributes) and whiteouts of its visible entries only, directories
//!   among them that hold hidden entries themselves treated the same way, recursively;
//! - an opaque directory whose base directory holds hidden entries gets no `.wh..wh..opq`
//!   marker but whiteouts (as above) of the visible base entries the upper directory does not
//!   have; its subdirectories that replace base directories are masked the same way (with a
//!   marker of their own when nothing beneath them is hidden);
//! - an entry of the container that would replace a base directory holding hidden entries
//!   (the container removed the directory and made a file in its place) is left out: the base
//!   directory stays, less its visible entries. Counted in [`ExportStats::conflicts`]; commit
//!   reports a conflict there too.
//!
//! Every other whiteout and opaque directory is exported as it is. The base is read like the
//! upper directory, descriptor by descriptor, never following a symlink.
//!
//! Left out, and counted: device nodes other than whiteouts and sockets (a layer cannot
//! carry them usefully; the fence never creates them) in [`ExportStats::skipped`]; and entries
//! whose name starts with `.wh.` in [`ExportStats::reserved_names`]. The container can create
//! such names (they are ordinary names inside the fence), but in a layer they are whiteouts:
//! exported, a file named `.wh.secrets` would delete `secrets`, which the container may never
//! have seen, from every image built on the layer. SPEC §5: no name a container creates
//! changes what else is visible. (For the same reason no whiteout is ever written for a base
//! entry whose own name starts with `.wh.`.)
//!
//! The output is deterministic: entries in byte order of their names, a directory before what
//! is in it, times from the files (seconds), no user or group names, no "now" anywhere. The
//! same delta over the same base exports to the same bytes.
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
//! Errors that are not of that kind (I/O errors, a missing upper or base directory) fail the
//! export: the output then stops without the tar's end-of-archive blocks.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tar::{EntryType, Header};

use crate::fence::layers::{is_private_xattr, OPAQUE_XATTR};
use crate::policy::Policy;
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
    /// Whiteouts and opaque directories narrowed to what the container could see: left out
    /// (their base entry is hidden) or written as whiteouts of visible entries only (the base
    /// directory holds hidden entries).
    pub narrowed: u64,
    /// Entries of the container left out because they would replace a base directory holding
    /// entries hidden from the container (a conflict for commit too).
    pub conflicts: u64,
}

/// One workspace to export.
#[derive(Debug, Clone)]
pub struct ExportWorkspace {
    /// The workspace path in the container (`/srv/app`).
    pub dest: String,
    /// Its upper directory: the delta.
    pub upper: PathBuf,
    /// Its base directory. With `policy`, the layer never deletes what the policy hid there
    /// (see the module comment); without either, every deletion is exported as recorded.
    pub base: Option<PathBuf>,
    /// The policy the container ran under.
    pub policy: Option<Policy>,
}

impl ExportWorkspace {
    /// A workspace exported without looking at its base.
    pub fn delta_only(dest: impl Into<String>, upper: impl Into<PathBuf>) -> ExportWorkspace {
        ExportWorkspace {
            dest: dest.into(),
            upper: upper.into(),
            base: None,
            policy: None,
        }
    }
}

/// Writes the deltas of `workspaces` as one OCI layer tar to `out`.
pub fn export_layer(
    workspaces: &[ExportWorkspace],
    out: &mut dyn Write,
) -> anyhow::Result<ExportStats> {
    let mut ws = Vec::with_capacity(workspaces.len());
    for w in workspaces {
        ws.push((container_prefix(&w.dest)?, w));
    }
    ws.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = ws.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("workspace {} is listed twice", w[0].1.dest);
    }
    let mut ex = Exporter {
        tar: TarOut { out },
        stats: ExportStats::default(),
        links: HashMap::new(),
        policy: None,
        hidden_below: HashMap::new(),
    };
    for (prefix, w) in ws {
        ex.workspace(&prefix, w)
            .with_context(|| format!("workspace {} (delta in {})", w.dest, w.upper.display()))?;
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

/// `a/b/c` to (`a/b`, `c`); `c` to (empty, `c`).
fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    }
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// A directory of the upper layer being walked.
struct Frame {
    dir: OwnedFd,
    /// Its path in the layer.
    path: Vec<u8>,
    /// Its path in the workspace (empty for the workspace root): what the policy decides on.
    rel: Vec<u8>,
    names: std::vec::IntoIter<OsString>,
    /// The base directory at the same place, while base entries beneath can still be deleted
    /// by what the layer holds (none beneath an opaque marker).
    base: Option<OwnedFd>,
    /// Whether the container saw none of `base` here (an opaque directory, or one beneath it,
    /// whose base holds hidden entries): its subdirectories replace their base counterparts.
    replaced: bool,
}

/// A base directory whose visible entries are being whited out.
struct BaseFrame {
    dir: OwnedFd,
    path: Vec<u8>,
    rel: Vec<u8>,
    names: std::vec::IntoIter<(OsString, FileType)>,
}

/// A base directory being searched for hidden entries.
struct HiddenFrame {
    dir: OwnedFd,
    rel: Vec<u8>,
    names: std::vec::IntoIter<(OsString, FileType)>,
    hidden: bool,
}

struct Exporter<'a> {
    tar: TarOut<'a>,
    stats: ExportStats,
    /// Files with several names: (device, inode) to the path they were first written under.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// The policy of the workspace being exported, when its base is looked at.
    policy: Option<Policy>,
    /// Base directories of the workspace being exported (by path in the workspace) and whether
    /// something hidden from the container is beneath them.
    hidden_below: HashMap<Vec<u8>, bool>,
}

/// The metadata of one tar entry.
#[derive(Clone, Copy)]
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

    /// A whiteout standing for `st` (the whiteout itself, or the opaque directory it is
    /// written for): as Docker's overlay2 driver writes them, that owner and time, mode 0600.
    fn whiteout(st: &Stat) -> Meta {
        Meta {
            mode: 0o600,
            ..Meta::of(EntryType::Regular, st)
        }
    }
}

impl Exporter<'_> {
    fn workspace(&mut self, prefix: &[u8], w: &ExportWorkspace) -> Result<()> {
        let upper = &w.upper;
        let root = sfs::open_root(upper)
            .map_err(io::Error::from)
            .with_context(|| format!("cannot open the upper directory {}", upper.display()))?;
        let st = fstat(root.as_fd())?;
        if sfs::file_type(&st) != FileType::Directory {
            bail!("{} is not a directory", upper.display());
        }
        self.policy = None;
        self.hidden_below.clear();
        // The base, when there is a policy to tell what it hid from the container.
        let base = match (&w.base, &w.policy) {
            (Some(b), Some(policy)) => {
                let fd = sfs::open_root(b)
                    .map_err(io::Error::from)
                    .with_context(|| format!("cannot open the base directory {}", b.display()))?;
                if sfs::file_type(&fstat(fd.as_fd())?) != FileType::Directory {
                    bail!("the base {} is not a directory", b.display());
                }
                self.policy = Some(policy.clone());
                Some(fd)
            }
            _ => None,
        };
        // The workspace directory itself: its entry (not under the empty prefix of `/`: a
        // layer has no entry for the root), then its opaque marker if it has one.
        let xattrs = self.xattrs(root.as_fd(), prefix)?;
        if !prefix.is_empty() {
            self.dir_entry(prefix, &st, &xattrs)?;
        }
        let names = self.listing(root.as_fd(), prefix)?;
        let opaque = is_opaque(&xattrs);
        let (base, replaced) = self.over_base(prefix, b"", &st, opaque, opaque, base, &names)?;
        let mut stack = vec![Frame {
            dir: root,
            path: prefix.to_vec(),
            rel: Vec::new(),
            names: names.into_iter(),
            base,
            replaced,
        }];
        // Depth first without recursion: a deep tree made by the container costs one open
        // descriptor a level (EMFILE fails the export cleanly), never the stack.
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.next() else {
                stack.pop();
                continue;
            };
            let path = join(&top.path, name.as_bytes());
            let rel = join(&top.rel, name.as_bytes());
            let under = top.base.as_ref().map(|b| b.as_fd());
            let Some((dir, st, opaque)) = self.entry(top.dir.as_fd(), &name, &path, &rel, under)?
            else {
                continue;
            };
            let base = match &top.base {
                Some(b) => self.base_dir(b.as_fd(), &name, &path)?,
                None => None,
            };
            let replaced = opaque || top.replaced;
            let names = self.listing(dir.as_fd(), &path)?;
            let (base, replaced) =
                self.over_base(&path, &rel, &st, opaque, replaced, base, &names)?;
            stack.push(Frame {
                dir,
                path,
                rel,
                names: names.into_iter(),
                base,
                replaced,
            });
        }
        Ok(())
    }

    /// After the entry of upper directory `path` (`rel` in the workspace; `opaque` if marked
    /// so, `replaced` if the container saw nothing of the base there, `names` its entries):
    /// masks what the base directory `base` held there, and returns the base directory and
    /// mode for the entries beneath.
    #[allow(clippy::too_many_arguments)]
    fn over_base(
        &mut self,
        path: &[u8],
        rel: &[u8],
        st: &Stat,
        opaque: bool,
        replaced: bool,
        base: Option<OwnedFd>,
        names: &[OsString],
    ) -> Result<(Option<OwnedFd>, bool)> {
        if !replaced {
            // Merged: the base shows through, entries beneath decide for themselves.
            return Ok((base, false));
        }
        match base {
            Some(b) if self.hidden_below(b.as_fd(), rel)? => {
                // A marker would delete what the container never saw: whiteouts of what it
                // did see instead.
                self.stats.narrowed += 1;
                self.whiteouts_of(b.as_fd(), path, rel, &Meta::whiteout(st), names)?;
                Ok((Some(b), true))
            }
            Some(_) => {
                self.opaque_marker(path, st)?;
                Ok((None, false))
            }
            None => {
                if opaque {
                    self.opaque_marker(path, st)?;
                }
                Ok((None, false))
            }
        }
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

    /// The entries of a base directory with their types, in byte order of their names.
    fn base_listing(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &[u8],
    ) -> Result<Vec<(OsString, FileType)>> {
        let mut names = match sfs::read_dir(dir, ".") {
            Ok(v) => v,
            Err(Errno::NOENT) => {
                self.changed(path, "base directory removed while exporting");
                Vec::new()
            }
            Err(e) => return Err(io_err(e, "cannot list the base of", path)),
        };
        names.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(names)
    }

    /// Base entry `name` of base directory `dir` (for `path` in the layer), opened `O_PATH`
    /// (a symlink as itself), with its status; `None` if there is none.
    fn base_entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &[u8],
    ) -> Result<Option<(OwnedFd, Stat)>> {
        match sfs::open_entry(dir, name, OFlags::PATH) {
            Ok(fd) => {
                let st = fstat(fd.as_fd())?;
                Ok(Some((fd, st)))
            }
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => Ok(None),
            Err(e) => Err(io_err(e, "cannot open the base of", path)),
        }
    }

    /// Base entry `name` of base directory `dir`, if it is a directory.
    fn base_dir(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &[u8],
    ) -> Result<Option<OwnedFd>> {
        Ok(self
            .base_entry(dir, name, path)?
            .and_then(|(fd, st)| (sfs::file_type(&st) == FileType::Directory).then_some(fd)))
    }

    /// Whether the container's policy hid `rel` (a path in the workspace) from it. Names that
    /// are not UTF-8 are hidden (the fence never shows them). Nothing is hidden without a
    /// policy.
    fn hidden(&self, rel: &[u8], is_dir: bool) -> bool {
        let Some(policy) = &self.policy else {
            return false;
        };
        match std::str::from_utf8(rel) {
            Ok(r) => !policy.decide(&format!("/{r}"), is_dir).visible(),
            Err(_) => true,
        }
    }

    /// Whether base directory `dir` (`rel` in the workspace) holds, anywhere beneath it, an
    /// entry hidden from the container (beneath visible directories: a hidden directory is
    /// hidden with all it holds). Every base directory looked at is remembered.
    fn hidden_below(&mut self, dir: BorrowedFd<'_>, rel: &[u8]) -> Result<bool> {
        if self.policy.is_none() {
            return Ok(false);
        }
        if let Some(h) = self.hidden_below.get(rel) {
            return Ok(*h);
        }
        let fd = dir
            .try_clone_to_owned()
            .with_context(|| format!("cannot look into the base of {}", lossy(rel)))?;
        let names = self.base_listing(fd.as_fd(), rel)?;
        let mut stack = vec![HiddenFrame {
            dir: fd,
            rel: rel.to_vec(),
            names: names.into_iter(),
            hidden: false,
        }];
        // Post-order without recursion (the base may hold trees a container made and
        // committed): each directory's answer is known once all beneath it are.
        let mut answer = false;
        while let Some(top) = stack.last_mut() {
            let Some((name, ft)) = top.names.next() else {
                if let Some(done) = stack.pop() {
                    self.hidden_below.insert(done.rel, done.hidden);
                    match stack.last_mut() {
                        Some(parent) => parent.hidden |= done.hidden,
                        None => answer = done.hidden,
                    }
                }
                continue;
            };
            let crel = join(&top.rel, name.as_bytes());
            let is_dir = ft == FileType::Directory;
            if self.hidden(&crel, is_dir) {
                top.hidden = true;
                continue;
            }
            if !is_dir {
                continue;
            }
            if let Some(h) = self.hidden_below.get(&crel) {
                top.hidden |= *h;
                continue;
            }
            let Some(sub) = self.base_dir(top.dir.as_fd(), &name, &crel)? else {
                continue;
            };
            let names = self.base_listing(sub.as_fd(), &crel)?;
            stack.push(HiddenFrame {
                dir: sub,
                rel: crel,
                names: names.into_iter(),
                hidden: false,
            });
        }
        Ok(answer)
    }

    /// Base directory `dir` (at `path` in the layer, `rel` in the workspace), with hidden
    /// entries beneath, deleted as far as the container could: its entry, then
    /// [`Exporter::whiteouts_of`] its entries.
    fn narrow_dir(
        &mut self,
        dir: BorrowedFd<'_>,
        st: &Stat,
        path: &[u8],
        rel: &[u8],
        wh: &Meta,
    ) -> Result<()> {
        let xattrs = self.xattrs(dir, path)?;
        self.dir_entry(path, st, &xattrs)?;
        self.whiteouts_of(dir, path, rel, wh, &[])
    }

    /// Whiteouts (metadata `wh`) of the visible entries of base directory `dir` (at `path` in
    /// the layer, `rel` in the workspace) that `keep` (sorted by bytes) does not name. A
    /// visible directory with hidden entries beneath gets its entry (the base's attributes)
    /// and the same treatment instead of a whiteout; hidden entries get nothing.
    fn whiteouts_of(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &[u8],
        rel: &[u8],
        wh: &Meta,
        keep: &[OsString],
    ) -> Result<()> {
        let mut names = self.base_listing(dir, path)?;
        names.retain(|(n, _)| {
            keep.binary_search_by(|k| k.as_bytes().cmp(n.as_bytes()))
                .is_err()
        });
        let fd = dir
            .try_clone_to_owned()
            .with_context(|| format!("cannot look into the base of {}", lossy(path)))?;
        let mut stack = vec![BaseFrame {
            dir: fd,
            path: path.to_vec(),
            rel: rel.to_vec(),
            names: names.into_iter(),
        }];
        while let Some(top) = stack.last_mut() {
            let Some((name, ft)) = top.names.next() else {
                stack.pop();
                continue;
            };
            if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
                // `.wh..wh..opq` for a base entry `.wh..opq` would be the opaque marker: such
                // names are whiteouts themselves in a layer, never named by one.
                continue;
            }
            let crel = join(&top.rel, name.as_bytes());
            let is_dir = ft == FileType::Directory;
            if self.hidden(&crel, is_dir) {
                continue;
            }
            let cpath = join(&top.path, name.as_bytes());
            if is_dir {
                if let Some((sub, st)) = self.base_entry(top.dir.as_fd(), &name, &cpath)? {
                    if sfs::file_type(&st) == FileType::Directory
                        && self.hidden_below(sub.as_fd(), &crel)?
                    {
                        let xattrs = self.xattrs(sub.as_fd(), &cpath)?;
                        self.dir_entry(&cpath, &st, &xattrs)?;
                        let names = self.base_listing(sub.as_fd(), &cpath)?;
                        stack.push(BaseFrame {
                            dir: sub,
                            path: cpath,
                            rel: crel,
                            names: names.into_iter(),
                        });
                        continue;
                    }
                }
            }
            let parent = top.path.clone();
            self.whiteout(&parent, name.as_bytes(), wh)?;
        }
        Ok(())
    }

    /// The whiteout `dir/.wh.name`.
    fn whiteout(&mut self, dir: &[u8], name: &[u8], meta: &Meta) -> Result<()> {
        let wh = join(dir, &[WHITEOUT_PREFIX, name].concat());
        self.tar.entry(&wh, meta, None, &[], None)?;
        self.stats.entries += 1;
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Writes the entry `name` of `dir` (at `path` in the layer, `rel` in the workspace;
    /// `base` the base directory at the same place as `dir`, when its entries matter).
    /// Returns a directory to descend into, with its status and whether it is opaque.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &[u8],
        rel: &[u8],
        base: Option<BorrowedFd<'_>>,
    ) -> Result<Option<(OwnedFd, Stat, bool)>> {
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
                return Ok(Some((fd, st, is_opaque(&xattrs))));
            }
            FileType::CharacterDevice if st.st_rdev == 0 => {
                let meta = Meta::whiteout(&st);
                if let Some(b) = base {
                    if let Some((bfd, bst)) = self.base_entry(b, name, path)? {
                        let is_dir = sfs::file_type(&bst) == FileType::Directory;
                        if self.hidden(rel, is_dir) {
                            // Never shown to the container: not its to delete.
                            self.stats.narrowed += 1;
                            return Ok(None);
                        }
                        if is_dir && self.hidden_below(bfd.as_fd(), rel)? {
                            self.stats.narrowed += 1;
                            self.narrow_dir(bfd.as_fd(), &bst, path, rel, &meta)?;
                            return Ok(None);
                        }
                    }
                }
                let (parent, base_name) = split_path(path);
                self.whiteout(parent, base_name, &meta)?;
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
        // In place of a base directory: the layer would delete all of it, hidden entries too.
        if let Some(b) = base {
            if let Some((bfd, bst)) = self.base_entry(b, name, path)? {
                if sfs::file_type(&bst) == FileType::Directory {
                    let hidden = self.hidden(rel, true);
                    if hidden || self.hidden_below(bfd.as_fd(), rel)? {
                        self.stats.conflicts += 1;
                        tracing::warn!(
                            "export: left out {}: it replaces a base directory holding entries \
                             hidden from the container, which stay",
                            lossy(path)
                        );
                        if !hidden {
                            self.narrow_dir(bfd.as_fd(), &bst, path, rel, &Meta::whiteout(&st))?;
                        }
                        return Ok(None);
                    }
                }
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
    use std::path::Path;

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
        let ws: Vec<ExportWorkspace> = ws
            .iter()
            .map(|(d, p)| ExportWorkspace::delta_only(*d, *p))
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
                narrowed: 0,
                conflicts: 0,
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
            vec![ExportWorkspace::delta_only("relative", &a)],
            vec![ExportWorkspace::delta_only("/a/../etc", &a)],
            vec![
                ExportWorkspace::delta_only("/w", &a),
                ExportWorkspace::delta_only("/w/", &b),
            ],
            vec![ExportWorkspace::delta_only(
                "/w",
                dir.path().join("missing"),
            )],
            vec![ExportWorkspace::delta_only("/w", b.join("y"))],
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
            let ws = [ExportWorkspace::delta_only("/w", &up)];
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

    const HIDE_ENV: &str = r#"{"rules":[{"pattern":"**","permission":"write"},
        {"pattern":"**/.env","permission":"none","priority":9}]}"#;

    fn export_over(upper: &Path, base: &Path, policy: &str) -> (Vec<u8>, ExportStats) {
        let ws = [ExportWorkspace {
            dest: "/w".into(),
            upper: upper.to_path_buf(),
            base: Some(base.to_path_buf()),
            policy: Some(Policy::from_json(policy).unwrap()),
        }];
        let mut out = Vec::new();
        let stats = export_layer(&ws, &mut out).unwrap();
        (out, stats)
    }

    fn write_all(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, f.as_bytes()).unwrap();
        }
    }

    #[test]
    fn whiteouts_delete_nothing_the_policy_hid() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let up = dir.path().join("upper");
        write_all(
            &base,
            &[
                ".env",
                "file.txt",
                "gone/a",
                "gone/b/c",
                "hid/.env",
                "hid/.wh.odd",
                "hid/plain/p",
                "hid/sub/.env",
                "hid/sub/s",
                "hid/vis.txt",
            ],
        );
        fs::write(base.join("hid").join(OsStr::from_bytes(b"\xff")), b"").unwrap();
        fs::set_permissions(base.join("hid"), fs::Permissions::from_mode(0o750)).unwrap();
        set_xattr(&base, "hid", "user.base", b"attr");
        set_mtime(&base, "hid", 1_100_000_000);
        set_mtime(&base, "hid/sub", 1_100_000_001);
        fs::create_dir(&up).unwrap();
        for wh in [".env", "file.txt", "gone", "hid", "missing"] {
            mknod(&up, wh, FileType::CharacterDevice, 0);
        }
        set_mtime(&up, "hid", 1_200_000_000);

        let (bytes, stats) = export_over(&up, &base, HIDE_ENV);
        let got = read_tar(&bytes);
        assert_eq!(
            paths(&got),
            [
                "w/",
                // `.env` was never the container's to delete: nothing.
                "w/.wh.file.txt",
                "w/.wh.gone",
                // `hid` stays with what was hidden in it, less what the container saw.
                "w/hid/",
                "w/hid/.wh.plain",
                "w/hid/sub/",
                "w/hid/sub/.wh.s",
                "w/hid/.wh.vis.txt",
                "w/.wh.missing",
            ]
        );
        let by = |p: &str| got.iter().find(|g| lossy(&g.path) == p).unwrap().clone();
        let hid = by("w/hid/");
        assert_eq!(
            (hid.kind, hid.mode, hid.mtime),
            (b'5', 0o750, 1_100_000_000)
        );
        assert_eq!(hid.xattrs, [("user.base".to_string(), b"attr".to_vec())]);
        assert_eq!(by("w/hid/sub/").mtime, 1_100_000_001);
        let wh = by("w/hid/sub/.wh.s");
        assert_eq!((wh.kind, wh.mode, wh.mtime), (b'0', 0o600, 1_200_000_000));
        assert!(wh.data.is_empty());
        assert_eq!(
            (
                stats.entries,
                stats.whiteouts,
                stats.narrowed,
                stats.conflicts
            ),
            (9, 6, 2, 0)
        );

        // Nothing hidden (a name that is not UTF-8 is): every whiteout as recorded; and the
        // same without a base.
        fs::remove_file(base.join("hid").join(OsStr::from_bytes(b"\xff"))).unwrap();
        let everything = r#"[{"pattern":"**","permission":"write"}]"#;
        let plain = [
            "w/",
            "w/.wh..env",
            "w/.wh.file.txt",
            "w/.wh.gone",
            "w/.wh.hid",
            "w/.wh.missing",
        ];
        let (bytes, stats) = export_over(&up, &base, everything);
        assert_eq!(paths(&read_tar(&bytes)), plain);
        assert_eq!(stats.narrowed, 0);
        let (bytes, _) = export(&[("/w", &up)]);
        assert_eq!(paths(&read_tar(&bytes)), plain);
    }

    #[test]
    fn opaque_dirs_delete_nothing_the_policy_hid() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let up = dir.path().join("upper");
        write_all(
            &base,
            &[
                "plain/a",
                "plain/b",
                "redo/.env",
                "redo/clean/c",
                "redo/fresh",
                "redo/gonesub/.env",
                "redo/gonesub/v",
                "redo/old",
                "redo/olddir/x",
                "redo/sub/.env",
                "redo/sub/s",
                "x/.env",
                "x/y",
            ],
        );
        // Made in the container: `rm -rf redo plain x`, then new ones in their place.
        write_all(
            &up,
            &["plain/z", "redo/clean/k", "redo/fresh", "redo/sub/n", "x"],
        );
        set_xattr(&up, "redo", OPAQUE_XATTR, b"y");
        set_xattr(&up, "plain", OPAQUE_XATTR, b"y");
        set_mtime(&up, "redo", 1_300_000_000);

        let (bytes, stats) = export_over(&up, &base, HIDE_ENV);
        let got = read_tar(&bytes);
        assert_eq!(
            paths(&got),
            [
                "w/",
                // Nothing hidden in it: the marker, as ever.
                "w/plain/",
                "w/plain/.wh..wh..opq",
                "w/plain/z",
                // Instead of a marker: what the container saw and did not make again.
                "w/redo/",
                "w/redo/gonesub/",
                "w/redo/gonesub/.wh.v",
                "w/redo/.wh.old",
                "w/redo/.wh.olddir",
                // Made again in the replaced directory: each masks its base counterpart.
                "w/redo/clean/",
                "w/redo/clean/.wh..wh..opq",
                "w/redo/clean/k",
                "w/redo/fresh",
                "w/redo/sub/",
                "w/redo/sub/.wh.s",
                "w/redo/sub/n",
                // A file in place of a directory holding a hidden entry: left out, the
                // directory stays less what the container saw.
                "w/x/",
                "w/x/.wh.y",
            ]
        );
        let by = |p: &str| got.iter().find(|g| lossy(&g.path) == p).unwrap().clone();
        let wh = by("w/redo/.wh.old");
        assert_eq!((wh.mode, wh.mtime), (0o600, 1_300_000_000));
        assert_eq!(by("w/redo/fresh").data, b"redo/fresh");
        assert_eq!(
            (
                stats.whiteouts,
                stats.opaque_dirs,
                stats.narrowed,
                stats.conflicts
            ),
            (5, 2, 2, 1)
        );

        // Without the base: as recorded.
        let (bytes, _) = export(&[("/w", &up)]);
        assert_eq!(
            paths(&read_tar(&bytes)),
            [
                "w/",
                "w/plain/",
                "w/plain/.wh..wh..opq",
                "w/plain/z",
                "w/redo/",
                "w/redo/.wh..wh..opq",
                "w/redo/clean/",
                "w/redo/clean/k",
                "w/redo/fresh",
                "w/redo/sub/",
                "w/redo/sub/n",
                "w/x",
            ]
        );
    }

    #[test]
    fn an_opaque_workspace_root_deletes_nothing_the_policy_hid() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let up = dir.path().join("upper");
        write_all(&base, &[".env", "a", "d/.env", "d/e"]);
        write_all(&up, &["n"]);
        set_xattr(&up, ".", OPAQUE_XATTR, b"y");
        let (bytes, stats) = export_over(&up, &base, HIDE_ENV);
        assert_eq!(
            paths(&read_tar(&bytes)),
            ["w/", "w/.wh.a", "w/d/", "w/d/.wh.e", "w/n"]
        );
        assert_eq!((stats.narrowed, stats.opaque_dirs), (1, 0));
        // The base must be there to be looked at.
        let ws = [ExportWorkspace {
            dest: "/w".into(),
            upper: up.clone(),
            base: Some(dir.path().join("missing")),
            policy: Some(Policy::from_json(HIDE_ENV).unwrap()),
        }];
        assert!(export_layer(&ws, &mut Vec::new()).is_err());
    }
}
