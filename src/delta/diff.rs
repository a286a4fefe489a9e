//! `diff`: what a workspace's delta changes, as `docker diff` shows it: `A` added, `C`
//! changed, `D` deleted, one line per path as the container sees it.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use anyhow::{anyhow, Result};

use super::origins::{self, OriginMap};
use crate::fence::layers::OPAQUE_XATTR;
use crate::policy::Policy;
use crate::sys::fs::{self as sfs, FileType};

/// A kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Added,
    Changed,
    Deleted,
}

impl Kind {
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

/// The changes of one workspace (`dest` in the container, its `base` and `upper`), sorted by
/// path. Base entries the container could not see are never listed as deleted: a commit keeps
/// them.
pub fn diff_workspace(
    dest: &str,
    base: &Path,
    upper: &Path,
    origins_file: Option<&Path>,
    policy: &Policy,
) -> Result<Vec<(Kind, String)>> {
    let b = sfs::open_root(base).map_err(|e| anyhow!("cannot open {}: {e}", base.display()))?;
    let u = sfs::open_root(upper).map_err(|e| anyhow!("cannot open {}: {e}", upper.display()))?;
    let origins = match origins_file {
        Some(p) => origins::load(p)?,
        None => OriginMap::new(),
    };
    let w = Walk {
        dest: dest.trim_end_matches('/'),
        b: b.as_fd(),
        u: u.as_fd(),
        origins,
        policy,
    };
    let mut out = Vec::new();
    w.dir(".", true, &mut out)?;
    if !out.is_empty() {
        // The workspace directory itself changed, as Docker lists a changed file's parents.
        out.push((Kind::Changed, w.shown(".")));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out.dedup();
    Ok(out)
}

struct Walk<'a> {
    dest: &'a str,
    b: BorrowedFd<'a>,
    u: BorrowedFd<'a>,
    origins: OriginMap,
    policy: &'a Policy,
}

impl Walk<'_> {
    fn shown(&self, rel: &str) -> String {
        match (rel, self.dest) {
            (".", "") => "/".into(),
            (".", d) => d.into(),
            (r, d) => format!("{d}/{r}"),
        }
    }

    fn visible(&self, rel: &str, is_dir: bool) -> bool {
        self.policy.decide(&format!("/{rel}"), is_dir).visible()
    }

    /// Whether the container's entry at `rel` replaced one of the base's.
    fn was_in_base(&self, rel: &str) -> bool {
        match self.origins.get(rel) {
            Some(o) => o.is_some(),
            None => sfs::lstat(self.b, rel).ok().flatten().is_some(),
        }
    }

    /// Everything beneath base directory `rel` that the container could see, as deleted.
    fn deleted(&self, rel: &str, out: &mut Vec<(Kind, String)>) {
        let Ok(Some(st)) = sfs::lstat(self.b, rel) else {
            return;
        };
        let is_dir = sfs::file_type(&st) == FileType::Directory;
        if !self.visible(rel, is_dir) {
            return;
        }
        out.push((Kind::Deleted, self.shown(rel)));
        if is_dir {
            for (name, _) in sfs::read_dir(self.b, rel).unwrap_or_default() {
                if let Some(n) = name.to_str() {
                    self.deleted(&sfs::join(rel, n), out);
                }
            }
        }
    }

    fn dir(&self, rel: &str, merged: bool, out: &mut Vec<(Kind, String)>) -> Result<()> {
        let opaque = sfs::get_xattr(self.u, rel, OsStr::new(OPAQUE_XATTR)).is_ok();
        // Beneath a replaced directory the base's entries were not seen: those not made again
        // are deleted.
        let merged = merged && !opaque;
        let mut names = Vec::new();
        for (name, _) in sfs::read_dir(self.u, rel).map_err(|e| anyhow!("list {rel}: {e}"))? {
            names.push(name.to_string_lossy().into_owned());
        }
        if !merged {
            for (name, _) in sfs::read_dir(self.b, rel).unwrap_or_default() {
                let Some(n) = name.to_str() else { continue };
                if !names.iter().any(|x| x == n) {
                    self.deleted(&sfs::join(rel, n), out);
                }
            }
        }
        for name in names {
            let child = sfs::join(rel, &name);
            let Some(st) = sfs::lstat(self.u, &child).map_err(|e| anyhow!("stat {child}: {e}"))?
            else {
                continue;
            };
            let kind = sfs::file_type(&st);
            if kind == FileType::CharacterDevice && st.st_rdev == 0 {
                self.deleted(&child, out);
                continue;
            }
            let in_base = self.was_in_base(&child);
            out.push((
                if in_base { Kind::Changed } else { Kind::Added },
                self.shown(&child),
            ));
            if kind == FileType::Directory {
                self.dir(&child, merged, out)?;
            }
        }
        Ok(())
    }
}
