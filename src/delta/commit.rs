//! `commit`: applying a workspace's delta to its base, without lost updates.
//!
//! The upper directory is walked top-down. Each change is applied through file descriptors
//! (`openat2` beneath the base root, never following a symlink):
//! - a file, symlink or fifo is written beside its destination under a temporary name (a
//!   complete copy: content, mode, owner, times, extended attributes) and renamed over it, so
//!   the host sees the old entry or the new one, never a mix; hard links made in the container
//!   stay hard links;
//! - a directory is made (or its changed mode and owner applied), then its entries;
//! - a whiteout deletes the base entry, and an opaque directory the base entries it replaced.
//!
//! Nothing is overwritten or deleted unless it is still what the container started from (see
//! [`super::origins`]): otherwise the path is a *conflict*, the base keeps the host's version
//! and the container's stays in the kept delta. Nothing is written or deleted at a path the
//! container's policy did not let it write, and nothing it could not see is deleted (a
//! directory removed in the container keeps its hidden entries on the host).
//!
//! Applied changes leave the delta as they land. Before each rename, the new entry's inode is
//! journaled; a commit interrupted at any point and run again recognises what already landed
//! (the base entry is the journaled inode) and finishes the rest without applying anything
//! twice or taking its own work for a host change.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use super::origins::{self, Identity, OriginMap};
use crate::fence::layers::{is_private_xattr, OPAQUE_XATTR};
use crate::policy::{Level, Policy};
use crate::sys::fs::{self as sfs, Errno, FileType, Mode, OFlags, RenameFlags, Stat};

/// A change that did not land.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The path as the container saw it.
    pub path: String,
    pub reason: String,
}

/// What a commit did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub deleted: Vec<String>,
    pub conflicts: Vec<Conflict>,
}

impl Report {
    pub fn applied(&self) -> usize {
        self.added.len() + self.changed.len() + self.deleted.len()
    }
}

/// One workspace to commit.
pub struct Workspace<'a> {
    /// The workspace path in the container (for reporting).
    pub dest: &'a str,
    pub base: &'a Path,
    pub upper: &'a Path,
    /// The origins file (see [`super::origins`]).
    pub origins: &'a Path,
    /// The commit journal (kept only while a commit is unfinished).
    pub journal: &'a Path,
    /// A short tag for temporary names in the base (the container id's start).
    pub tag: &'a str,
}

/// Test hook: stop (as a crash would) after this many entries have landed in the base and
/// before the delta forgets them. Read from `AGENTFENSE_TEST_COMMIT_INTERRUPT_AFTER`.
pub const INTERRUPT_ENV: &str = "AGENTFENSE_TEST_COMMIT_INTERRUPT_AFTER";

/// A journal line: before a temporary name is made in the base (`tmp`), and before it is
/// renamed into place (`ino`, the new entry's inode).
#[derive(Serialize, Deserialize)]
struct JournalLine {
    p: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ino: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tmp: Option<String>,
}

/// A temporary name no container chose: random, and journaled before it is made, so that a
/// later run removes exactly the names an interrupted one left.
fn temp_name(parent: &str, tag: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    sfs::join(parent, &format!(".agentfense-commit-{tag}-{r:016x}"))
}

enum Outcome {
    /// Done: the base is as the container left it there.
    Done,
    /// Left alone on purpose (hidden from the container): not a conflict, but the entry stays.
    Kept,
    /// A conflict (already reported).
    Conflict,
}

struct Committer<'a> {
    ws: &'a Workspace<'a>,
    policy: &'a Policy,
    base: OwnedFd,
    upper: OwnedFd,
    origins: OriginMap,
    journal: HashMap<String, u64>,
    journal_file: File,
    /// Upper inode to the base path it was committed at (hard links).
    links: HashMap<u64, String>,
    report: &'a mut Report,
    landed: usize,
    interrupt_after: Option<usize>,
}

/// Applies one workspace's delta to its base. Conflicts are reported, not errors; an error
/// means the commit stopped (and can be run again).
pub fn commit_workspace(ws: &Workspace, policy: &Policy, report: &mut Report) -> Result<()> {
    let base = sfs::open_root(ws.base)
        .map_err(|e| anyhow!("cannot open the base {}: {e}", ws.base.display()))?;
    let upper = sfs::open_root(ws.upper)
        .map_err(|e| anyhow!("cannot open the delta {}: {e}", ws.upper.display()))?;
    let origins = origins::load(ws.origins)
        .with_context(|| format!("failed to read {}", ws.origins.display()))?;
    let (journal, leftovers) = load_journal(ws.journal)?;
    {
        // Temporary names an interrupted run made and did not rename: remove them.
        let b = base.as_fd();
        for t in leftovers {
            if let Ok(Some(st)) = sfs::lstat(b, &t) {
                if sfs::file_type(&st) != FileType::Directory {
                    sfs::unlink(b, &t, false).map_err(|e| err(e, "clean", &t))?;
                }
            }
        }
    }
    let journal_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.journal)
        .with_context(|| format!("failed to open {}", ws.journal.display()))?;
    let interrupt_after = std::env::var(INTERRUPT_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let mut c = Committer {
        ws,
        policy,
        base,
        upper,
        origins,
        journal,
        journal_file,
        links: HashMap::new(),
        report,
        landed: 0,
        interrupt_after,
    };
    let root = sfs::lstat(c.upper.as_fd(), ".")?.ok_or_else(|| anyhow!("the delta is gone"))?;
    c.dir(".", &root, true)?;
    c.finish()
}

/// The journal: inodes that landed, by path; temporary names made.
fn load_journal(path: &Path) -> Result<(HashMap<String, u64>, Vec<String>)> {
    let mut m = HashMap::new();
    let mut tmps = Vec::new();
    match File::open(path) {
        Ok(f) => {
            for line in BufReader::new(f).lines() {
                if let Ok(l) = serde_json::from_str::<JournalLine>(&line?) {
                    if let Some(ino) = l.ino {
                        m.insert(l.p.clone(), ino);
                    }
                    if let Some(t) = l.tmp {
                        tmps.push(t);
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
    Ok((m, tmps))
}

fn err(e: Errno, what: &str, rel: &str) -> anyhow::Error {
    anyhow!("{what} {rel}: {e}")
}

impl Committer<'_> {
    fn shown(&self, rel: &str) -> String {
        let d = self.ws.dest.trim_end_matches('/');
        if rel == "." {
            if d.is_empty() {
                "/".into()
            } else {
                d.into()
            }
        } else {
            format!("{d}/{rel}")
        }
    }

    fn conflict(&mut self, rel: &str, reason: &str) -> Outcome {
        let path = self.shown(rel);
        self.report.conflicts.push(Conflict {
            path,
            reason: reason.to_string(),
        });
        Outcome::Conflict
    }

    fn policy_path(rel: &str) -> String {
        if rel == "." {
            "/".into()
        } else {
            format!("/{rel}")
        }
    }

    fn writable(&self, rel: &str, is_dir: bool) -> bool {
        self.policy.decide(&Self::policy_path(rel), is_dir).level == Level::Write
    }

    /// Hidden from the container: the fence never showed it, so it is never deleted.
    fn hidden(&self, rel: &str, is_dir: bool) -> bool {
        !self
            .policy
            .decide(&Self::policy_path(rel), is_dir)
            .visible()
    }

    fn b(&self) -> BorrowedFd<'_> {
        self.base.as_fd()
    }

    fn u(&self) -> BorrowedFd<'_> {
        self.upper.as_fd()
    }

    /// What the container started from at `rel`: `Some(None)` nothing, `None` unknown.
    fn origin(&self, rel: &str) -> Option<Option<Identity>> {
        self.origins.get(rel).cloned()
    }

    /// Whether the base at `rel` is still what the container started from.
    fn base_unchanged(&self, rel: &str, now: Option<&Stat>) -> std::result::Result<(), String> {
        match (self.origin(rel), now) {
            (Some(Some(id)), Some(st)) if id.unchanged(st) => Ok(()),
            (Some(Some(_)), Some(_)) => {
                Err("changed on the host since the container saw it".into())
            }
            (Some(Some(_)), None) => Err("deleted on the host since the container saw it".into()),
            (_, None) => Ok(()),
            (_, Some(_)) => Err("created on the host since the container started there".into()),
        }
    }

    /// `parent_merged`: whether the container saw the base's entries in the parent directory
    /// (false beneath a directory it replaced).
    fn dir(&mut self, rel: &str, st_u: &Stat, parent_merged: bool) -> Result<Outcome> {
        let before = self.report.conflicts.len();
        let is_root = rel == ".";
        let opaque = sfs::get_xattr(self.u(), rel, OsStr::new(OPAQUE_XATTR)).is_ok();
        // Whether the container saw the base's entries in this directory; if not, those it
        // did not make again were deleted (an opaque directory, or one made inside one).
        let merged = parent_merged && !opaque;
        let base_now = sfs::lstat(self.b(), rel).map_err(|e| err(e, "stat", rel))?;
        let mut created = false;
        match &base_now {
            Some(b) if sfs::file_type(b) == FileType::Directory => {
                let attrs = |s: &Stat| (s.st_mode & 0o7777, s.st_uid, s.st_gid);
                if attrs(st_u) != attrs(b) {
                    let container_changed = match self.origin(rel) {
                        Some(Some(id)) if id.is_dir() => {
                            (id.mode & 0o7777, id.uid, id.gid) != attrs(st_u)
                        }
                        _ => true,
                    };
                    if container_changed {
                        if !self.writable(rel, true) {
                            self.conflict(rel, "not writable under the container's policy");
                        } else if let Err(why) = self.base_unchanged(rel, Some(b)) {
                            self.conflict(rel, &why);
                        } else {
                            self.set_attrs(rel, st_u)?;
                            self.report.changed.push(self.shown(rel));
                        }
                    }
                }
                if !merged {
                    // The container replaced this directory: the base entries it did not make
                    // again were deleted in it.
                    for (name, _) in
                        sfs::read_dir(self.b(), rel).map_err(|e| err(e, "list", rel))?
                    {
                        let Some(name) = name.to_str() else {
                            continue;
                        };
                        let child = sfs::join(rel, name);
                        if sfs::lstat(self.u(), &child)
                            .map_err(|e| err(e, "stat", &child))?
                            .is_none()
                        {
                            self.delete_base(&child)?;
                        }
                    }
                }
            }
            Some(_) if is_root => {
                return Ok(self.conflict(rel, "the workspace root is not a directory"))
            }
            Some(b) => {
                // A file the container deleted and made a directory in place of.
                if !self.writable(rel, true) {
                    return Ok(self.conflict(rel, "not writable under the container's policy"));
                }
                if let Err(why) = self.base_unchanged(rel, Some(b)) {
                    return Ok(self.conflict(rel, &why));
                }
                sfs::unlink(self.b(), rel, false).map_err(|e| err(e, "delete", rel))?;
                self.report.deleted.push(self.shown(rel));
                self.make_dir(rel, st_u)?;
                created = true;
            }
            None if is_root => return Ok(self.conflict(rel, "the workspace is gone from the host")),
            None => {
                if !self.writable(rel, true) {
                    return Ok(self.conflict(rel, "not writable under the container's policy"));
                }
                self.make_dir(rel, st_u)?;
                created = true;
            }
        }
        let mut names: Vec<String> = Vec::new();
        for (name, _) in sfs::read_dir(self.u(), rel).map_err(|e| err(e, "list", rel))? {
            match name.into_string() {
                Ok(n) => names.push(n),
                Err(n) => {
                    let path = format!("{}/{}", self.shown(rel), n.to_string_lossy());
                    self.report.conflicts.push(Conflict {
                        path,
                        reason: "name is not UTF-8".into(),
                    });
                }
            }
        }
        names.sort();
        for name in names {
            let child = sfs::join(rel, &name);
            let Some(st) = sfs::lstat(self.u(), &child).map_err(|e| err(e, "stat", &child))? else {
                continue;
            };
            match sfs::file_type(&st) {
                FileType::Directory => {
                    self.dir(&child, &st, merged)?;
                }
                FileType::CharacterDevice if st.st_rdev == 0 => {
                    if let Outcome::Done | Outcome::Kept = self.delete_base(&child)? {
                        sfs::unlink(self.u(), &child, false).map_err(|e| err(e, "drop", &child))?;
                    }
                }
                _ => {
                    self.entry(&child, &st)?;
                }
            }
        }
        if created {
            sfs::set_times(self.b(), rel, &sfs::stat_times(st_u))
                .map_err(|e| err(e, "times", rel))?;
            self.report.added.push(self.shown(rel));
        }
        if self.report.conflicts.len() > before {
            return Ok(Outcome::Conflict);
        }
        if !is_root {
            // Everything in it landed: it leaves the delta (unless something is still in it).
            match sfs::unlink(self.u(), rel, true) {
                Ok(()) | Err(Errno::NOTEMPTY) => {}
                Err(e) => return Err(err(e, "drop", rel)),
            }
        }
        Ok(Outcome::Done)
    }

    fn make_dir(&mut self, rel: &str, st_u: &Stat) -> Result<()> {
        sfs::mkdir(self.b(), rel, 0o700).map_err(|e| err(e, "mkdir", rel))?;
        self.set_attrs(rel, st_u)
    }

    fn set_attrs(&self, rel: &str, st: &Stat) -> Result<()> {
        sfs::lchown(self.b(), rel, Some(st.st_uid), Some(st.st_gid))
            .map_err(|e| err(e, "chown", rel))?;
        if sfs::file_type(st) != FileType::Symlink {
            sfs::chmod(self.b(), rel, st.st_mode & 0o7777).map_err(|e| err(e, "chmod", rel))?;
        }
        Ok(())
    }

    /// A file, symlink or fifo of the delta, onto the base.
    fn entry(&mut self, rel: &str, st_u: &Stat) -> Result<Outcome> {
        if !self.writable(rel, false) {
            return Ok(self.conflict(rel, "not writable under the container's policy"));
        }
        let base_now = sfs::lstat(self.b(), rel).map_err(|e| err(e, "stat", rel))?;
        if let (Some(ino), Some(b)) = (self.journal.get(rel), &base_now) {
            if *ino == b.st_ino {
                // Landed in an earlier, interrupted run.
                self.links.insert(st_u.st_ino, rel.to_string());
                sfs::unlink(self.u(), rel, false).map_err(|e| err(e, "drop", rel))?;
                self.report.changed.push(self.shown(rel));
                return Ok(Outcome::Done);
            }
        }
        if let Err(why) = self.base_unchanged(rel, base_now.as_ref()) {
            return Ok(self.conflict(rel, &why));
        }
        let existed = base_now.is_some();
        if let Some(b) = &base_now {
            if sfs::file_type(b) == FileType::Directory {
                // A directory the container replaced with a file.
                let mut all = true;
                for (name, _) in sfs::read_dir(self.b(), rel).map_err(|e| err(e, "list", rel))? {
                    let Some(name) = name.to_str() else {
                        all = false;
                        continue;
                    };
                    if !matches!(self.delete_base(&sfs::join(rel, name))?, Outcome::Done) {
                        all = false;
                    }
                }
                if !all {
                    return Ok(self.conflict(
                        rel,
                        "the directory it replaces still holds entries the container did not delete",
                    ));
                }
                sfs::unlink(self.b(), rel, true).map_err(|e| err(e, "rmdir", rel))?;
            }
        }
        let (parent, _) = sfs::split(rel);
        let mut tmp = temp_name(parent, self.ws.tag);
        while sfs::lstat(self.b(), &tmp)
            .map_err(|e| err(e, "stat", &tmp))?
            .is_some()
        {
            tmp = temp_name(parent, self.ws.tag);
        }
        self.journal(JournalLine {
            p: rel.to_string(),
            ino: None,
            tmp: Some(tmp.clone()),
        })?;
        self.write_beside(rel, &tmp, st_u)?;
        let ino = sfs::lstat(self.b(), &tmp)
            .map_err(|e| err(e, "stat", &tmp))?
            .ok_or_else(|| anyhow!("{tmp} vanished"))?
            .st_ino;
        self.journal(JournalLine {
            p: rel.to_string(),
            ino: Some(ino),
            tmp: None,
        })?;
        sfs::rename(self.b(), &tmp, rel, RenameFlags::empty())
            .map_err(|e| err(e, "rename", rel))?;
        self.landed += 1;
        if self.interrupt_after.is_some_and(|n| self.landed >= n) {
            return Err(anyhow!(
                "commit interrupted after {} entries ({INTERRUPT_ENV})",
                self.landed
            ));
        }
        self.links.insert(st_u.st_ino, rel.to_string());
        sfs::unlink(self.u(), rel, false).map_err(|e| err(e, "drop", rel))?;
        if existed {
            self.report.changed.push(self.shown(rel));
        } else {
            self.report.added.push(self.shown(rel));
        }
        Ok(Outcome::Done)
    }

    fn journal(&mut self, l: JournalLine) -> Result<()> {
        let mut line = serde_json::to_string(&l)?;
        line.push('\n');
        self.journal_file.write_all(line.as_bytes())?;
        self.journal_file.sync_data()?;
        Ok(())
    }

    /// A complete copy of upper entry `rel` at base path `tmp`.
    fn write_beside(&self, rel: &str, tmp: &str, st: &Stat) -> Result<()> {
        let (parent, _) = sfs::split(rel);
        match sfs::file_type(st) {
            FileType::RegularFile => {
                if let Some(first) = self.links.get(&st.st_ino) {
                    return sfs::link(self.b(), first, tmp).map_err(|e| err(e, "link", rel));
                }
                let src = sfs::open_beneath(self.u(), rel, OFlags::RDONLY, Mode::empty())
                    .map_err(|e| err(e, "open", rel))?;
                let f = sfs::tmpfile_in(self.b(), parent, 0o600)
                    .map_err(|e| err(e, "create in", parent))?;
                sfs::copy_contents(src.as_fd(), f.as_fd()).map_err(|e| err(e, "copy", rel))?;
                sfs::copy_xattrs(self.u(), rel, f.as_fd(), &is_private_xattr)
                    .map_err(|e| err(e, "xattrs of", rel))?;
                rustix::fs::fchown(
                    &f,
                    Some(rustix::fs::Uid::from_raw(st.st_uid)),
                    Some(rustix::fs::Gid::from_raw(st.st_gid)),
                )
                .map_err(|e| err(e, "chown", rel))?;
                rustix::fs::fchmod(&f, Mode::from_raw_mode(st.st_mode & 0o7777))
                    .map_err(|e| err(e, "chmod", rel))?;
                rustix::fs::futimens(&f, &sfs::stat_times(st)).map_err(|e| err(e, "times", rel))?;
                f.sync_all_fd().map_err(|e| err(e, "sync", rel))?;
                sfs::link_tmpfile(f.as_fd(), self.b(), tmp).map_err(|e| err(e, "link", rel))
            }
            FileType::Symlink => {
                let target = sfs::readlink(self.u(), rel).map_err(|e| err(e, "readlink", rel))?;
                sfs::symlink(self.b(), &target, tmp).map_err(|e| err(e, "symlink", rel))?;
                sfs::lchown(self.b(), tmp, Some(st.st_uid), Some(st.st_gid))
                    .map_err(|e| err(e, "chown", rel))?;
                sfs::set_times(self.b(), tmp, &sfs::stat_times(st))
                    .map_err(|e| err(e, "times", rel))
            }
            kind @ (FileType::Fifo | FileType::Socket) => {
                sfs::mknod(self.b(), tmp, kind, st.st_mode & 0o7777, 0)
                    .map_err(|e| err(e, "mknod", rel))?;
                self.set_attrs(tmp, st)?;
                sfs::set_times(self.b(), tmp, &sfs::stat_times(st))
                    .map_err(|e| err(e, "times", rel))
            }
            _ => Err(anyhow!(
                "{rel}: a device node in the delta is never committed"
            )),
        }
    }

    /// Deletes base entry `rel` (and, for a directory, what the container could see and
    /// delete in it).
    fn delete_base(&mut self, rel: &str) -> Result<Outcome> {
        let Some(b) = sfs::lstat(self.b(), rel).map_err(|e| err(e, "stat", rel))? else {
            return Ok(Outcome::Done);
        };
        let is_dir = sfs::file_type(&b) == FileType::Directory;
        if self.hidden(rel, is_dir) {
            return Ok(Outcome::Kept);
        }
        if !self.writable(rel, is_dir) {
            return Ok(self.conflict(rel, "not writable under the container's policy"));
        }
        if let Err(why) = self.base_unchanged(rel, Some(&b)) {
            return Ok(self.conflict(rel, &why));
        }
        if is_dir {
            let mut outcome = Outcome::Done;
            for (name, _) in sfs::read_dir(self.b(), rel).map_err(|e| err(e, "list", rel))? {
                let Some(name) = name.to_str() else {
                    outcome = Outcome::Kept;
                    continue;
                };
                match self.delete_base(&sfs::join(rel, name))? {
                    Outcome::Done => {}
                    Outcome::Kept => {
                        if matches!(outcome, Outcome::Done) {
                            outcome = Outcome::Kept;
                        }
                    }
                    Outcome::Conflict => outcome = Outcome::Conflict,
                }
            }
            if !matches!(outcome, Outcome::Done) {
                return Ok(outcome);
            }
            sfs::unlink(self.b(), rel, true).map_err(|e| err(e, "rmdir", rel))?;
        } else {
            sfs::unlink(self.b(), rel, false).map_err(|e| err(e, "delete", rel))?;
        }
        self.report.deleted.push(self.shown(rel));
        Ok(Outcome::Done)
    }

    /// After the walk: the origins of what is still in the delta, and no journal once
    /// everything landed.
    fn finish(self) -> Result<()> {
        let mut keep = OriginMap::new();
        for (p, o) in &self.origins {
            let still = sfs::lstat(self.u(), p).ok().flatten().is_some()
                || ancestors(p).any(|a| {
                    sfs::lstat(self.u(), a)
                        .ok()
                        .flatten()
                        .is_some_and(|st| sfs::file_type(&st) == FileType::CharacterDevice)
                });
            if still {
                keep.insert(p.clone(), o.clone());
            }
        }
        origins::store(self.ws.origins, &keep)
            .with_context(|| format!("failed to write {}", self.ws.origins.display()))?;
        drop(self.journal_file);
        if self.report.conflicts.is_empty() {
            match std::fs::remove_file(self.ws.journal) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context("failed to remove the commit journal")
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `a/b/c` → `a/b`, `a`.
fn ancestors(p: &str) -> impl Iterator<Item = &str> {
    p.char_indices()
        .filter(|(_, c)| *c == '/')
        .map(move |(i, _)| &p[..i])
}

trait SyncFd {
    fn sync_all_fd(&self) -> sfs::Res<()>;
}

impl SyncFd for OwnedFd {
    fn sync_all_fd(&self) -> sfs::Res<()> {
        rustix::fs::fsync(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::origins::Origins;
    use crate::fence::layers::Layers;
    use std::fs;

    struct Setup {
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            for d in ["base/src", "base/out", "upper"] {
                fs::create_dir_all(dir.path().join(d)).unwrap();
            }
            fs::write(dir.path().join("base/src/a"), b"a").unwrap();
            fs::write(dir.path().join("base/out/o"), b"o").unwrap();
            Setup { dir }
        }
        fn p(&self, rel: &str) -> std::path::PathBuf {
            self.dir.path().join(rel)
        }
        fn layers(&self) -> Layers {
            let o = Origins::open(&self.p("origins")).unwrap();
            Layers::open_with(Some(&self.p("base")), &self.p("upper"), o).unwrap()
        }
        fn commit(&self, policy: &str) -> Report {
            let policy = Policy::from_json(policy).unwrap();
            let (o, j) = (self.p("origins"), self.p("journal"));
            let (b, u) = (self.p("base"), self.p("upper"));
            let ws = Workspace {
                dest: "/w",
                base: &b,
                upper: &u,
                origins: &o,
                journal: &j,
                tag: "t",
            };
            let mut r = Report::default();
            commit_workspace(&ws, &policy, &mut r).unwrap();
            r
        }
    }

    const SRC_READ_OUT_WRITE: &str = r#"{"rules":[{"pattern":"/src/**","permission":"read"},
        {"pattern":"/out/**","permission":"write"}]}"#;

    #[test]
    fn nothing_lands_where_the_policy_did_not_allow_writing() {
        let s = Setup::new();
        let l = s.layers();
        l.copy_up("src/a").unwrap();
        l.copy_up("out/o").unwrap();
        // Changed behind the fence's back (as if the policy had been different).
        fs::write(s.p("upper/src/a"), b"tampered").unwrap();
        fs::write(s.p("upper/out/o"), b"changed").unwrap();
        drop(l);
        let r = s.commit(SRC_READ_OUT_WRITE);
        assert_eq!(r.changed, ["/w/out/o"]);
        assert_eq!(r.conflicts.len(), 1);
        assert_eq!(r.conflicts[0].path, "/w/src/a");
        assert!(r.conflicts[0].reason.contains("not writable"));
        assert_eq!(fs::read(s.p("base/src/a")).unwrap(), b"a");
        assert_eq!(fs::read(s.p("base/out/o")).unwrap(), b"changed");
        // What did not land stays in the delta, with its origin.
        assert!(s.p("upper/src/a").exists());
        assert!(!s.p("upper/out/o").exists());
        assert!(origins::load(&s.p("origins"))
            .unwrap()
            .contains_key("src/a"));
        assert!(s.p("journal").exists());
    }

    #[test]
    fn deletion_of_a_changed_file_is_a_conflict_and_hidden_entries_stay() {
        let s = Setup::new();
        fs::write(s.p("base/out/.env"), b"secret").unwrap();
        let l = s.layers();
        let f = l.find("out/o", true).unwrap().unwrap();
        l.remove("out/o", &f).unwrap();
        let d = l.find("out", true).unwrap().unwrap();
        l.remove("out", &d).unwrap();
        drop(l);
        let policy = r#"{"rules":[{"pattern":"**","permission":"write"},
            {"pattern":"**/.env","permission":"none","priority":9}]}"#;
        let r = s.commit(policy);
        assert!(r.conflicts.is_empty(), "{:?}", r.conflicts);
        assert_eq!(r.deleted, ["/w/out/o"]);
        assert_eq!(fs::read(s.p("base/out/.env")).unwrap(), b"secret");
        assert!(!s.p("base/out/o").exists());
        assert!(!s.p("journal").exists());

        // Deleted in the container, then changed on the host: the host's version stays.
        let s = Setup::new();
        let l = s.layers();
        let f = l.find("src/a", true).unwrap().unwrap();
        l.remove("src/a", &f).unwrap();
        drop(l);
        fs::write(s.p("base/src/a"), b"host edit").unwrap();
        let r = s.commit(policy);
        assert_eq!(r.conflicts.len(), 1);
        assert_eq!(fs::read(s.p("base/src/a")).unwrap(), b"host edit");
    }
}
